// Backward dY pass: one read of G produces every rank-R quantity of the backward (docs/math.md, "Backward"):
//   gZ = G B (reduced over N), gH = s gZ * d, dd = colsum(s gZ * H), dB = s G^T (H * d) (reduced over M).
//
// G (M x N) is the only large operand; it streams through shared memory once. A block owns kDyRows rows of G and one
// slice of N's columns (dy_pass_splits slices, so that P and decode sizes alike launch about two blocks per SM), and
// walks that slice in tiles of 64 bytes per row, 16-byte cp.async chunks through a kStages ring (zero-filled past
// the matrix edges; rows that are not 16-byte aligned fall back to element loads). Per tile:
// - gZ: each lane keeps 4 rows x RC/8 ranks of G B in registers across the slice; a G chunk (16 bytes) read from
//   shared memory feeds 4 x 8 (bf16) FMAs per rank;
// - dB: warp w owns columns [w BN/8, (w+1) BN/8) of the tile and each lane a quarter of the rows; lane sums are folded
//   across the quarters by shuffles and the tile's (BN x RC) dB goes out once per block, coalesced: fp32 atomics, or
//   per-row-block partials summed in a fixed order (deterministic mode).
// gZ of each slice goes to a partial buffer; dy_finish_kernel adds the slices in order and writes gH, gH in G's
// dtype, and the per-row-block partial sums of dd (summed by sum_partials): the same bits on every run.
#include <algorithm>
#include <climits>

#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kDyRows;  // rows of G per block (128)
constexpr int kStages = 4;
constexpr int kMaxSplits = 64;

template <typename T, int RC>
struct DyCfg {
  static constexpr int ES = int(sizeof(T));
  static constexpr int EPC = 16 / ES;           // elements per 16-byte chunk
  static constexpr int BN = 64 / ES;            // columns per tile: 64 bytes of every row (4 chunks)
  static constexpr int RPL = RC / 8;            // ranks per lane
  static constexpr int NCW = BN / kWarps;       // dB columns per warp
  static constexpr int G_BYTES = kRows * 64;
  static constexpr int B_BYTES = BN * RC * 4;   // B tile, fp32, rows of RC
  static constexpr int STAGE_BYTES = G_BYTES + B_BYTES;
  static constexpr int Z_BYTES = kRows * RC * 4;
  static constexpr int SMEM_BYTES = kStages * STAGE_BYTES + Z_BYTES;
  static_assert(RC == 16 || RC == 32, "rank tiles of 16 or 32");
  static_assert((NCW * RPL) % 4 == 0, "the dB fold leaves each row quarter a whole number of values");
  static_assert((kRows * 4) % kThreads == 0, "G tile chunks split evenly over the block");
};

// Byte offset of chunk c (0..3) of row r in a tile of 64-byte rows, XOR-swizzled so that the 16-byte chunks that 4
// consecutive rows contribute to one warp access fall in different bank groups.
__device__ __forceinline__ int gswz(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) << 4); }

struct DyVec { bool g, b; };

template <typename T, int RC>
__global__ void __launch_bounds__(kThreads, 2) dy_pass_kernel(const DyPassArgs p, const DyVec vec, const int tiles_per) {
  using C = DyCfg<T, RC>;
  constexpr int BN = C::BN, RPL = C::RPL, NCW = C::NCW, EPC = C::EPC;
  extern __shared__ __align__(128) unsigned char smem[];
  float* zs = reinterpret_cast<float*>(smem + kStages * C::STAGE_BYTES);

  const int split = int(blockIdx.x), mb = int(blockIdx.y), r0 = int(blockIdx.z) * RC;
  const int m0 = mb * kRows;
  const int rows = min(kRows, p.M - m0);
  const int n_tiles = (p.N + BN - 1) / BN;
  const int t0 = split * tiles_per, t1 = min(n_tiles, t0 + tiles_per);
  const T* g = static_cast<const T*>(p.g);
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int q4 = lane >> 3, cq = lane & 7;  // row quarter (gZ rows q4 + 4i, dB rows q4 + 4j) and rank group

  // Z = s H d for the block's rows and ranks (zero outside), read by the dB step of every tile.
  for (int e = int(threadIdx.x); e < kRows * RC; e += kThreads) {
    const int r = e / RC, c = e % RC, gr = r0 + c;
    zs[e] = (r < rows && gr < p.R) ? p.scaling * p.h[int64_t(m0 + r) * p.R + gr] * p.d[gr] : 0.f;
  }

  auto load_stage = [&](int stage, int tile) {
    unsigned char* gsm = smem + stage * C::STAGE_BYTES;
    float* bsm = reinterpret_cast<float*>(gsm + C::G_BYTES);
    const int n0 = tile * BN;
#pragma unroll
    for (int i = 0; i < kRows * 4 / kThreads; ++i) {
      const int idx = i * kThreads + int(threadIdx.x), r = idx >> 2, c = idx & 3;
      const int gc = n0 + c * EPC, left = p.N - gc;
      unsigned char* d = gsm + gswz(r, c);
      const T* src = g + int64_t(m0 + r) * p.ldg + gc;
      if (vec.g) {
        const int bytes = r < rows && left > 0 ? (left >= EPC ? 16 : left * C::ES) : 0;
        cp_async_16_zfill(d, bytes > 0 ? src : p.g, bytes);
      } else {
        T* e = reinterpret_cast<T*>(d);
#pragma unroll
        for (int v = 0; v < EPC; ++v) e[v] = (r < rows && v < left) ? src[v] : zero_value<T>();
      }
    }
    constexpr int B_CPR = RC / 4;  // 16-byte chunks per B tile row
    for (int idx = int(threadIdx.x); idx < BN * B_CPR; idx += kThreads) {
      const int n = idx / B_CPR, c = idx % B_CPR;
      const int gn = n0 + n, gr = r0 + c * 4, left = p.R - gr;
      float* d = bsm + n * RC + c * 4;
      const float* src = p.b + int64_t(gn) * p.R + gr;
      if (vec.b) {
        const int bytes = gn < p.N && left > 0 ? (left >= 4 ? 16 : left * 4) : 0;
        cp_async_16_zfill(d, bytes > 0 ? src : p.b, bytes);
      } else {
#pragma unroll
        for (int v = 0; v < 4; ++v) d[v] = (gn < p.N && v < left) ? src[v] : 0.f;
      }
    }
  };

  float gz[4][RPL];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int q = 0; q < RPL; ++q) gz[i][q] = 0.f;

  const int steps = t1 - t0;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_stage(s, t0 + s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile s visible to all (and zs, the first time); its stage's previous reader is done
    if (s + kStages - 1 < steps) load_stage((s + kStages - 1) % kStages, t0 + s + kStages - 1);
    cp_async_commit();
    const unsigned char* gsm = smem + (s % kStages) * C::STAGE_BYTES;
    const float* bsm = reinterpret_cast<const float*>(gsm + C::G_BYTES);

    // gZ += G B over this tile's columns, for rows warp * 16 + q4 + 4 i (warps past the last row skip it).
    if (warp * 16 < rows) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint32_t gv[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 w4 = *reinterpret_cast<const uint4*>(gsm + gswz(warp * 16 + q4 + 4 * i, c));
          gv[i][0] = w4.x, gv[i][1] = w4.y, gv[i][2] = w4.z, gv[i][3] = w4.w;
        }
#pragma unroll
        for (int e = 0; e < EPC; ++e) {
          float bv[RPL];
          load_floats(bv, bsm + (c * EPC + e) * RC + cq * RPL);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const float gf = unpack_elem<T>(gv[i], e);
#pragma unroll
            for (int q = 0; q < RPL; ++q) gz[i][q] = fmaf(gf, bv[q], gz[i][q]);
          }
        }
      }
    }

    // dB for this tile's columns warp * NCW .. + NCW: lane sums over rows q4 + 4 j, then the quarters are folded.
    float db[NCW * RPL];
#pragma unroll
    for (int k = 0; k < NCW * RPL; ++k) db[k] = 0.f;
    const int col = warp * NCW;  // NCW elements = 8 bytes, inside one chunk
#pragma unroll 4
    for (int r = q4; r < rows; r += 4) {
      const unsigned char* gp = gsm + gswz(r, col / EPC) + (col % EPC) * C::ES;
      const uint2 g2 = *reinterpret_cast<const uint2*>(gp);
      const uint32_t g4[2] = {g2.x, g2.y};
      float zv[RPL];
      load_floats(zv, zs + r * RC + cq * RPL);
#pragma unroll
      for (int c = 0; c < NCW; ++c) {
        const float gf = unpack_elem<T>(g4, c);
#pragma unroll
        for (int q = 0; q < RPL; ++q) db[c * RPL + q] = fmaf(gf, zv[q], db[c * RPL + q]);
      }
    }
    fold_lanes<NCW * RPL / 2>(db, (q4 & 2) != 0, 16);
    fold_lanes<NCW * RPL / 4>(db, (q4 & 1) != 0, 8);
    const int n0 = (t0 + s) * BN;
#pragma unroll
    for (int k = 0; k < NCW * RPL / 4; ++k) {
      const int idx = q4 * (NCW * RPL / 4) + k, c = idx / RPL, q = idx % RPL;
      const int gn = n0 + col + c, gr = r0 + cq * RPL + q;
      if (gn < p.N && gr < p.R) {
        if (p.db_partial != nullptr)
          p.db_partial[(int64_t(mb) * p.N + gn) * p.R + gr] = db[k];
        else
          atomicAdd(&p.db[int64_t(gn) * p.R + gr], db[k]);
      }
    }
  }
  cp_async_wait<0>();

  // This slice's G B for the block's rows: finished by dy_finish_kernel.
  float* part = p.gz_partial + int64_t(split) * p.M * p.R;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = warp * 16 + q4 + 4 * i;
    if (r >= rows) continue;
#pragma unroll
    for (int q = 0; q < RPL; ++q) {
      const int gr = r0 + cq * RPL + q;
      if (gr < p.R) part[int64_t(m0 + r) * p.R + gr] = gz[i][q];
    }
  }
}

// gZ = the slices' partials added in slice order; gH = s gZ d (fp32, and in G's dtype when asked);
// dd_partial[row block] = sum over the block's rows of s gZ H, in row order.
template <typename T>
__global__ void __launch_bounds__(kThreads) dy_finish_kernel(const DyPassArgs p, const int splits) {
  __shared__ float red[kRows][33];
  const int m0 = int(blockIdx.x) * kRows, r0 = int(blockIdx.y) * 32;
  const int rows = min(kRows, p.M - m0);
  const int64_t n = int64_t(p.M) * p.R;
  for (int e = int(threadIdx.x); e < kRows * 32; e += kThreads) {
    const int r = e / 32, c = e % 32, gr = r0 + c;
    float contrib = 0.f;
    if (r < rows && gr < p.R) {
      const int64_t o = int64_t(m0 + r) * p.R + gr;
      const float gzs = p.scaling * sum_partials_at(p.gz_partial, splits, n, o);
      const float ghv = gzs * p.d[gr];
      p.gh[o] = ghv;
      if (p.gh_lowp != nullptr) static_cast<T*>(p.gh_lowp)[o] = from_float<T>(ghv);
      contrib = gzs * p.h[o];
    }
    red[r][c] = contrib;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int gr = r0 + int(threadIdx.x);
    if (gr < p.R) {
      float sum = 0.f;
      for (int r = 0; r < rows; ++r) sum += red[r][threadIdx.x];  // fixed order: deterministic
      p.dd_partial[int64_t(blockIdx.x) * p.R + gr] = sum;
    }
  }
}

__global__ void sum_partials_kernel(const float* __restrict__ part, int64_t tiles, int64_t n, float* __restrict__ out) {
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = sum_partials_at(part, tiles, n, e);
}

template <typename T, int RC>
int splits_for(int M, int N, int R) {
  const int n_tiles = ceil_div(N, DyCfg<T, RC>::BN);
  const int64_t others = int64_t(ceil_div(M, kRows)) * ceil_div(R, RC);
  int64_t s = (2 * int64_t(device_sm_count()) + others - 1) / others;  // about two blocks per SM
  s = std::min<int64_t>(std::min<int64_t>(s, n_tiles), kMaxSplits);
  if (s <= 1) return 1;
  const int per = ceil_div(n_tiles, s);
  return ceil_div(n_tiles, per);  // the kernel gives each split `per` tiles: no split is left empty
}

template <typename T, int RC>
void launch_rc(const DyPassArgs& a, cudaStream_t stream) {
  using C = DyCfg<T, RC>;
  const int n_tiles = ceil_div(a.N, C::BN);
  const int per = ceil_div(n_tiles, a.splits);
  const dim3 grid(unsigned(a.splits), unsigned(ceil_div(a.M, kRows)), unsigned(ceil_div(a.R, RC)));
  if (grid.y > 65535u || grid.z > 65535u) throw std::runtime_error("kasa_kernels: dy_pass: M or rank too large");
  DyVec vec;
  // One row has no stride to misalign it: decode with a ragged N keeps 16-byte loads.
  vec.g = a.M == 1 ? reinterpret_cast<uintptr_t>(a.g) % 16 == 0 : rows_are_16b_aligned(a.g, a.ldg, int(sizeof(T)));
  vec.b = a.N == 1 ? reinterpret_cast<uintptr_t>(a.b) % 16 == 0 : rows_are_16b_aligned(a.b, a.R, 4);
  auto kernel = dy_pass_kernel<T, RC>;
  opt_in_dynamic_smem(kernel, C::SMEM_BYTES);
  kernel<<<grid, kThreads, C::SMEM_BYTES, stream>>>(a, vec, per);
  KASA_CHECK_LAUNCH("dy_pass_kernel");
}

template <typename T>
void launch(const DyPassArgs& a, cudaStream_t stream) {
  if (a.splits < 1 || a.splits > kMaxSplits || a.gz_partial == nullptr)
    throw std::runtime_error("kasa_kernels: dy_pass: splits must be in [1, 64], with a gz_partial workspace");
  if (a.N > 0) {
    if (a.R <= 16)
      launch_rc<T, 16>(a, stream);
    else
      launch_rc<T, 32>(a, stream);
  }
  const int splits = a.N > 0 ? a.splits : 0;  // N = 0: G B is 0, no slice was written
  const dim3 grid(unsigned(ceil_div(a.M, kRows)), unsigned(ceil_div(a.R, 32)));
  dy_finish_kernel<T><<<grid, kThreads, 0, stream>>>(a, splits);
  KASA_CHECK_LAUNCH("dy_finish_kernel");
}

template <typename T>
int splits_t(int M, int N, int R) {
  return R <= 16 ? splits_for<T, 16>(M, N, R) : splits_for<T, 32>(M, N, R);
}

}  // namespace

int dy_pass_splits(DType dt, int M, int N, int R) {
  if (M <= 0 || N <= 0 || R <= 0) return 1;
  switch (dt) {
    case DType::kF32: return splits_t<float>(M, N, R);
    case DType::kF16: return splits_t<__half>(M, N, R);
    case DType::kBF16: return splits_t<__nv_bfloat16>(M, N, R);
  }
  throw std::runtime_error("kasa_kernels: dy_pass_splits: unsupported dtype");
}

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
