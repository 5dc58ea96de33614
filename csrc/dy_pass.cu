// Backward dY pass: one read of G produces every rank-R quantity of the backward (docs/math.md, "Backward"):
//   gZ = s G B (reduced over N inside the block), gH = gZ * d, dd = colsum(gZ * H) (per-block partials),
//   dB = s G^T (H * d) (reduced over this block's rows, then across blocks by fp32 atomics, or through per-block
//   partials and sum_partials in deterministic mode).
#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kRows = kDyRows;  // rows of G per block
constexpr int kCols = 16;       // rank columns per block (grid.y covers R)
constexpr int kN = 64;          // columns of G per smem tile
constexpr int kThreads = 256;   // thread t: rank columns 4*(t%4)..+4 of row t/4 (gZ) and of tile column t/4 (dB)

template <typename T>
__global__ void __launch_bounds__(kThreads) dy_pass_kernel(const DyPassArgs p) {
  __shared__ float gs[kRows][kN + 1];
  __shared__ __align__(16) float bs[kN][kCols];
  __shared__ __align__(16) float zs[kRows][kCols];
  __shared__ float red[kRows][kCols + 1];
  const T* g = static_cast<const T*>(p.g);
  const int m0 = blockIdx.x * kRows, c0 = blockIdx.y * kCols;
  const int cg = threadIdx.x % 4, rg = threadIdx.x / 4;

  for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
    const int r = e / kCols, c = e % kCols;
    const int gm = m0 + r, gc = c0 + c;
    zs[r][c] = (gm < p.M && gc < p.R) ? p.h[int64_t(gm) * p.R + gc] * p.d[gc] : 0.f;
  }

  float gz[4] = {};
  for (int n0 = 0; n0 < p.N; n0 += kN) {
    __syncthreads();  // previous tile consumed (and zs written, on the first pass)
    for (int e = threadIdx.x; e < kRows * kN; e += kThreads) {
      const int r = e / kN, nn = e % kN;
      const int gm = m0 + r, gn = n0 + nn;
      gs[r][nn] = (gm < p.M && gn < p.N) ? to_float(g[int64_t(gm) * p.ldg + gn]) : 0.f;
    }
    for (int e = threadIdx.x; e < kN * kCols; e += kThreads) {
      const int nn = e / kCols, c = e % kCols;
      const int gn = n0 + nn, gc = c0 + c;
      bs[nn][c] = (gn < p.N && gc < p.R) ? p.b[int64_t(gn) * p.R + gc] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int nn = 0; nn < kN; ++nn) {
      const float gv = gs[rg][nn];
      const float4 b4 = *reinterpret_cast<const float4*>(&bs[nn][cg * 4]);
      gz[0] = fmaf(gv, b4.x, gz[0]);
      gz[1] = fmaf(gv, b4.y, gz[1]);
      gz[2] = fmaf(gv, b4.z, gz[2]);
      gz[3] = fmaf(gv, b4.w, gz[3]);
    }
    float db[4] = {};
#pragma unroll 8
    for (int r = 0; r < kRows; ++r) {
      const float gv = gs[r][rg];
      const float4 z4 = *reinterpret_cast<const float4*>(&zs[r][cg * 4]);
      db[0] = fmaf(gv, z4.x, db[0]);
      db[1] = fmaf(gv, z4.y, db[1]);
      db[2] = fmaf(gv, z4.z, db[2]);
      db[3] = fmaf(gv, z4.w, db[3]);
    }
    const int gn = n0 + rg;
    if (gn < p.N) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int gc = c0 + cg * 4 + c;
        if (gc >= p.R) continue;
        const float v = p.scaling * db[c];
        if (p.db_partial != nullptr)
          p.db_partial[(int64_t(blockIdx.x) * p.N + gn) * p.R + gc] = v;
        else
          atomicAdd(&p.db[int64_t(gn) * p.R + gc], v);
      }
    }
  }

  const int gm = m0 + rg;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int gc = c0 + cg * 4 + c;
    const bool valid = gm < p.M && gc < p.R;
    const float gzv = p.scaling * gz[c];
    float contrib = 0.f;
    if (valid) {
      const int64_t o = int64_t(gm) * p.R + gc;
      const float ghv = gzv * p.d[gc];
      p.gh[o] = ghv;
      if (p.gh_lowp != nullptr) static_cast<T*>(p.gh_lowp)[o] = from_float<T>(ghv);
      contrib = gzv * p.h[o];
    }
    red[rg][cg * 4 + c] = contrib;
  }
  __syncthreads();
  if (threadIdx.x < kCols) {
    const int gc = c0 + threadIdx.x;
    if (gc < p.R) {
      float sum = 0.f;
      for (int r = 0; r < kRows; ++r) sum += red[r][threadIdx.x];  // fixed order: deterministic
      p.dd_partial[int64_t(blockIdx.x) * p.R + gc] = sum;
    }
  }
}

__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t tiles, int64_t n, float* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t t = 0; t < tiles; ++t) s += part[t * n + e];
    out[e] = s;
  }
}

template <typename T>
void launch(const DyPassArgs& a, cudaStream_t stream) {
  const dim3 grid(ceil_div(a.M, kRows), ceil_div(a.R, kCols));
  if (grid.y > 65535u) throw std::runtime_error("kasa_kernels: dy_pass: rank too large");
  dy_pass_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  KASA_CHECK_LAUNCH("dy_pass_kernel");
}

}  // namespace

void dy_pass(DType dt, const DyPassArgs& args, cudaStream_t stream) {
  if (args.M <= 0 || args.R <= 0) return;
  switch (dt) {
    case DType::kF32: return launch<float>(args, stream);
    case DType::kF16: return launch<__half>(args, stream);
    case DType::kBF16: return launch<__nv_bfloat16>(args, stream);
  }
  throw std::runtime_error("kasa_kernels: dy_pass: unsupported dtype");
}

void sum_partials(const float* partial, int64_t tiles, int64_t n, float* out, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t blocks = (n + 255) / 256;
  sum_partials_kernel<<<unsigned(blocks < 4096 ? blocks : 4096), 256, 0, stream>>>(partial, tiles, n, out);
  KASA_CHECK_LAUNCH("sum_partials_kernel");
}

}  // namespace kasa

namespace kasa {

cudaError_t kernel_image_info(int* binary_version, int* ptx_version) {
  cudaFuncAttributes attr{};
  const cudaError_t err = cudaFuncGetAttributes(&attr, sum_partials_kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // a probe must not leave a sticky error for the next launch check
    return err;
  }
  *binary_version = attr.binaryVersion;
  *ptx_version = attr.ptxVersion;
  return cudaSuccess;
}

}  // namespace kasa
