// The base GEMM with the rank-R adapter term fused into the same kernel (docs/design.md, "The fused kernel plan"):
//
//   forward  (B_KMAJOR = true):   out = x w^T + lx lw^T + bias     x (M,K) w (N,K) lx = S (M,R) lw = B (N,R)
//   backward (B_KMAJOR = false):  out = x w + drop(lx lw)          x = G (M,N') w = W (N',K') lx = gH lw = A
//
// The rank-R product is ceil(R / BK) extra k-tiles of the same pipeline and accumulators, run first: a rank-R
// prologue. With dropout in backward (MASK_LR) the mask is elementwise on the rank-R product only, so once those
// k-tiles are done every lane masks its accumulators in place (it knows each one's (row, column) from the mma
// fragment layout) and the main k-tiles add x w on top. No M x N tensor is ever materialized or re-read.
//
// Structure (csrc/README.md has the reasoning and the shared-memory budget per architecture):
// - mma.sync tensor cores: m16n8k16 for fp16/bf16, m16n8k8 TF32 for fp32 (operands rounded by cvt.rna.tf32), fp32
//   accumulation; plain FFMA for fp32 with TF32 off, on the same accumulator layout and epilogue.
// - Operands reach registers by ldmatrix (.x4; .trans for the backward's N-major w) from shared memory whose 128-byte
//   k-rows are XOR-swizzled in 16-byte chunks, so the eight row addresses of one 8x8 matrix hit eight different
//   bank groups. The TF32 backward's w fragments are 32-bit LDS: ldmatrix cannot transpose 32-bit elements.
// - A STAGES-deep cp.async pipeline; chunks that cross a matrix edge, and rows past it, are zero-filled by cp.async
//   itself (src-size operand). Rows that are not 16-byte aligned fall back to element loads with zero fill.
// - Blocks are launched in groups of GROUP_M row tiles that sweep the column tiles together, so a wave of blocks
//   shares its x rows and w columns in L2.
// - The epilogue adds the bias in registers, stages the tile in shared memory in the output dtype and writes it out
//   in 16-byte rows.
#pragma once

#include <climits>

#include "kasa_common.cuh"

// Whether this compilation holds the wide tile's kernel bodies: only sm80/sm87 have the shared memory it needs
// (sm86/sm89 blocks may use 99 KB), so other architectures skip compiling them, and the host never picks them there.
// PTX built for compute_80 keeps them (sm80 devices JIT-compiling it still need them).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870
#define KASA_GEMM_WIDE_TILES 1
#else
#define KASA_GEMM_WIDE_TILES 0
#endif

namespace kasa {
namespace gemm {

enum class Math { kTensorCore16, kTF32, kFFMA };

// Tile configurations: block BM x BN, warp WM x WN, STAGES k-tiles of 128 bytes per row in flight. Both use 8 warps.
// Wide: A100 (sm80) and Orin (sm87) allow 163 KB of shared memory per block: 3 x (128 + 256) x 128 B = 144 KB, and
//   64 x 64 warp tiles (8 ldmatrix.x4 feed 32 mma per k16 step).
// Narrow: sm86/sm89 allow 99 KB per block: 3 x (128 + 128) x 128 B = 96 KB, 64 x 32 warp tiles; also used on sm90
//   and anything newer (see csrc/README.md for why Hopper does not get a tile of its own).
struct TileWide {
  static constexpr bool kWide = true;
  static constexpr int BM = 128, BN = 256, WM = 64, WN = 64, STAGES = 3;
};
struct TileNarrow {
  static constexpr bool kWide = false;
  static constexpr int BM = 128, BN = 128, WM = 64, WN = 32, STAGES = 3;
};
constexpr int GROUP_M = 8;  // row tiles per launch-order group (L2 reuse)

template <typename T, class Cfg>
struct Geometry {
  static constexpr int ES = int(sizeof(T));
  static constexpr int EPC = 16 / ES;            // elements per 16-byte chunk
  static constexpr int BK = 128 / ES;            // k per tile: one 128-byte row (8 chunks)
  static constexpr int KSTEP = 32 / ES;          // k per mma step: two chunks (k16 for 16-bit, k8 for TF32)
  static constexpr int KSTEPS = BK / KSTEP;      // 4
  static constexpr int WARPS_M = Cfg::BM / Cfg::WM, WARPS_N = Cfg::BN / Cfg::WN;
  static constexpr int NT = WARPS_M * WARPS_N * 32;
  static constexpr int FM = Cfg::WM / 16;        // m16 tiles per warp
  static constexpr int FN = Cfg::WN / 8;         // n8 tiles per warp
  static constexpr int A_BYTES = Cfg::BM * 128;
  static constexpr int B_BYTES = Cfg::BN * 128;  // BN rows of 128 B (forward) or BK rows of BN elements (backward)
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
  static constexpr int PIPE_BYTES = Cfg::STAGES * STAGE_BYTES;
  static constexpr int EPI_LD = Cfg::BN + EPC;   // staged output row, padded by 16 bytes against bank conflicts
  static constexpr int EPI_BYTES = Cfg::BM * EPI_LD * ES;
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert(FN % 2 == 0, "B fragments are loaded two n8 tiles per ldmatrix.x4");
  static_assert(NT == 256, "the copy loops assume 256 threads");
};

// Byte offset of 16-byte chunk c of row r in a tile of `rows` rows stored as 128-byte panels (chunks 8p .. 8p+7 of
// every row form panel p): the chunk's slot within its row is XORed with r % 8, so 8 consecutive rows' chunk c sit
// in 8 different 16-byte bank groups (ldmatrix and the epilogue-free copies are conflict-free).
__device__ __forceinline__ int swz(int rows, int r, int c) {
  return (c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4);
}

struct VecFlags { bool x, w, lx, lw, out; };

// ROWS x (CHUNKS 16-byte chunks) of the row-major matrix src (row stride ld elements; rows < row_lim and columns
// < col_lim exist) starting at (row0, col0) into the swizzled tile at dst. Out-of-range elements become zero.
template <typename T, int ROWS, int CHUNKS, int NT>
__device__ __forceinline__ void load_tile(unsigned char* dst, const T* src, int64_t ld, int row0, int col0,
                                          int row_lim, int col_lim, bool vec) {
  constexpr int EPC = 16 / int(sizeof(T));
  static_assert((ROWS * CHUNKS) % NT == 0, "the tile must split evenly over the block");
#pragma unroll
  for (int i = 0; i < ROWS * CHUNKS / NT; ++i) {
    const int idx = i * NT + int(threadIdx.x);
    const int r = idx / CHUNKS, c = idx % CHUNKS;
    const int gr = row0 + r, gc = col0 + c * EPC;
    copy_chunk(dst + swz(ROWS, r, c), src + int64_t(gr) * ld + gc, src, gr < row_lim, col_lim - gc, vec);
  }
}

// Accumulators of one warp: FM x FN m16n8 tiles, 4 floats per lane each (rows g, g+8; columns 2t, 2t+1).
template <class G> struct Acc { float v[G::FM][G::FN][4]; };

// One k-tile of the warp's accumulators from a pipeline stage. sa: A tile (BM rows x 128 B); sb: B tile.
template <typename T, Math MATH, class Cfg, bool B_KMAJOR>
__device__ __forceinline__ void mma_tile(Acc<Geometry<T, Cfg>>& acc, const unsigned char* sa,
                                         const unsigned char* sb, int wm0, int wn0, int lane) {
  using G = Geometry<T, Cfg>;
  const int g = lane >> 2, t = lane & 3;
  if constexpr (MATH == Math::kFFMA) {
    // Exact fp32 (allow_tf32 off): each lane computes its own accumulator elements, one k at a time.
#pragma unroll 2
    for (int k = 0; k < G::BK; ++k) {
      float av[G::FM][2];
#pragma unroll
      for (int i = 0; i < G::FM; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int r = wm0 + i * 16 + g + 8 * h;
          av[i][h] = *reinterpret_cast<const float*>(sa + swz(Cfg::BM, r, k >> 2) + (k & 3) * 4);
        }
#pragma unroll
      for (int j = 0; j < G::FN; ++j) {
        const int n = wn0 + j * 8 + 2 * t;
        float bv[2];
        if constexpr (B_KMAJOR) {
          bv[0] = *reinterpret_cast<const float*>(sb + swz(Cfg::BN, n, k >> 2) + (k & 3) * 4);
          bv[1] = *reinterpret_cast<const float*>(sb + swz(Cfg::BN, n + 1, k >> 2) + (k & 3) * 4);
        } else {
          const float2 b2 = *reinterpret_cast<const float2*>(sb + swz(G::BK, k, n >> 2) + (n & 3) * 4);
          bv[0] = b2.x;
          bv[1] = b2.y;
        }
#pragma unroll
        for (int i = 0; i < G::FM; ++i)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc.v[i][j][e] = fmaf(av[i][e >> 1], bv[e & 1], acc.v[i][j][e]);
      }
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < G::KSTEPS; ++ks) {
      uint32_t a[G::FM][4], b[G::FN][2];
      // A: ldmatrix.x4 over a 16 x 2-chunk block; lanes 0-15 address rows 0-15 of the low chunk, 16-31 the high.
#pragma unroll
      for (int i = 0; i < G::FM; ++i)
        ldmatrix<4, false>(a[i], sa + swz(Cfg::BM, wm0 + i * 16 + (lane & 15), 2 * ks + (lane >> 4)));
      if constexpr (B_KMAJOR) {
        // B stored n-major (w is N x K): one x4 covers n8 tiles j, j+1 (lanes 16-31) at both k chunks (lane bit 3).
#pragma unroll
        for (int j = 0; j < G::FN; j += 2) {
          uint32_t r[4];
          ldmatrix<4, false>(r, sb + swz(Cfg::BN, wn0 + j * 8 + ((lane >> 4) << 3) + (lane & 7),
                                         2 * ks + ((lane >> 3) & 1)));
          b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
        }
      } else if constexpr (MATH == Math::kTensorCore16) {
        // B stored k-major (W is K' x N'): .trans turns 8 k-rows of 8 n into the column fragment; lanes 0-15
        // address k rows 0-15 of n8 tile j, lanes 16-31 those of tile j + 1.
#pragma unroll
        for (int j = 0; j < G::FN; j += 2) {
          uint32_t r[4];
          ldmatrix<4, true>(r, sb + swz(G::BK, ks * G::KSTEP + (lane & 15), (wn0 + j * 8) / G::EPC + (lane >> 4)));
          b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
        }
      } else {
        // TF32, k-major B: b[0] = B[t][g], b[1] = B[t + 4][g] as plain 32-bit shared loads.
#pragma unroll
        for (int j = 0; j < G::FN; ++j) {
          const int n = wn0 + j * 8 + g, k = ks * G::KSTEP + t;
          b[j][0] = *reinterpret_cast<const uint32_t*>(sb + swz(G::BK, k, n >> 2) + (n & 3) * 4);
          b[j][1] = *reinterpret_cast<const uint32_t*>(sb + swz(G::BK, k + 4, n >> 2) + (n & 3) * 4);
        }
      }
      if constexpr (MATH == Math::kTF32) {
        // The fragments hold fp32 bit patterns; TF32 mma takes them rounded (nearest, ties away), as cuBLAS does.
#pragma unroll
        for (int i = 0; i < G::FM; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) a[i][q] = tf32_bits(__uint_as_float(a[i][q]));
#pragma unroll
        for (int j = 0; j < G::FN; ++j)
#pragma unroll
          for (int q = 0; q < 2; ++q) b[j][q] = tf32_bits(__uint_as_float(b[j][q]));
      }
#pragma unroll
      for (int i = 0; i < G::FM; ++i)
#pragma unroll
        for (int j = 0; j < G::FN; ++j) {
          if constexpr (MATH == Math::kTF32)
            mma_1688_tf32(acc.v[i][j], a[i], b[j]);
          else
            mma_16816<T>(acc.v[i][j], a[i], b[j]);
        }
    }
  }
}

template <typename T, Math MATH, class Cfg, bool B_KMAJOR, bool MASK_LR>
__device__ __forceinline__ void gemm_body(const GemmLowrankArgs& p, const VecFlags& vf, unsigned char* smem) {
  using G = Geometry<T, Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = G::BK, STAGES = Cfg::STAGES;
  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* lx = static_cast<const T*>(p.lx);
  const T* lw = static_cast<const T*>(p.lw);
  const int M = p.M, N = p.N, K = p.K, R = p.R;

  // Grouped launch order: GROUP_M consecutive row tiles walk the column tiles side by side.
  const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
  const int pid = int(blockIdx.x), width = GROUP_M * tiles_n;
  const int first_m = (pid / width) * GROUP_M;
  const int group_rows = min(tiles_m - first_m, GROUP_M);
  const int m0 = (first_m + (pid % width) % group_rows) * BM;
  const int n0 = ((pid % width) / group_rows) * BN;

  const int warp = int(threadIdx.x) >> 5, lane = int(threadIdx.x) & 31;
  const int wm0 = (warp / G::WARPS_N) * Cfg::WM, wn0 = (warp % G::WARPS_N) * Cfg::WN;
  const int g = lane >> 2, t = lane & 3;
  const int kt_lr = (R + BK - 1) / BK;  // the rank-R k-tiles come first
  const int kt_total = kt_lr + (K + BK - 1) / BK;

  auto load_stage = [&](int stage, int kt) {
    unsigned char* sa = smem + stage * G::STAGE_BYTES;
    unsigned char* sb = sa + G::A_BYTES;
    const bool lr = kt < kt_lr;
    const int k0 = (lr ? kt : kt - kt_lr) * BK, kext = lr ? R : K;
    load_tile<T, BM, 8, G::NT>(sa, lr ? lx : x, lr ? p.ldlx : p.ldx, m0, k0, M, kext, lr ? vf.lx : vf.x);
    if constexpr (B_KMAJOR)
      load_tile<T, BN, 8, G::NT>(sb, lr ? lw : w, lr ? p.ldlw : p.ldw, n0, k0, N, kext, lr ? vf.lw : vf.w);
    else
      load_tile<T, BK, BN / G::EPC, G::NT>(sb, lr ? lw : w, lr ? p.ldlw : p.ldw, k0, n0, kext, N,
                                           lr ? vf.lw : vf.w);
  };

  Acc<G> acc;
#pragma unroll
  for (int i = 0; i < G::FM; ++i)
#pragma unroll
    for (int j = 0; j < G::FN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc.v[i][j][e] = 0.f;

  pipeline_prologue<STAGES>(kt_total, load_stage);
  auto step = [&](int kt) {
    pipeline_advance<STAGES>(kt, kt_total, load_stage);
    const unsigned char* sa = smem + (kt % STAGES) * G::STAGE_BYTES;
    mma_tile<T, MATH, Cfg, B_KMAJOR>(acc, sa, sa + G::A_BYTES, wm0, wn0, lane);
  };
  int kt = 0;
  if constexpr (MASK_LR) {
    // The rank-R k-tiles in a loop of their own, so that masking (a hash per accumulator) does not sit inside the
    // main loop and add its registers to that loop's.
    for (; kt < kt_lr; ++kt) step(kt);
    // The rank-R product is complete: drop(.) it in place before the main k-tiles accumulate on top.
    const DropoutMask mask = load_dropout_mask(p.drop);
#pragma unroll
    for (int i = 0; i < G::FM; ++i)
#pragma unroll
      for (int j = 0; j < G::FN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int gm = m0 + wm0 + i * 16 + g + 8 * (e >> 1), gn = n0 + wn0 + j * 8 + 2 * t + (e & 1);
          if (gm < M && gn < N) acc.v[i][j][e] = mask.apply_at(acc.v[i][j][e], gm, gn, N);
        }
  }
  for (; kt < kt_total; ++kt) step(kt);
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory becomes the epilogue's staging tile

  // Epilogue: bias in fp32, one rounding to T, staged as a BM x BN tile, written out in 16-byte rows.
  const T* bias = static_cast<const T*>(p.bias);
  T* st = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int j = 0; j < G::FN; ++j) {
    const int c = wn0 + j * 8 + 2 * t;
    float bv[2] = {0.f, 0.f};
    if (bias != nullptr) {
#pragma unroll
      for (int q = 0; q < 2; ++q)
        if (n0 + c + q < N) bv[q] = to_float(bias[n0 + c + q]);
    }
#pragma unroll
    for (int i = 0; i < G::FM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h)
        store_pair(st + (wm0 + i * 16 + g + 8 * h) * G::EPI_LD + c, acc.v[i][j][2 * h] + bv[0],
                   acc.v[i][j][2 * h + 1] + bv[1]);
  }
  __syncthreads();
  T* out = static_cast<T*>(p.out);
  constexpr int CPR = BN / G::EPC;
#pragma unroll 4
  for (int idx = int(threadIdx.x); idx < BM * CPR; idx += G::NT) {
    const int r = idx / CPR, c = (idx % CPR) * G::EPC;
    const int gm = m0 + r, gn = n0 + c;
    if (gm >= M || gn >= N) continue;
    const T* s = st + r * G::EPI_LD + c;
    T* o = out + int64_t(gm) * p.ldo + gn;
    if (vf.out && gn + G::EPC <= N) {
      *reinterpret_cast<uint4*>(o) = *reinterpret_cast<const uint4*>(s);
    } else {
      for (int v = 0; v < G::EPC && gn + v < N; ++v) o[v] = s[v];
    }
  }
}

template <typename T, Math MATH, class Cfg, bool B_KMAJOR, bool MASK_LR>
__global__ void __launch_bounds__(256, 1) gemm_lowrank_kernel(const GemmLowrankArgs p, const VecFlags vf) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  if constexpr (Cfg::kWide && !KASA_GEMM_WIDE_TILES) {
    __trap();  // not compiled for this architecture; gemm::use_wide never picks it here
  } else {
    gemm_body<T, MATH, Cfg, B_KMAJOR, MASK_LR>(p, vf, smem_raw);
  }
}

// The wide tile on devices that have its shared memory (sm80, sm87); the narrow one everywhere else.
inline bool use_wide(int smem_bytes) {
  const int cc = device_capability();
  return (cc == 80 || cc == 87) && device_smem_optin() >= smem_bytes;
}

template <typename T, Math MATH, class Cfg, bool B_KMAJOR, bool MASK_LR>
void launch_cfg(const GemmLowrankArgs& a, cudaStream_t stream, const char* name) {
  using G = Geometry<T, Cfg>;
  auto kernel = gemm_lowrank_kernel<T, MATH, Cfg, B_KMAJOR, MASK_LR>;
  const int es = int(sizeof(T));
  VecFlags vf;
  vf.x = rows_are_16b_aligned(a.x, a.ldx, es);
  vf.w = rows_are_16b_aligned(a.w, a.ldw, es);
  vf.lx = rows_are_16b_aligned(a.lx, a.ldlx, es);
  vf.lw = rows_are_16b_aligned(a.lw, a.ldlw, es);
  vf.out = rows_are_16b_aligned(a.out, a.ldo, es);
  const int64_t blocks = int64_t(ceil_div(a.M, Cfg::BM)) * ceil_div(a.N, Cfg::BN);
  if (blocks > INT_MAX) throw std::runtime_error(std::string("kasa_kernels: ") + name + ": M x N too large");
  opt_in_dynamic_smem(kernel, G::SMEM_BYTES);
  kernel<<<unsigned(blocks), G::NT, G::SMEM_BYTES, stream>>>(a, vf);
  KASA_CHECK_LAUNCH(name);
}

template <typename T, Math MATH, bool B_KMAJOR, bool MASK_LR>
void launch(const GemmLowrankArgs& a, cudaStream_t stream, const char* name) {
  if (use_wide(Geometry<T, TileWide>::SMEM_BYTES))
    launch_cfg<T, MATH, TileWide, B_KMAJOR, MASK_LR>(a, stream, name);
  else
    launch_cfg<T, MATH, TileNarrow, B_KMAJOR, MASK_LR>(a, stream, name);
}

// Forward, backward without dropout, backward with dropout: the three variants every dtype needs.
template <typename T, Math MATH>
void dispatch(bool forward, const GemmLowrankArgs& a, cudaStream_t stream, const char* name) {
  if (a.M <= 0 || a.N <= 0) return;
  if (forward)
    launch<T, MATH, true, false>(a, stream, name);
  else if (a.drop.seed != nullptr && a.R > 0)
    launch<T, MATH, false, true>(a, stream, name);
  else
    launch<T, MATH, false, false>(a, stream, name);
}

}  // namespace gemm
}  // namespace kasa
