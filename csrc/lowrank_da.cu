// Backward dA = gH^T dropout(x) (R x K, fp32), the mask regenerated from the seed as x arrives. x (M x K) is the only
// large operand and streams through shared memory once. A block owns a tile of 64 bytes of every row of x (32 bf16
// or 16 fp32 columns), RC ranks, and one slice of the rows (lowrank_da_splits slices, so that P and decode sizes
// alike launch about two blocks per SM); it walks its rows 64 at a time through a kStages ring of 16-byte cp.async
// chunks (zero-filled past the edges; rows that are not 16-byte aligned fall back to element loads).
// With dropout, every thread zeroes the dropped elements of its chunk of each landed tile (one hash per element and
// block); the keep scale 1 / (1 - p) multiplies the fp32 sums once at the end. Two ways to sum (as in dy_pass.cu):
// - MMA (16-bit x on sm80/sm87/sm90+): TF32 tensor cores, 2xTF32 (gH split into TF32 high and low parts, x exact);
//   warp w takes rows 8w..8w+7 of every tile as one k8 step: x's B fragments by one ldmatrix.x4.trans (the pair of
//   16-bit elements in each register are k slots t and t + 4), gH^T's A fragments by 32-bit loads. The warps' sums
//   are added in warp order through shared memory once, after the row loop.
// - FFMA (fp32 x, and sm86/sm89): warp w owns columns [w BK/8, (w+1) BK/8) and each lane a quarter of the rows and
//   RC/8 ranks; the quarters are folded by shuffles once, after the row loop.
// The slices' partial sums go to a workspace that sum_partials adds in a fixed order (no atomics: the result does not
// depend on scheduling).
#include <algorithm>

#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 64;     // rows of x per tile
constexpr int kStages = 4;
constexpr int kMaxSplits = 64;
constexpr int kMinTilesPerSplit = 4;  // shorter slices add workspace traffic for little extra parallelism

template <typename T, int RC, bool MMA>
struct DaCfg {
  static constexpr int ES = int(sizeof(T));
  static constexpr int EPC = 16 / ES;
  static constexpr int BK = 64 / ES;            // columns per block: 64 bytes of every row (4 chunks)
  static constexpr int RPL = RC / 8;            // FFMA: ranks per lane
  static constexpr int NCW = BK / kWarps;       // FFMA: columns per warp (8 bytes)
  static constexpr int MT = RC / 16;            // MMA: m16 tiles over the ranks
  static constexpr int GLD = RC + 4;            // gH tile row (floats), padded: fragment reads of rows 2t hit 4 banks
  static constexpr int X_BYTES = kRows * 64;
  static constexpr int G_BYTES = kRows * GLD * 4;
  static constexpr int STAGE_BYTES = X_BYTES + G_BYTES;
  static constexpr int SMEM_BYTES = kStages * STAGE_BYTES;
  static_assert(RC == 16 || RC == 32, "rank tiles of 16 or 32");
  static_assert(kRows * 4 == kThreads, "one x chunk per thread and tile (the dropout pass relies on it)");
  static_assert((NCW * RPL) % 4 == 0, "the fold leaves each row quarter a whole number of values");
  static_assert(!MMA || (ES == 2 && kRows == 8 * kWarps && kWarps * RC * BK * 4 <= SMEM_BYTES), "MMA layout");
};

struct DaVec { bool x, gh; };

template <typename T, int RC, bool DROPOUT, bool MMA>
__global__ void __launch_bounds__(kThreads, 2) lowrank_da_kernel(const LowrankDaArgs p, const DaVec vec,
                                                              const int tiles_per) {
  using C = DaCfg<T, RC, MMA>;
  constexpr int BK = C::BK, RPL = C::RPL, NCW = C::NCW, EPC = C::EPC, GLD = C::GLD, MT = C::MT;
  extern __shared__ __align__(128) unsigned char smem[];
  const int k0 = int(blockIdx.x) * BK, r0 = int(blockIdx.y) * RC, split = int(blockIdx.z);
  const int m_tiles = (p.M + kRows - 1) / kRows;
  const int t0 = split * tiles_per, t1 = min(m_tiles, t0 + tiles_per);
  const T* x = static_cast<const T*>(p.x);
  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int q4 = lane >> 3, cq = lane & 7;  // FFMA: row quarter and rank group
  const int fg = lane >> 2, ft = lane & 3;  // MMA: fragment group and thread in group
  DropoutMask mask{};
  if constexpr (DROPOUT) mask = load_dropout_mask(p.drop);

  // Thread t copies x chunk (t / 4, t % 4) and the gH chunks t, t + 256, ... of every tile.
  const int xr = int(threadIdx.x) >> 2, xc = int(threadIdx.x) & 3;
  auto load_stage = [&](int stage, int tile) {
    unsigned char* xsm = smem + stage * C::STAGE_BYTES;
    float* gsm = reinterpret_cast<float*>(xsm + C::X_BYTES);
    const int m0 = tile * kRows, rows = min(kRows, p.M - m0);
    const int gk = k0 + xc * EPC;
    copy_chunk(xsm + swz64(xr, xc), x + int64_t(m0 + xr) * p.ldx + gk, p.x, xr < rows, p.K - gk, vec.x);
    constexpr int G_CPR = RC / 4;
    for (int idx = int(threadIdx.x); idx < kRows * G_CPR; idx += kThreads) {
      const int r = idx / G_CPR, c = idx % G_CPR;
      const int gr = r0 + c * 4;
      copy_chunk(gsm + r * GLD + c * 4, p.gh + int64_t(m0 + r) * p.R + gr, p.gh, r < rows, p.R - gr, vec.gh);
    }
  };

  // MMA: acc[(mi * 4 + jn) * 4 + e] is element e of the m16n8 tile (ranks 16 mi.., columns 8 jn..).
  // FFMA: acc[c * RPL + q] is column col + c, rank cq RPL + q, over this lane's rows.
  constexpr int ACC = MMA ? MT * 4 * 4 : NCW * RPL;
  float acc[ACC];
#pragma unroll
  for (int k = 0; k < ACC; ++k) acc[k] = 0.f;
  const int steps = t1 - t0;
  auto load_step = [&](int stage, int s) { load_stage(stage, t0 + s); };
  pipeline_prologue<kStages>(steps, load_step);
  const int col = warp * NCW;  // NCW elements = 8 bytes, inside one chunk
  for (int s = 0; s < steps; ++s) {
    pipeline_advance<kStages>(s, steps, load_step);
    unsigned char* xsm = smem + (s % kStages) * C::STAGE_BYTES;
    const float* gsm = reinterpret_cast<const float*>(xsm + C::X_BYTES);
    const int m0 = (t0 + s) * kRows, rows = min(kRows, p.M - m0);
    if constexpr (DROPOUT) {
      // Zero the dropped elements of this thread's chunk: element (m, k) of the logical (M, K) input.
      if (xr < rows) {
        T* e = reinterpret_cast<T*>(xsm + swz64(xr, xc));
#pragma unroll
        for (int v = 0; v < EPC; ++v)
          if (!mask.keep(uint64_t(m0 + xr) * uint64_t(p.K) + uint64_t(k0 + xc * EPC + v))) e[v] = zero_value<T>();
      }
      __syncthreads();
    }
    if constexpr (MMA) {
      if (8 * warp < rows) {
        // x rows 8w..8w+7 of the tile's 4 column chunks, transposed: register jn holds x[8w + 2t][8 jn + g] and
        // x[8w + 2t + 1][8 jn + g], the B fragment (k slots t, t + 4) of n8 tile jn.
        uint32_t t4[4], b[4][2];
        ldmatrix<4, true>(t4, xsm + swz64(8 * warp + (lane & 7), lane >> 3));
#pragma unroll
        for (int jn = 0; jn < 4; ++jn) widen_pair<T>(t4[jn], b[jn][0], b[jn][1]);
        const float* g0 = gsm + (8 * warp + 2 * ft) * GLD + fg;  // gH[8w + 2t][fg], k slot t
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          uint32_t ah[4], al[4];  // A = gH^T: rows (ranks) g, g + 8 of m16 tile mi; k slots t (row 2t), t + 4 (2t + 1)
          tf32_split(g0[16 * mi], ah[0], al[0]);
          tf32_split(g0[16 * mi + 8], ah[1], al[1]);
          tf32_split(g0[GLD + 16 * mi], ah[2], al[2]);
          tf32_split(g0[GLD + 16 * mi + 8], ah[3], al[3]);
#pragma unroll
          for (int jn = 0; jn < 4; ++jn) {
            float(&d)[4] = *reinterpret_cast<float(*)[4]>(acc + (mi * 4 + jn) * 4);
            mma_1688_tf32(d, ah, b[jn]);
            mma_1688_tf32(d, al, b[jn]);
          }
        }
      }
    } else {
      accumulate_rows<T, NCW, RPL>(acc, xsm, col, gsm + cq * RPL, GLD, q4, rows);
    }
  }
  cp_async_wait<0>();

  float* dst = p.splits > 1 ? p.partial + int64_t(split) * p.R * p.K : p.da;
  const float scale = DROPOUT ? mask.keep_scale : 1.f;
  if constexpr (MMA) {
    // Each warp's sums over its rows, added in warp order (deterministic), through the pipeline's shared memory.
    __syncthreads();  // every warp is done with the last tile
    float* red = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int k = 0; k < ACC; ++k) {
      const int mi = k >> 4, jn = (k >> 2) & 3, e = k & 3;
      red[(warp * RC + 16 * mi + fg + 8 * (e >> 1)) * BK + 8 * jn + 2 * ft + (e & 1)] = acc[k];
    }
    __syncthreads();
    for (int o = int(threadIdx.x); o < RC * BK; o += kThreads) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += red[w * RC * BK + o];
      const int gr = r0 + o / BK, gk = k0 + o % BK;
      if (gk < p.K && gr < p.R) dst[int64_t(gr) * p.K + gk] = sum * scale;
    }
  } else {
    fold_lanes<NCW * RPL / 2>(acc, (q4 & 2) != 0, 16);
    fold_lanes<NCW * RPL / 4>(acc, (q4 & 1) != 0, 8);
#pragma unroll
    for (int k = 0; k < NCW * RPL / 4; ++k) {
      const int idx = q4 * (NCW * RPL / 4) + k, c = idx / RPL, q = idx % RPL;
      const int gk = k0 + col + c, gr = r0 + cq * RPL + q;
      if (gk < p.K && gr < p.R) dst[int64_t(gr) * p.K + gk] = acc[k] * scale;
    }
  }
}

template <typename T, int RC, bool DROPOUT, bool MMA>
void launch_rc(const LowrankDaArgs& a, cudaStream_t stream) {
  using C = DaCfg<T, RC, MMA>;
  const int m_tiles = ceil_div(a.M, kRows);
  const int per = ceil_div(m_tiles, a.splits);
  const dim3 grid(unsigned(ceil_div(a.K, C::BK)), unsigned(ceil_div(a.R, RC)), unsigned(a.splits));
  if (grid.x > unsigned(INT32_MAX) || grid.y > 65535u || grid.z > 65535u)
    throw std::runtime_error("kasa_kernels: lowrank_da: K or rank too large");
  DaVec vec;
  vec.x = a.M == 1 ? reinterpret_cast<uintptr_t>(a.x) % 16 == 0 : rows_are_16b_aligned(a.x, a.ldx, int(sizeof(T)));
  vec.gh = a.M == 1 ? reinterpret_cast<uintptr_t>(a.gh) % 16 == 0 : rows_are_16b_aligned(a.gh, a.R, 4);
  auto kernel = lowrank_da_kernel<T, RC, DROPOUT, MMA>;
  opt_in_dynamic_smem(kernel, C::SMEM_BYTES);
  kernel<<<grid, kThreads, C::SMEM_BYTES, stream>>>(a, vec, per);
  KASA_CHECK_LAUNCH(DROPOUT ? "lowrank_da_dropout_kernel" : "lowrank_da_kernel");
}

template <typename T, int RC, bool MMA>
void launch_drop(const LowrankDaArgs& a, cudaStream_t stream) {
  if (a.drop.seed != nullptr)
    launch_rc<T, RC, true, MMA>(a, stream);
  else
    launch_rc<T, RC, false, MMA>(a, stream);
}

template <typename T, bool MMA>
void launch_math(const LowrankDaArgs& a, cudaStream_t stream) {
  if (a.R <= 16)
    launch_drop<T, 16, MMA>(a, stream);
  else
    launch_drop<T, 32, MMA>(a, stream);
}

template <typename T>
void launch(const LowrankDaArgs& a, cudaStream_t stream) {
  if (a.splits < 1 || a.splits > kMaxSplits || (a.splits > 1 && a.partial == nullptr))
    throw std::runtime_error("kasa_kernels: lowrank_da: splits must be in [1, 64], with a workspace when > 1");
  if constexpr (sizeof(T) == 2) {
    if (rank_r_uses_tf32_mma()) return launch_math<T, true>(a, stream);
  }
  launch_math<T, false>(a, stream);
}

template <typename T>
int splits_t(int M, int K, int R) {
  const int bk = DaCfg<T, 16, false>::BK;
  const int m_tiles = ceil_div(M, kRows);
  const int64_t blocks = int64_t(ceil_div(K, bk)) * ceil_div(R, R <= 16 ? 16 : 32);
  int64_t s = (2 * int64_t(device_sm_count()) + blocks - 1) / blocks;  // about two blocks per SM
  s = std::min<int64_t>(s, std::max(1, m_tiles / kMinTilesPerSplit));
  s = std::min<int64_t>(s, kMaxSplits);
  if (s <= 1) return 1;
  const int per = ceil_div(m_tiles, s);
  return ceil_div(m_tiles, per);  // the kernel gives each split `per` row tiles: no split is left empty
}

}  // namespace

int lowrank_da_splits(DType dt, int M, int K, int R) {
  if (M <= 0 || K <= 0 || R <= 0) return 1;
  switch (dt) {
    case DType::kF32: return splits_t<float>(M, K, R);
    case DType::kF16: return splits_t<__half>(M, K, R);
    case DType::kBF16: return splits_t<__nv_bfloat16>(M, K, R);
  }
  throw std::runtime_error("kasa_kernels: lowrank_da_splits: unsupported dtype");
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
