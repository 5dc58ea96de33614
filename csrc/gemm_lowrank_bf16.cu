// The fused low-rank GEMM (gemm_lowrank.cuh) for bf16 inputs: tensor cores, fp32 accumulation.
#include "gemm_lowrank.cuh"

namespace kasa {

void gemm_lowrank_bf16(bool forward, const GemmLowrankArgs& args, cudaStream_t stream) {
  gemm::dispatch<__nv_bfloat16, gemm::Math::kTensorCore16>(forward, args, stream,
                                                    forward ? "gemm_lowrank_fwd_bf16" : "gemm_lowrank_bwd_bf16");
}

}  // namespace kasa
