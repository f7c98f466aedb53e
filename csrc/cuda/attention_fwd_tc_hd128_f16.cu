// Tensor-core forward, head dim 128, float16 (attention_fwd_tc.cuh). One
// instantiation per file: the eight tensor-core files compile in parallel.
#include "attention_fwd_tc.cuh"

namespace selfattn::cuda {

template void forward_tc<c10::Half, 128>(const ForwardParams<c10::Half>&, cudaStream_t);

}  // namespace selfattn::cuda
