// Tensor-core forward, head dim 64, bfloat16 (attention_fwd_tc.cuh). One
// instantiation per file: the eight tensor-core files compile in parallel.
#include "attention_fwd_tc.cuh"

namespace selfattn::cuda {

template void forward_tc<c10::BFloat16, 64>(const ForwardParams<c10::BFloat16>&, cudaStream_t);

}  // namespace selfattn::cuda
