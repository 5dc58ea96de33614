// Backward dA = gH^T dropout(x) (R x K, fp32), the mask regenerated from the seed as x is loaded. The reduction
// over M is split into `splits` row slices so that a small K still fills the GPU; the slices' partial sums are added
// in a fixed order by sum_partials (no atomics: the result does not depend on scheduling).
#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kK = 64;        // columns of x per block
constexpr int kCols = 16;     // rows of dA (rank) per block (grid.y covers R)
constexpr int kRows = 32;     // rows of x per smem tile
constexpr int kThreads = 256; // thread t: dA[c0 + t/16][k0 + 4*(t%16) .. +4]

template <typename T, bool DROPOUT>
__global__ void __launch_bounds__(kThreads) lowrank_da_dropout_kernel(const LowrankDaArgs p) {
  __shared__ __align__(16) float xs[kRows][kK];
  __shared__ float gs[kRows][kCols];
  const T* x = static_cast<const T*>(p.x);
  const int k0 = blockIdx.x * kK, c0 = blockIdx.y * kCols;
  const int kg = threadIdx.x % 16, jg = threadIdx.x / 16;
  DropoutMask mask{};
  if constexpr (DROPOUT) mask = load_dropout_mask(p.drop);

  const int tiles = (p.M + kRows - 1) / kRows;
  const int per = (tiles + p.splits - 1) / p.splits;
  const int t0 = blockIdx.z * per;
  const int t1 = min(tiles, t0 + per);
  float acc[4] = {};
  for (int t = t0; t < t1; ++t) {
    const int m0 = t * kRows;
    __syncthreads();
    for (int e = threadIdx.x; e < kRows * kK; e += kThreads) {
      const int r = e / kK, kk = e % kK;
      const int gm = m0 + r, gk = k0 + kk;
      float v = 0.f;
      if (gm < p.M && gk < p.K) {
        v = to_float(x[int64_t(gm) * p.ldx + gk]);
        if constexpr (DROPOUT) v = mask.apply_at(v, gm, gk, p.K);
      }
      xs[r][kk] = v;
    }
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      const int gm = m0 + r, gc = c0 + c;
      gs[r][c] = (gm < p.M && gc < p.R) ? p.gh[int64_t(gm) * p.R + gc] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float gv = gs[r][jg];
      const float4 x4 = *reinterpret_cast<const float4*>(&xs[r][kg * 4]);
      acc[0] = fmaf(gv, x4.x, acc[0]);
      acc[1] = fmaf(gv, x4.y, acc[1]);
      acc[2] = fmaf(gv, x4.z, acc[2]);
      acc[3] = fmaf(gv, x4.w, acc[3]);
    }
  }
  const int j = c0 + jg;
  if (j >= p.R) return;
  float* dst = p.splits > 1 ? p.partial + int64_t(blockIdx.z) * p.R * p.K : p.da;
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int k = k0 + kg * 4 + q;
    if (k < p.K) dst[int64_t(j) * p.K + k] = acc[q];
  }
}

template <typename T>
void launch(const LowrankDaArgs& a, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.K, kK), ceil_div(a.R, kCols), a.splits);
  if (grid.y > 65535u || grid.z > 65535u || a.splits < 1)
    throw std::runtime_error("kasa_kernels: lowrank_da: bad launch configuration");
  if (a.drop.seed != nullptr) {
    lowrank_da_dropout_kernel<T, true><<<grid, kThreads, 0, stream>>>(a);
    KASA_CHECK_LAUNCH("lowrank_da_dropout_kernel");
  } else {
    lowrank_da_dropout_kernel<T, false><<<grid, kThreads, 0, stream>>>(a);
    KASA_CHECK_LAUNCH("lowrank_da_kernel");
  }
}

}  // namespace

int lowrank_da_splits(int M, int K, int R) {
  if (M <= 0 || K <= 0 || R <= 0) return 1;
  const int64_t blocks = int64_t(ceil_div(K, kK)) * ceil_div(R, kCols);
  const int64_t want = (2 * int64_t(device_sm_count()) + blocks - 1) / blocks;  // about two waves
  const int64_t most = ceil_div(M, kRows * 4);  // keep at least 4 row tiles per slice
  int64_t s = want < most ? want : most;
  if (s > 64) s = 64;  // bounds the (splits, R, K) workspace
  return s < 1 ? 1 : int(s);
}

void lowrank_da(DType dt, const LowrankDaArgs& args, cudaStream_t stream) {
  if (args.R <= 0 || args.K <= 0) return;
  switch (dt) {
    case DType::kF32: return launch<float>(args, stream);
    case DType::kF16: return launch<__half>(args, stream);
    case DType::kBF16: return launch<__nv_bfloat16>(args, stream);
  }
  throw std::runtime_error("kasa_kernels: lowrank_da: unsupported dtype");
}

}  // namespace kasa
