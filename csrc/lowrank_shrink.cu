// Forward shrink: H = dropout(x) A^T (M x R, fp32) and S = H * (s d) in x's dtype, the rank-R operand that the
// fused GEMM consumes. The dropout mask is recomputed from (seed, element index) as x is loaded; it is never stored.
// FFMA in fp32 so that fp32 adapters beside bf16 activations (PEFT's default) keep fp32 products.
#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kRows = 64;     // rows of x per block
constexpr int kCols = 16;     // columns of H per block (grid.y covers R)
constexpr int kK = 32;        // k-slice per smem tile
constexpr int kThreads = 128; // thread t: columns 4*(t%4)..+4 of rows t/4 and t/4 + 32

template <typename T, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) lowrank_shrink_dropout_kernel(const ShrinkArgs p) {
  __shared__ float xs[kK][kRows + 1];           // transposed; +1 keeps the transposing stores conflict-free
  __shared__ __align__(16) float as[kK][kCols];
  const T* x = static_cast<const T*>(p.x);
  const int m0 = blockIdx.x * kRows, c0 = blockIdx.y * kCols;
  const int cg = threadIdx.x % 4, rg = threadIdx.x / 4;
  DropoutMask mask{};
  if constexpr (DROPOUT) mask = load_dropout_mask(p.drop);

  float acc[2][4] = {};
  for (int k0 = 0; k0 < p.K; k0 += kK) {
    __syncthreads();  // previous tile fully consumed
    for (int e = threadIdx.x; e < kRows * kK; e += kThreads) {
      const int r = e / kK, kk = e % kK;
      const int gm = m0 + r, gk = k0 + kk;
      float v = 0.f;
      if (gm < p.M && gk < p.K) {
        v = to_float(x[int64_t(gm) * p.ldx + gk]);
        if constexpr (DROPOUT) v = mask.apply(v, uint64_t(gm) * uint64_t(p.K) + gk);
      }
      xs[kk][r] = v;
    }
    for (int e = threadIdx.x; e < kCols * kK; e += kThreads) {
      const int c = e / kK, kk = e % kK;
      const int gc = c0 + c, gk = k0 + kk;
      as[kk][c] = (gc < p.R && gk < p.K) ? p.a[int64_t(gc) * p.K + gk] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kK; ++kk) {
      const float4 a4 = *reinterpret_cast<const float4*>(&as[kk][cg * 4]);
      const float xv[2] = {xs[kk][rg], xs[kk][rg + 32]};
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        acc[i][0] = fmaf(xv[i], a4.x, acc[i][0]);
        acc[i][1] = fmaf(xv[i], a4.y, acc[i][1]);
        acc[i][2] = fmaf(xv[i], a4.z, acc[i][2]);
        acc[i][3] = fmaf(xv[i], a4.w, acc[i][3]);
      }
    }
  }
  T* s = static_cast<T*>(p.s);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int gm = m0 + rg + 32 * i;
    if (gm >= p.M) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int gc = c0 + cg * 4 + c;
      if (gc >= p.R) continue;
      const int64_t o = int64_t(gm) * p.R + gc;
      p.h[o] = acc[i][c];
      s[o] = from_float<T>(acc[i][c] * p.sd[gc]);
    }
  }
}

template <typename T>
void launch(const ShrinkArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.R <= 0) return;
  const dim3 grid(ceil_div(a.M, kRows), ceil_div(a.R, kCols));
  if (grid.y > 65535u) throw std::runtime_error("kasa_kernels: lowrank_shrink: rank too large");
  if (a.drop.seed != nullptr) {
    lowrank_shrink_dropout_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
    KASA_CHECK_LAUNCH("lowrank_shrink_dropout_kernel");
  } else {
    lowrank_shrink_dropout_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
    KASA_CHECK_LAUNCH("lowrank_shrink_kernel");
  }
}

}  // namespace

void lowrank_shrink(DType dt, const ShrinkArgs& args, cudaStream_t stream) {
  switch (dt) {
    case DType::kF32: return launch<float>(args, stream);
    case DType::kF16: return launch<__half>(args, stream);
    case DType::kBF16: return launch<__nv_bfloat16>(args, stream);
  }
  throw std::runtime_error("kasa_kernels: lowrank_shrink: unsupported dtype");
}

}  // namespace kasa
