// The fused low-rank GEMM (gemm_lowrank.cuh) for fp32 inputs: TF32 tensor cores when torch allows TF32 for
// matmuls, exact FFMA otherwise (the same choice torch makes for F.linear).
#include "gemm_lowrank.cuh"

namespace kasa {

void gemm_lowrank_f32(bool forward, Fp32Math math, const GemmLowrankArgs& args, cudaStream_t stream) {
  if (math == Fp32Math::kTF32)
    gemm::dispatch<float, gemm::Math::kTF32>(forward, args, stream, forward ? "gemm_lowrank_fwd_tf32" : "gemm_lowrank_bwd_tf32");
  else
    gemm::dispatch<float, gemm::Math::kFFMA>(forward, args, stream, forward ? "gemm_lowrank_fwd_f32" : "gemm_lowrank_bwd_f32");
}

}  // namespace kasa
