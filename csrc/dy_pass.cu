// Backward dY pass: one read of G produces every rank-R quantity of the backward (docs/math.md, "Backward"):
//   gZ = G B (reduced over N), gH = s gZ * d, dd = colsum(s gZ * H), dB = s G^T (H * d) (reduced over M).
//
// G (M x N) is the only large operand; it streams through shared memory once. A block owns kDyRows rows of G and one
// slice of N's columns (dy_pass_splits slices, so that P and decode sizes alike launch about two blocks per SM), and
// walks that slice in tiles of 64 bytes per row, 16-byte cp.async chunks through a kStages ring (zero-filled past
// the matrix edges; rows that are not 16-byte aligned fall back to element loads). Per tile, two ways:
// - MMA (16-bit G on sm80/sm87/sm90+, see rank_r_uses_tf32_mma): TF32 tensor cores, 2xTF32 (B and Z split into a
//   TF32 high and low part, G exact in TF32), so fp32 accuracy at 2 x 2 M N R tensor-core FLOPs instead of 2 M N R
//   FFMA (at P on an A100: 4.3 GFLOP at 156 TFLOP/s against 2.1 GFLOP at 19.5: a model, not a measurement).
//   gZ: warp w's 16 rows, A fragments by ldmatrix.x4, the pair of 16-bit elements in each register taken as two k
//   slots (k is any order that A and B agree on). dB: the A fragments of G^T by ldmatrix.x4.trans; Z's fragments
//   are split once per block and stored in fragment order; warps split the output (and, for 16 ranks, the rows,
//   added in a fixed order through shared memory).
// - FFMA (fp32 G, and sm86/sm89 where TF32 tensor cores are no faster than FP32 FMA): gZ with each lane keeping 4 rows
//   x RC/8 ranks in registers across the slice (a 16-byte G chunk feeds 4 x 8 bf16 FMAs per rank); dB with warp w
//   owning columns [w BN/8, (w+1) BN/8) and each lane a quarter of the rows, folded across the quarters by shuffles.
// The tile's (BN x RC) dB goes out once per block, coalesced: fp32 atomics, or per-row-block partials summed in a
// fixed order (deterministic mode). gZ of each slice goes to a partial buffer; dy_finish_kernel adds the slices in
// order and writes gH, gH in G's dtype, and the per-row-block partial sums of dd (summed by sum_partials).
#include <algorithm>
#include <climits>

#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = kDyRows;  // rows of G per block (128)
constexpr int kStages = 4;
constexpr int kMaxSplits = 256;  // decode: N = 4096 in 32-column tiles is 128 slices, one per SM or so

template <typename T, int RC, bool MMA>
struct DyCfg {
  static constexpr int ES = int(sizeof(T));
  static constexpr int EPC = 16 / ES;           // elements per 16-byte chunk
  static constexpr int BN = 64 / ES;            // columns per tile: 64 bytes of every row (4 chunks)
  static constexpr int RPL = RC / 8;            // FFMA: ranks per lane
  static constexpr int NCW = BN / kWarps;       // FFMA: dB columns per warp
  static constexpr int NT8 = RC / 8;            // MMA: n8 tiles over the ranks
  static constexpr int DB_TILES = BN / 16 * NT8;      // MMA: m16n8 tiles of the tile's dB
  static constexpr int KPARTS = kWarps / DB_TILES;    // MMA: warps that share one dB tile, splitting the rows
  static constexpr int BLD = RC + 4;            // B tile row (floats), padded: fragment reads of rows 2t hit 4 banks
  static constexpr int G_BYTES = kRows * 64;
  static constexpr int B_BYTES = BN * BLD * 4;
  static constexpr int STAGE_BYTES = G_BYTES + B_BYTES;
  static constexpr int Z_BYTES = kRows * RC * (MMA ? 8 : 4);  // MMA: high and low TF32 parts, in fragment order
  static constexpr int SCRATCH_BYTES = MMA && KPARTS > 1 ? kWarps * 32 * 16 : 0;
  static constexpr int SMEM_BYTES = kStages * STAGE_BYTES + Z_BYTES + SCRATCH_BYTES;
  static_assert(RC == 16 || RC == 32, "rank tiles of 16 or 32");
  static_assert((NCW * RPL) % 4 == 0, "the dB fold leaves each row quarter a whole number of values");
  static_assert((kRows * 4) % kThreads == 0, "G tile chunks split evenly over the block");
  static_assert(!MMA || (ES == 2 && kWarps % DB_TILES == 0 && kRows == 16 * kWarps), "MMA layout");
};

struct DyVec { bool g, b; };

// Z = s H d at the block's row r and rank column c (zero outside the matrix).
__device__ __forceinline__ float z_at(const DyPassArgs& p, int m0, int rows, int r0, int r, int c) {
  const int gr = r0 + c;
  return (r < rows && gr < p.R) ? p.scaling * p.h[int64_t(m0 + r) * p.R + gr] * p.d[gr] : 0.f;
}

// dB element (tile column n, rank column c) of this block: out once per block and tile.
__device__ __forceinline__ void put_db(const DyPassArgs& p, int mb, int gn, int gr, float v) {
  if (gn >= p.N || gr >= p.R) return;
  if (p.db_partial != nullptr)
    p.db_partial[(int64_t(mb) * p.N + gn) * p.R + gr] = v;
  else
    atomicAdd(&p.db[int64_t(gn) * p.R + gr], v);
}

template <typename T, int RC, bool MMA>
__global__ void __launch_bounds__(kThreads, 2) dy_pass_kernel(const DyPassArgs p, const DyVec vec, const int tiles_per) {
  using C = DyCfg<T, RC, MMA>;
  constexpr int BN = C::BN, RPL = C::RPL, NCW = C::NCW, EPC = C::EPC, BLD = C::BLD, NT8 = C::NT8;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* zsm = smem + kStages * C::STAGE_BYTES;
  float* zs = reinterpret_cast<float*>(zsm);      // FFMA: Z as [row][RC]
  uint4* zf = reinterpret_cast<uint4*>(zsm);      // MMA: Z fragments, see below
  float* scratch = reinterpret_cast<float*>(zsm + C::Z_BYTES);

  const int split = int(blockIdx.x), mb = int(blockIdx.y), r0 = int(blockIdx.z) * RC;
  const int m0 = mb * kRows;
  const int rows = min(kRows, p.M - m0);
  const int n_tiles = (p.N + BN - 1) / BN;
  const int t0 = split * tiles_per, t1 = min(n_tiles, t0 + tiles_per);
  const T* g = static_cast<const T*>(p.g);
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int q4 = lane >> 3, cq = lane & 7;  // FFMA: row quarter (gZ rows q4 + 4i, dB rows q4 + 4j), rank group
  const int fg = lane >> 2, ft = lane & 3;  // MMA: fragment group and thread in group

  // Z = s H d for the block's rows and ranks, read by the dB step of every tile. MMA: for k8 step s (rows 8s..),
  // n8 tile j and lane (g, t), the B fragment {Z[8s + 2t][8j + g], Z[8s + 2t + 1][8j + g]}, high parts then low.
  if constexpr (MMA) {
    for (int e = int(threadIdx.x); e < kRows / 8 * NT8 * 32; e += kThreads) {
      const int l = e & 31, j = (e >> 5) % NT8, st = e / (32 * NT8);
      const int r = 8 * st + 2 * (l & 3), c = 8 * j + (l >> 2);
      uint32_t h0, l0, h1, l1;
      tf32_split(z_at(p, m0, rows, r0, r, c), h0, l0);
      tf32_split(z_at(p, m0, rows, r0, r + 1, c), h1, l1);
      zf[e] = make_uint4(h0, h1, l0, l1);
    }
  } else {
    for (int e = int(threadIdx.x); e < kRows * RC; e += kThreads) zs[e] = z_at(p, m0, rows, r0, e / RC, e % RC);
  }

  auto load_stage = [&](int stage, int tile) {
    unsigned char* gsm = smem + stage * C::STAGE_BYTES;
    float* bsm = reinterpret_cast<float*>(gsm + C::G_BYTES);
    const int n0 = tile * BN;
#pragma unroll
    for (int i = 0; i < kRows * 4 / kThreads; ++i) {
      const int idx = i * kThreads + int(threadIdx.x), r = idx >> 2, c = idx & 3;
      const int gc = n0 + c * EPC;
      copy_chunk(gsm + swz64(r, c), g + int64_t(m0 + r) * p.ldg + gc, p.g, r < rows, p.N - gc, vec.g);
    }
    constexpr int B_CPR = RC / 4;  // 16-byte chunks per B tile row
    for (int idx = int(threadIdx.x); idx < BN * B_CPR; idx += kThreads) {
      const int n = idx / B_CPR, c = idx % B_CPR;
      const int gn = n0 + n, gr = r0 + c * 4;
      copy_chunk(bsm + n * BLD + c * 4, p.b + int64_t(gn) * p.R + gr, p.b, gn < p.N, p.R - gr, vec.b);
    }
  };

  // gZ accumulators. FFMA: rows q4 + 4 i of the warp's 16, ranks cq RPL + q. MMA: n8 tile j of the warp's m16 tile.
  constexpr int GZ = MMA ? NT8 * 4 : 4 * RPL;
  float gz[GZ];
#pragma unroll
  for (int i = 0; i < GZ; ++i) gz[i] = 0.f;

  const int steps = t1 - t0;
  auto load_step = [&](int stage, int s) { load_stage(stage, t0 + s); };
  pipeline_prologue<kStages>(steps, load_step);
  for (int s = 0; s < steps; ++s) {
    pipeline_advance<kStages>(s, steps, load_step);  // (its barrier also publishes Z, the first time)
    const unsigned char* gsm = smem + (s % kStages) * C::STAGE_BYTES;
    const float* bsm = reinterpret_cast<const float*>(gsm + C::G_BYTES);
    const int n0 = (t0 + s) * BN;

    if constexpr (MMA) {
      // gZ += G B for the warp's 16 rows: each ldmatrix.x4 covers two 8-column chunks; in each register the two
      // elements (columns 2t, 2t + 1 of a chunk) become k slots t and t + 4 of one m16n8k8 step.
      if (warp * 16 < rows) {
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          uint32_t a4[4];
          ldmatrix<4, false>(a4, gsm + swz64(warp * 16 + (lane & 15), 2 * cc + (lane >> 4)));
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            uint32_t a[4];
            widen_pair<T>(a4[2 * h], a[0], a[2]);
            widen_pair<T>(a4[2 * h + 1], a[1], a[3]);
            const float* brow = bsm + ((2 * cc + h) * 8 + 2 * ft) * BLD + fg;
#pragma unroll
            for (int j = 0; j < NT8; ++j) {
              uint32_t bh[2], bl[2];
              tf32_split(brow[8 * j], bh[0], bl[0]);
              tf32_split(brow[BLD + 8 * j], bh[1], bl[1]);
              float(&acc)[4] = *reinterpret_cast<float(*)[4]>(gz + 4 * j);
              mma_1688_tf32(acc, a, bh);
              mma_1688_tf32(acc, a, bl);
            }
          }
        }
      }
      // dB tile (m16 tile mi of the tile's columns) x (n8 tile j of the ranks), over this warp's share of the rows.
      constexpr int ROWS_PER_PART = kRows / C::KPARTS;
      const int tile = warp % C::DB_TILES, part = warp / C::DB_TILES;
      const int mi = tile / NT8, j = tile % NT8;
      float acc[4] = {0.f, 0.f, 0.f, 0.f};
      for (int mr = part * ROWS_PER_PART; mr < min(rows, (part + 1) * ROWS_PER_PART); mr += 16) {
        uint32_t t4[4];  // rows mr..+7 / +8..+15 (lane bit 4) of columns 16 mi..+7 / +8..+15 (lane bit 3), transposed
        ldmatrix<4, true>(t4, gsm + swz64(mr + (lane & 7) + ((lane >> 4) << 3), 2 * mi + ((lane >> 3) & 1)));
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint32_t a[4];
          widen_pair<T>(t4[2 * h], a[0], a[2]);
          widen_pair<T>(t4[2 * h + 1], a[1], a[3]);
          const uint4 zb = zf[((mr / 8 + h) * NT8 + j) * 32 + lane];
          const uint32_t bh[2] = {zb.x, zb.y}, bl[2] = {zb.z, zb.w};
          mma_1688_tf32(acc, a, bh);
          mma_1688_tf32(acc, a, bl);
        }
      }
      if constexpr (C::KPARTS > 1) {
        // The row parts of one dB tile, added in part order (deterministic).
#pragma unroll
        for (int e = 0; e < 4; ++e) scratch[(warp * 32 + lane) * 4 + e] = acc[e];
        __syncthreads();
        if (part == 0) {
#pragma unroll
          for (int q = 1; q < C::KPARTS; ++q)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[e] += scratch[((warp + q * C::DB_TILES) * 32 + lane) * 4 + e];
        }
      }
      if (part == 0) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          put_db(p, mb, n0 + 16 * mi + fg + 8 * (e >> 1), r0 + 8 * j + 2 * ft + (e & 1), acc[e]);
      }
    } else {
      // gZ += G B over this tile's columns, for rows warp * 16 + q4 + 4 i (warps past the last row skip it).
      if (warp * 16 < rows) {
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          uint32_t gv[4][4];
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const uint4 w4 = *reinterpret_cast<const uint4*>(gsm + swz64(warp * 16 + q4 + 4 * i, c));
            gv[i][0] = w4.x, gv[i][1] = w4.y, gv[i][2] = w4.z, gv[i][3] = w4.w;
          }
#pragma unroll
          for (int e = 0; e < EPC; ++e) {
            float bv[RPL];
            load_floats(bv, bsm + (c * EPC + e) * BLD + cq * RPL);
#pragma unroll
            for (int i = 0; i < 4; ++i) {
              const float gf = unpack_elem<T>(gv[i], e);
#pragma unroll
              for (int q = 0; q < RPL; ++q) gz[i * RPL + q] = fmaf(gf, bv[q], gz[i * RPL + q]);
            }
          }
        }
      }

      // dB for this tile's columns warp * NCW .. + NCW: lane sums over rows q4 + 4 j, then the quarters are folded.
      float db[NCW * RPL];
#pragma unroll
      for (int k = 0; k < NCW * RPL; ++k) db[k] = 0.f;
      const int col = warp * NCW;  // NCW elements = 8 bytes, inside one chunk
      accumulate_rows<T, NCW, RPL>(db, gsm, col, zs + cq * RPL, RC, q4, rows);
      fold_lanes<NCW * RPL / 2>(db, (q4 & 2) != 0, 16);
      fold_lanes<NCW * RPL / 4>(db, (q4 & 1) != 0, 8);
#pragma unroll
      for (int k = 0; k < NCW * RPL / 4; ++k) {
        const int idx = q4 * (NCW * RPL / 4) + k;
        put_db(p, mb, n0 + col + idx / RPL, r0 + cq * RPL + idx % RPL, db[k]);
      }
    }
  }
  cp_async_wait<0>();

  // This slice's G B for the block's rows: finished by dy_finish_kernel.
  float* part = p.gz_partial + int64_t(split) * p.M * p.R;
#pragma unroll
  for (int k = 0; k < GZ; ++k) {
    // MMA: n8 tile k / 4, element k % 4 (rows g, g + 8; ranks 2t, 2t + 1). FFMA: row q4 + 4 (k / RPL), rank k % RPL.
    const int r = MMA ? warp * 16 + fg + 8 * ((k & 3) >> 1) : warp * 16 + q4 + 4 * (k / RPL);
    const int gr = MMA ? r0 + 8 * (k >> 2) + 2 * ft + (k & 1) : r0 + cq * RPL + k % RPL;
    if (r < rows && gr < p.R) part[int64_t(m0 + r) * p.R + gr] = gz[k];
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
  const int n_tiles = ceil_div(N, DyCfg<T, RC, false>::BN);
  const int64_t others = int64_t(ceil_div(M, kRows)) * ceil_div(R, RC);
  int64_t s = (2 * int64_t(device_sm_count()) + others - 1) / others;  // about two blocks per SM
  s = std::min<int64_t>(std::min<int64_t>(s, n_tiles), kMaxSplits);
  if (s <= 1) return 1;
  const int per = ceil_div(n_tiles, s);
  return ceil_div(n_tiles, per);  // the kernel gives each split `per` tiles: no split is left empty
}

template <typename T, int RC, bool MMA>
void launch_rc(const DyPassArgs& a, cudaStream_t stream) {
  using C = DyCfg<T, RC, MMA>;
  const int n_tiles = ceil_div(a.N, C::BN);
  const int per = ceil_div(n_tiles, a.splits);
  const dim3 grid(unsigned(a.splits), unsigned(ceil_div(a.M, kRows)), unsigned(ceil_div(a.R, RC)));
  if (grid.y > 65535u || grid.z > 65535u) throw std::runtime_error("kasa_kernels: dy_pass: M or rank too large");
  DyVec vec;
  // One row has no stride to misalign it: decode with a ragged N keeps 16-byte loads.
  vec.g = a.M == 1 ? reinterpret_cast<uintptr_t>(a.g) % 16 == 0 : rows_are_16b_aligned(a.g, a.ldg, int(sizeof(T)));
  vec.b = a.N == 1 ? reinterpret_cast<uintptr_t>(a.b) % 16 == 0 : rows_are_16b_aligned(a.b, a.R, 4);
  auto kernel = dy_pass_kernel<T, RC, MMA>;
  opt_in_dynamic_smem(kernel, C::SMEM_BYTES);
  kernel<<<grid, kThreads, C::SMEM_BYTES, stream>>>(a, vec, per);
  KASA_CHECK_LAUNCH(MMA ? "dy_pass_kernel (tf32 mma)" : "dy_pass_kernel");
}

template <typename T, bool MMA>
void launch_math(const DyPassArgs& a, cudaStream_t stream) {
  if (a.R <= 16)
    launch_rc<T, 16, MMA>(a, stream);
  else
    launch_rc<T, 32, MMA>(a, stream);
}

template <typename T>
void launch(const DyPassArgs& a, cudaStream_t stream) {
  if (a.splits < 1 || a.splits > kMaxSplits || a.gz_partial == nullptr)
    throw std::runtime_error("kasa_kernels: dy_pass: splits must be in [1, 256], with a gz_partial workspace");
  if (a.N > 0) {
    if constexpr (sizeof(T) == 2) {
      if (rank_r_uses_tf32_mma()) {
        launch_math<T, true>(a, stream);
      } else {
        launch_math<T, false>(a, stream);
      }
    } else {
      launch_math<T, false>(a, stream);
    }
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
