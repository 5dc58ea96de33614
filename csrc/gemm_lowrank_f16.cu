// The fused low-rank GEMM (gemm_lowrank.cuh) for f16 inputs: tensor cores, fp32 accumulation.
#include "gemm_lowrank.cuh"

namespace kasa {

void gemm_lowrank_f16(bool forward, const GemmLowrankArgs& args, cudaStream_t stream) {
  gemm::dispatch<__half, gemm::Math::kTensorCore16>(forward, args, stream,
                                                    forward ? "gemm_lowrank_fwd_f16" : "gemm_lowrank_bwd_f16");
}

}  // namespace kasa
