// Tensor-core backward (dq, then dk and dv), head dim 128, float16
// (attention_bwd_tc.cuh). One instantiation per file: the eight tensor-core files compile in parallel.
#include "attention_bwd_tc.cuh"

namespace selfattn::cuda {

template void backward_tc<c10::Half, 128>(const BackwardParams<c10::Half>&, cudaStream_t);

}  // namespace selfattn::cuda
