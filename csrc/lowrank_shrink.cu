// Forward shrink: H = dropout(x) A^T (M x R, fp32) and S = H * (s d) in x's dtype, the rank-R operand that the
// fused GEMM consumes. The dropout mask is recomputed from (seed, element index) as x is used; it is never stored.
// FFMA in fp32 so that fp32 adapters beside bf16 activations (PEFT's default) keep fp32 products.
//
// The op reads x (M x K) once and does R FMAs per element of it. By instruction count (not yet measured), at large M
// and r = 16 the FFMA issue time comes close to the time HBM takes to deliver x, so both must overlap; at decode
// sizes what matters is how many SMs share the stream. Hence:
// - a block owns kRows rows and all R columns for R <= 32 (so x is read once for common ranks); larger R is tiled in
//   32-column slices whose blocks are adjacent in launch order, so a row block's second reader finds it in L2;
// - x and A reach shared memory as 16-byte cp.async chunks through a kStages ring: two k-steps are in flight while
//   one is multiplied. Chunks that are unaligned or cross an edge fall back to element loads with zero fill;
// - when the row blocks cannot fill the GPU, K is split over blocks (lowrank_shrink_splits); the slices' fp32 sums go
//   to a caller-allocated workspace and a second small launch adds them in slice order (no atomics: the same bits on
//   every run) and writes H and S. With one split the first launch writes H and S itself.
//
// Inside a warp: 8 lanes along k (one 16-byte chunk of x each, so a quarter warp reads one 128-byte row segment of
// the smem tile: no bank conflicts) x 4 lanes along rows, kTM rows per thread, all RC rank columns per thread. Each
// A value loaded from smem feeds kTM FMAs and each x value RC FMAs; the 8 k-lanes' sums are combined by shuffles once,
// after the k loop.
#include <algorithm>
#include <atomic>
#include <climits>

#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kKLanes = 8;
constexpr int kRowLanes = 32 / kKLanes;
constexpr int kTM = 4;
constexpr int kWarpRows = kRowLanes * kTM;
constexpr int kRows = kWarps * kWarpRows;  // rows of x per block
constexpr int kStages = 3;
constexpr int kMinStepsPerSplit = 2;       // shorter splits add workspace traffic for little extra parallelism
constexpr int kMaxSplits = 64;
constexpr int kMaxDevices = 64;            // per-device caches; devices beyond this are queried every call

template <typename T, int RC>
struct ShrinkCfg {
  static constexpr int VEC = 16 / int(sizeof(T));  // x elements per 16-byte chunk
  static constexpr int BK = kKLanes * VEC;         // k per step: one 128-byte segment of every row
  static constexpr int A_CPR = BK / 4;             // 16-byte chunks of one A row per step
  static constexpr int X_CHUNKS = kRows * kKLanes;
  static constexpr int A_CHUNKS = RC * A_CPR;
  static constexpr int X_BYTES = kRows * BK * int(sizeof(T));
  static constexpr int STAGE_BYTES = X_BYTES + RC * BK * 4;
  static constexpr int SMEM_BYTES = kStages * STAGE_BYTES;
  // RC = 32 keeps 128 accumulators per thread, which does not fit two 256-thread blocks' registers on one SM.
  static constexpr int MIN_BLOCKS = RC <= 16 ? 2 : 1;
  static_assert(X_CHUNKS % kThreads == 0, "the x tile must split evenly over the block");
  static_assert(BK * int(sizeof(T)) == 128, "a quarter warp reads one 128-byte row segment");
  static_assert(2 * kTM == kKLanes, "after the k-lane fold, lane kl holds half the columns of row kl / 2");
  static_assert(X_BYTES % 128 == 0 && STAGE_BYTES % 128 == 0, "stage alignment");
};

// Lane kl reads A chunk kl * VEC/4 + h of each A row. For 16-bit x those are the even (h = 0) or odd chunks 0..14 or
// 1..15, and chunks c and c + 8 share banks; flipping bit 0 of the upper eight puts the 8 lanes on 8 distinct banks.
// (For fp32 x an A row has 8 chunks and this is the identity.)
__device__ __forceinline__ int a_chunk_slot(int c) { return c ^ ((c >> 3) & 1); }

// `n` consecutive 4-byte or 2-byte elements that are not one aligned 16-byte chunk: 4-byte elements still go by
// cp.async (always 4-byte aligned), 2-byte ones by plain loads; positions at or past `left` are zero.
template <typename T, int N>
__device__ __forceinline__ void load_elements(T* d, const T* src, int left) {
#pragma unroll
  for (int v = 0; v < N; ++v) {
    if constexpr (sizeof(T) == 4) {
      if (v < left)
        cp_async_4(d + v, src + v);
      else
        d[v] = zero_value<T>();
    } else {
      d[v] = v < left ? src[v] : zero_value<T>();
    }
  }
}

// What one thread copies each k-step, fixed for the whole k loop: x chunk column c of rows r_x + 32 i and A chunk
// column ca of rank rows r_a + (kThreads / A_CPR) i. Kept to two pointers and two counts so that the loop's live
// state next to the accumulators stays small.
template <typename T, int RC>
struct StageCopier {
  using C = ShrinkCfg<T, RC>;
  static constexpr int X_ROW_STEP = kThreads / kKLanes;
  static constexpr int A_ROW_STEP = kThreads / C::A_CPR;
  static constexpr int X_PER_THREAD = C::X_CHUNKS / kThreads;
  static constexpr int A_PER_THREAD = (C::A_CHUNKS + kThreads - 1) / kThreads;
  static_assert(kThreads % C::A_CPR == 0, "A chunk columns must repeat across the block");
  const T* x;      // row r_x, chunk column c, k = 0
  const float* a;  // rank row r0 + r_a, chunk column ca, k = 0
  int x_rows;      // how many of this thread's x rows are < M
  int a_rows;      // how many of this thread's A rows are < R (and exist in the tile)

  __device__ __forceinline__ StageCopier(const ShrinkArgs& p, int64_t m0, int r0, int rows_left, int ranks_left) {
    const int rx = threadIdx.x / kKLanes, c = threadIdx.x % kKLanes;
    const int ra = threadIdx.x / C::A_CPR, ca = threadIdx.x % C::A_CPR;
    x = static_cast<const T*>(p.x) + (rx < rows_left ? (m0 + rx) * p.ldx : 0) + c * C::VEC;
    a = p.a + (ra < ranks_left ? int64_t(r0 + ra) * p.K : 0) + 4 * ca;
    x_rows = rx < rows_left ? min(X_PER_THREAD, (rows_left - rx + X_ROW_STEP - 1) / X_ROW_STEP) : 0;
    const int a_tile_rows = (RC - ra + A_ROW_STEP - 1) / A_ROW_STEP;  // rows of this thread inside the tile
    a_rows = ra < ranks_left ? min(a_tile_rows, (ranks_left - ra + A_ROW_STEP - 1) / A_ROW_STEP) : 0;
  }

  // One k-step's x tile (kRows x BK, row-major) and A tile (RC x BK, chunk-swizzled) into a smem stage. The k
  // limit is passed as what is left past k0, so no index near INT_MAX is ever formed.
  __device__ __forceinline__ void copy(unsigned char* stage, const ShrinkArgs& p, int k0, bool x_vec,
                                       bool a_vec) const {
    const int k_left = p.K - k0;
    const int c = threadIdx.x % kKLanes, kk = c * C::VEC;
    T* xd = reinterpret_cast<T*>(stage) + (threadIdx.x / kKLanes) * C::BK + kk;
    const T* xs = x + k0;
#pragma unroll
    for (int i = 0; i < X_PER_THREAD; ++i) {
      T* d = xd + i * X_ROW_STEP * C::BK;
      if (i < x_rows && kk < k_left) {
        if (x_vec && kk + C::VEC <= k_left)
          cp_async_16(d, xs);
        else
          load_elements<T, C::VEC>(d, xs, k_left - kk);
      } else {
        *reinterpret_cast<uint4*>(d) = make_uint4(0u, 0u, 0u, 0u);
      }
      xs += X_ROW_STEP * p.ldx;
    }
    const int ca = threadIdx.x % C::A_CPR, ka = 4 * ca;
    float* ad = reinterpret_cast<float*>(stage + C::X_BYTES) + (threadIdx.x / C::A_CPR) * C::BK + 4 * a_chunk_slot(ca);
    const float* as = a + k0;
#pragma unroll
    for (int i = 0; i < A_PER_THREAD; ++i) {
      if (C::A_CHUNKS % kThreads != 0 && int(threadIdx.x) + i * kThreads >= C::A_CHUNKS) break;
      float* d = ad + i * A_ROW_STEP * C::BK;
      if (i < a_rows && ka < k_left) {
        if (a_vec && ka + 4 <= k_left)
          cp_async_16(d, as);
        else
          load_elements<float, 4>(d, as, k_left - ka);
      } else {
        *reinterpret_cast<float4*>(d) = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      as += int64_t(A_ROW_STEP) * p.K;
    }
  }
};

template <typename T, int RC, bool DROPOUT>
__global__ void __launch_bounds__(kThreads, ShrinkCfg<T, RC>::MIN_BLOCKS)
    lowrank_shrink_kernel(const ShrinkArgs p, const bool x_vec, const bool a_vec) {
  using C = ShrinkCfg<T, RC>;
  constexpr int VEC = C::VEC, BK = C::BK;
  extern __shared__ __align__(128) unsigned char smem[];

  // Rank tile fastest, then split, then row block: the rank tiles of one row block run side by side.
  const unsigned r_tiles = unsigned((p.R + RC - 1) / RC);
  const unsigned rest = blockIdx.x / r_tiles;
  const int r0 = int(blockIdx.x % r_tiles) * RC;
  const int split = int(rest % unsigned(p.splits));
  const int64_t m0 = int64_t(rest / unsigned(p.splits)) * kRows;
  const int rows_left = int(p.M - m0), ranks_left = p.R - r0;
  const int steps = (p.K + BK - 1) / BK;
  const int per = (steps + p.splits - 1) / p.splits;  // whole steps per split: splits never share a k-step
  const int s0 = split * per;
  const int nsteps = max(0, min(steps - s0, per));

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kl = lane % kKLanes, rl = lane / kKLanes;
  const int wrow = warp * kWarpRows + rl;  // this thread's rows: wrow + kRowLanes * i
  const bool warp_live = warp * kWarpRows < rows_left;
  DropoutMask mask{};
  if constexpr (DROPOUT) mask = load_dropout_mask(p.drop);

  float acc[kTM][RC];
#pragma unroll
  for (int i = 0; i < kTM; ++i)
#pragma unroll
    for (int r = 0; r < RC; ++r) acc[i][r] = 0.f;

  const StageCopier<T, RC> copier(p, m0, r0, rows_left, ranks_left);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nsteps) copier.copy(smem + s * C::STAGE_BYTES, p, (s0 + s) * BK, x_vec, a_vec);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  for (int t = 0; t < nsteps; ++t) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step t visible to all; every warp is done with the stage about to be refilled
    const int next = t + kStages - 1;
    if (next < nsteps) copier.copy(smem + (next % kStages) * C::STAGE_BYTES, p, (s0 + next) * BK, x_vec, a_vec);
    cp_async_commit();
    if (!warp_live) continue;  // rows past M: decode-sized M leaves most warps here

    const unsigned char* stage = smem + (t % kStages) * C::STAGE_BYTES;
    const T* xs = reinterpret_cast<const T*>(stage);
    const float* as = reinterpret_cast<const float*>(stage + C::X_BYTES);
    uint32_t xw[kTM][4];
#pragma unroll
    for (int i = 0; i < kTM; ++i) {
      const uint4 w4 = *reinterpret_cast<const uint4*>(xs + (wrow + kRowLanes * i) * BK + kl * VEC);
      xw[i][0] = w4.x, xw[i][1] = w4.y, xw[i][2] = w4.z, xw[i][3] = w4.w;
    }
#pragma unroll
    for (int h = 0; h < VEC / 4; ++h) {
      float xf[kTM][4];
#pragma unroll
      for (int i = 0; i < kTM; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) xf[i][j] = unpack_elem<T>(xw[i], 4 * h + j);
        if constexpr (DROPOUT) {
          // Element (m, k) of the logical (M, K) input, whatever ldx is: the index every backend hashes.
          const int64_t row = m0 + wrow + kRowLanes * i;
          const int64_t col = int64_t(s0 + t) * BK + kl * VEC + 4 * h;
#pragma unroll
          for (int j = 0; j < 4; ++j) xf[i][j] = mask.apply_at(xf[i][j], row, col + j, p.K);
        }
      }
      const float* arow = as + 4 * a_chunk_slot(kl * (VEC / 4) + h);
#pragma unroll
      for (int r = 0; r < RC; ++r) {
        const float4 a4 = *reinterpret_cast<const float4*>(arow + r * BK);
#pragma unroll
        for (int i = 0; i < kTM; ++i) {
          acc[i][r] = fmaf(xf[i][0], a4.x, acc[i][r]);
          acc[i][r] = fmaf(xf[i][1], a4.y, acc[i][r]);
          acc[i][r] = fmaf(xf[i][2], a4.z, acc[i][r]);
          acc[i][r] = fmaf(xf[i][3], a4.w, acc[i][r]);
        }
      }
    }
  }
  cp_async_wait<0>();
  if (!warp_live) return;

  constexpr int ACC = kTM * RC;
  float v[ACC];
#pragma unroll
  for (int n = 0; n < ACC; ++n) v[n] = acc[n / RC][n % RC];
  // Each k-lane pair, quad and octet is summed while halving what a lane holds (fold_lanes): after offsets 4, 2, 1
  // lane kl holds original values [kl * ACC/8, (kl + 1) * ACC/8), each the sum of all 8 k-lanes in a fixed tree.
  fold_lanes<ACC / 2>(v, (kl & 4) != 0, 4);
  fold_lanes<ACC / 4>(v, (kl & 2) != 0, 2);
  fold_lanes<ACC / 8>(v, (kl & 1) != 0, 1);

  // Lane kl now holds columns (kl % 2) * RC/2 .. + RC/2 of its row kl / 2 (ACC/8 = RC/2 values).
  const int row = wrow + kRowLanes * (kl / 2);
  if (row >= rows_left) return;
  const int64_t gm = m0 + row;
  const int c0 = (kl & 1) * (RC / 2);
  if (p.splits > 1) {
    float* dst = p.partial + (int64_t(split) * p.M + gm) * p.R + r0;
#pragma unroll
    for (int q = 0; q < RC / 2; ++q)
      if (c0 + q < ranks_left) dst[c0 + q] = v[q];
  } else {
    float* hd = p.h + gm * p.R + r0;
    T* sdst = static_cast<T*>(p.s) + gm * p.R + r0;
#pragma unroll
    for (int q = 0; q < RC / 2; ++q) {
      if (c0 + q < ranks_left) {
        hd[c0 + q] = v[q];
        sdst[c0 + q] = from_float<T>(v[q] * p.sd[r0 + c0 + q]);
      }
    }
  }
}

// H = the fixed-order sum of the split slices, S = H * sd, for split launches.
template <typename T>
__global__ void __launch_bounds__(256) lowrank_shrink_finish_kernel(const ShrinkArgs p) {
  const int64_t n = int64_t(p.M) * p.R;
  T* s = static_cast<T*>(p.s);
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const float h = sum_partials_at(p.partial, p.splits, n, e);
    p.h[e] = h;
    s[e] = from_float<T>(h * p.sd[e % p.R]);
  }
}

// Opts the kernel into its dynamic shared memory (above the 48 KB default) once per device and returns how many of
// its blocks one SM holds.
template <typename T, int RC, bool DROPOUT>
int prepare_kernel() {
  using C = ShrinkCfg<T, RC>;
  static std::atomic<int> cache[kMaxDevices];
  const int dev = current_device();
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached) {
    const int b = cache[dev].load(std::memory_order_relaxed);
    if (b > 0) return b;
  }
  auto kernel = lowrank_shrink_kernel<T, RC, DROPOUT>;
  KASA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM_BYTES));
  int b = 0;
  KASA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, kernel, kThreads, C::SMEM_BYTES));
  b = b < 1 ? 1 : b;  // 0 means the launch itself will fail, and KASA_CHECK_LAUNCH will say why
  if (cached) cache[dev].store(b, std::memory_order_relaxed);
  return b;
}

template <typename T, int RC>
int splits_for(int M, int K, int R) {
  using C = ShrinkCfg<T, RC>;
  if (M <= 0 || K <= 0 || R <= 0) return 1;
  const int64_t steps = (int64_t(K) + C::BK - 1) / C::BK;
  const int64_t blocks = int64_t(ceil_div(M, kRows)) * ceil_div(R, RC);
  const int64_t slots = int64_t(device_sm_count()) * prepare_kernel<T, RC, false>();
  int64_t s = slots / blocks;  // as many splits as keep the grid within one wave of resident blocks
  s = std::min<int64_t>(s, steps / kMinStepsPerSplit);
  // The workspace is written and read once (8 s M R bytes): keep that under half of what reading x costs.
  s = std::min<int64_t>(s, int64_t(K) * int64_t(sizeof(T)) / (16 * int64_t(R)));
  s = std::min<int64_t>(s, kMaxSplits);
  if (s <= 1) return 1;
  const int64_t per = (steps + s - 1) / s;
  return int((steps + per - 1) / per);  // the kernel gives each split `per` steps: no split is left empty
}

template <typename T>
int splits_t(int M, int K, int R) {
  if (R <= 8) return splits_for<T, 8>(M, K, R);
  if (R <= 16) return splits_for<T, 16>(M, K, R);
  return splits_for<T, 32>(M, K, R);
}

template <typename T, int RC, bool DROPOUT>
void launch_rc(const ShrinkArgs& a, cudaStream_t stream) {
  using C = ShrinkCfg<T, RC>;
  const int64_t blocks = int64_t(ceil_div(a.M, kRows)) * a.splits * ceil_div(a.R, RC);
  if (blocks > INT_MAX) throw std::runtime_error("kasa_kernels: lowrank_shrink: M * r too large for one launch");
  prepare_kernel<T, RC, DROPOUT>();
  // One row has no stride to misalign it: decode with a ragged K (M = 1, K = 4099) keeps 16-byte loads.
  const bool x_vec = a.M == 1 ? reinterpret_cast<uintptr_t>(a.x) % 16 == 0
                              : rows_are_16b_aligned(a.x, a.ldx, int(sizeof(T)));
  const bool a_vec = a.R == 1 ? reinterpret_cast<uintptr_t>(a.a) % 16 == 0 : rows_are_16b_aligned(a.a, a.K, 4);
  lowrank_shrink_kernel<T, RC, DROPOUT><<<unsigned(blocks), kThreads, C::SMEM_BYTES, stream>>>(a, x_vec, a_vec);
  KASA_CHECK_LAUNCH(DROPOUT ? "lowrank_shrink_dropout_kernel" : "lowrank_shrink_kernel");
  if (a.splits > 1) {
    const int64_t n = int64_t(a.M) * a.R;
    const int64_t fb = std::min<int64_t>((n + 255) / 256, 4096);
    lowrank_shrink_finish_kernel<T><<<unsigned(fb), 256, 0, stream>>>(a);
    KASA_CHECK_LAUNCH("lowrank_shrink_finish_kernel");
  }
}

template <typename T, int RC>
void launch_drop(const ShrinkArgs& a, cudaStream_t stream) {
  if (a.drop.seed != nullptr)
    launch_rc<T, RC, true>(a, stream);
  else
    launch_rc<T, RC, false>(a, stream);
}

template <typename T>
void launch(const ShrinkArgs& a, cudaStream_t stream) {
  if (a.M <= 0 || a.R <= 0) return;
  if (a.splits < 1 || a.splits > kMaxSplits || (a.splits > 1 && a.partial == nullptr))
    throw std::runtime_error("kasa_kernels: lowrank_shrink: splits must be in [1, 64], with a workspace when > 1");
  if (a.R <= 8) return launch_drop<T, 8>(a, stream);
  if (a.R <= 16) return launch_drop<T, 16>(a, stream);
  return launch_drop<T, 32>(a, stream);
}

}  // namespace

int lowrank_shrink_splits(DType dt, int M, int K, int R) {
  switch (dt) {
    case DType::kF32: return splits_t<float>(M, K, R);
    case DType::kF16: return splits_t<__half>(M, K, R);
    case DType::kBF16: return splits_t<__nv_bfloat16>(M, K, R);
  }
  throw std::runtime_error("kasa_kernels: lowrank_shrink_splits: unsupported dtype");
}

void lowrank_shrink(DType dt, const ShrinkArgs& args, cudaStream_t stream) {
  switch (dt) {
    case DType::kF32: return launch<float>(args, stream);
    case DType::kF16: return launch<__half>(args, stream);
    case DType::kBF16: return launch<__nv_bfloat16>(args, stream);
  }
  throw std::runtime_error("kasa_kernels: lowrank_shrink: unsupported dtype");
}

}  // namespace kasa
