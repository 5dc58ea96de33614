// The base GEMM with the rank-R adapter term fused into the same kernel (docs/design.md, "The fused kernel plan"):
//
//   forward  (B_KMAJOR = true):   out = x w^T + lx lw^T + bias     x (M,K) w (N,K) lx = S (M,R) lw = B (N,R)
//   backward (B_KMAJOR = false):  out = x w + drop(lx lw)          x = G (M,N') w = W (N',K') lx = gH lw = A
//
// Without dropout the rank-R product is ceil(R / BK) extra k-tiles of the same pipeline and the same accumulator,
// so no M x N tensor is ever rescaled or added to. With dropout in backward (LR_SEPARATE) the mask is elementwise
// on the rank-R product only, so those k-tiles go to a second accumulator that the epilogue masks and adds.
//
// Structure: 128 x 128 block tile, 8 warps of 64 x 32, a 3-stage cp.async pipeline, WMMA tensor-core fragments
// (fp16/bf16 m16n16k16, or TF32 m16n16k8 for fp32) with fp32 accumulation, or plain FFMA for fp32 when TF32 is off.
// Every global access is bounds-checked: 16-byte cp.async only for chunks wholly inside the matrix on aligned
// rows, element loads with zero fill otherwise, so odd shapes (K = 7, N = 37) and strided rows are correct.
#pragma once

#include <type_traits>

#include <mma.h>

#include "kasa_common.cuh"

namespace kasa {
namespace gemm {

enum class Math { kTensorCore16, kTF32, kFFMA };

constexpr int BM = 128, BN = 128, STAGES = 3, NT = 256;
constexpr int WM = 64, WN = 32;               // warp tile
constexpr int WARPS_N = BN / WN;              // 4 (x 2 along M = 8 warps)
constexpr int FM = WM / 16, FN = WN / 16;     // 16 x 16 fragments per warp
static_assert((BM / WM) * WARPS_N * 32 == NT, "warp layout must cover the block tile");

// BK is chosen so a stage stays about 20 KB and three stages fit the 99 KB an sm86 block may use.
template <typename T> struct TileK { static constexpr int BK = 32, PAD = 8; };
template <> struct TileK<float> { static constexpr int BK = 16, PAD = 4; };

template <typename T, bool B_KMAJOR>
struct Smem {
  static constexpr int BK = TileK<T>::BK;
  static constexpr int LDA = BK + TileK<T>::PAD;  // padding staggers rows across banks
  static constexpr int LDB = B_KMAJOR ? BK + TileK<T>::PAD : BN + TileK<T>::PAD;
  static constexpr int A_ELEMS = BM * LDA;
  static constexpr int B_ELEMS = B_KMAJOR ? BN * LDB : BK * LDB;
  static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS;
  static constexpr size_t PIPE_BYTES = size_t(STAGES) * STAGE_ELEMS * sizeof(T);
  static constexpr size_t EPI_BYTES = size_t(NT / 32) * 2 * 256 * sizeof(float);  // two 16x16 fp32 per warp
  static constexpr size_t BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  // WMMA wants 32-byte aligned fragment pointers, cp.async 16-byte aligned rows.
  static_assert((LDA * sizeof(T)) % 16 == 0 && (LDB * sizeof(T)) % 16 == 0, "smem rows must be 16B aligned");
  static_assert((A_ELEMS * sizeof(T)) % 128 == 0 && (STAGE_ELEMS * sizeof(T)) % 128 == 0, "stage alignment");
  static_assert((16 * LDA * sizeof(T)) % 32 == 0 && (8 * LDB * sizeof(T)) % 32 == 0, "fragment alignment");
};

struct VecFlags { bool x, w, lx, lw, out; };

// A ROWS x COLS tile of a row-major matrix (rows < row_lim, cols < col_lim valid) into smem with leading dim LD.
template <typename T, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int row0, int col0, int row_lim,
                                          int col_lim, bool vec) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int CPR = COLS / VEC;
  constexpr int CHUNKS = ROWS * CPR;
  static_assert(COLS % VEC == 0 && CHUNKS % NT == 0, "tile must split evenly over the block");
#pragma unroll
  for (int i = 0; i < CHUNKS / NT; ++i) {
    const int c = i * NT + threadIdx.x;
    const int r = c / CPR, cc = (c % CPR) * VEC;
    const int gr = row0 + r, gc = col0 + cc;
    T* d = dst + r * LD + cc;
    if (vec && gr < row_lim && gc + VEC <= col_lim) {
      cp_async_16(d, src + int64_t(gr) * ld + gc);
    } else {
#pragma unroll
      for (int v = 0; v < VEC; ++v)
        d[v] = (gr < row_lim && gc + v < col_lim) ? src[int64_t(gr) * ld + gc + v] : zero_value<T>();
    }
  }
}

struct FfmaFrag { float v[8]; };  // lane owns row lane/2, columns (lane%2)*8 .. +8 of a 16 x 16 tile

template <typename T, Math MATH> struct AccOf {
  using type = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, MATH == Math::kTF32 ? 8 : 16, float>;
};
template <typename T> struct AccOf<T, Math::kFFMA> { using type = FfmaFrag; };

template <Math MATH, typename Acc>
__device__ __forceinline__ void zero_acc(Acc& a) {
  if constexpr (MATH == Math::kFFMA) {
#pragma unroll
    for (int j = 0; j < 8; ++j) a.v[j] = 0.f;
  } else {
    nvcuda::wmma::fill_fragment(a, 0.f);
  }
}

template <Math MATH, typename Acc>
__device__ __forceinline__ void store_acc(float* scratch, const Acc& a, int lane) {
  if constexpr (MATH == Math::kFFMA) {
    const int r = lane >> 1, c = (lane & 1) * 8;
#pragma unroll
    for (int j = 0; j < 8; ++j) scratch[r * 16 + c + j] = a.v[j];
  } else {
    nvcuda::wmma::store_matrix_sync(scratch, a, 16, nvcuda::wmma::mem_row_major);
  }
}

// One k-tile of the warp's FM x FN fragments from smem stage (sa, sb).
template <typename T, Math MATH, bool B_KMAJOR, typename Acc>
__device__ __forceinline__ void mma_tile(Acc (&acc)[FM][FN], const T* sa, const T* sb, int warp_m, int warp_n,
                                         int lane) {
  using S = Smem<T, B_KMAJOR>;
  namespace wmma = nvcuda::wmma;
  using BLayout = std::conditional_t<B_KMAJOR, wmma::col_major, wmma::row_major>;
  const T* a_base = sa + (warp_m * WM) * S::LDA;
  const T* b_base = B_KMAJOR ? sb + (warp_n * WN) * S::LDB : sb + warp_n * WN;
  if constexpr (MATH == Math::kTensorCore16) {
#pragma unroll
    for (int ks = 0; ks < S::BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> bf[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::load_matrix_sync(af[i], a_base + i * 16 * S::LDA + ks, S::LDA);
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::load_matrix_sync(bf[j], B_KMAJOR ? b_base + j * 16 * S::LDB + ks : b_base + ks * S::LDB + j * 16,
                               S::LDB);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  } else if constexpr (MATH == Math::kTF32) {
#pragma unroll
    for (int ks = 0; ks < S::BK; ks += 8) {
      wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> af[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, BLayout> bf[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        wmma::load_matrix_sync(af[i], a_base + i * 16 * S::LDA + ks, S::LDA);
        // The fragment holds fp32 bit patterns; TF32 mma requires them rounded to TF32 first.
#pragma unroll
        for (int t = 0; t < af[i].num_elements; ++t) af[i].x[t] = wmma::__float_to_tf32(af[i].x[t]);
      }
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::load_matrix_sync(bf[j], B_KMAJOR ? b_base + j * 16 * S::LDB + ks : b_base + ks * S::LDB + j * 16,
                               S::LDB);
#pragma unroll
        for (int t = 0; t < bf[j].num_elements; ++t) bf[j].x[t] = wmma::__float_to_tf32(bf[j].x[t]);
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], af[i], bf[j], acc[i][j]);
    }
  } else {
    // Exact-fp32 fallback (allow_tf32 off): k outermost so each loaded value feeds several FMAs.
    const int r = lane >> 1, c = (lane & 1) * 8;
#pragma unroll 4
    for (int kk = 0; kk < S::BK; ++kk) {
      float av[FM];
#pragma unroll
      for (int i = 0; i < FM; ++i) av[i] = to_float(a_base[(i * 16 + r) * S::LDA + kk]);
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        float bv[8];
#pragma unroll
        for (int t = 0; t < 8; ++t)
          bv[t] = to_float(B_KMAJOR ? b_base[(j * 16 + c + t) * S::LDB + kk] : b_base[kk * S::LDB + j * 16 + c + t]);
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
          for (int t = 0; t < 8; ++t) acc[i][j].v[t] = fmaf(av[i], bv[t], acc[i][j].v[t]);
      }
    }
  }
}

template <typename T, Math MATH, bool B_KMAJOR, bool LR_SEPARATE>
__global__ void __launch_bounds__(NT) gemm_lowrank_kernel(const GemmLowrankArgs p, const VecFlags vf) {
  using S = Smem<T, B_KMAJOR>;
  using Acc = typename AccOf<T, MATH>::type;
  constexpr int BK = S::BK;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const T* x = static_cast<const T*>(p.x);
  const T* w = static_cast<const T*>(p.w);
  const T* lx = static_cast<const T*>(p.lx);
  const T* lw = static_cast<const T*>(p.lw);
  const int M = p.M, N = p.N, K = p.K, R = p.R;
  const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int kt_main = (K + BK - 1) / BK;
  const int kt_total = kt_main + (R + BK - 1) / BK;

  // k-tiles [0, kt_main) read (x, w); the rest read the rank-R operands (lx, lw).
  auto load_stage = [&](int stage, int kt) {
    T* sa = smem + stage * S::STAGE_ELEMS;
    T* sb = sa + S::A_ELEMS;
    const bool lr = kt >= kt_main;
    const int k0 = (lr ? kt - kt_main : kt) * BK;
    const int kext = lr ? R : K;
    load_tile<T, BM, BK, S::LDA>(sa, lr ? lx : x, lr ? p.ldlx : p.ldx, m0, k0, M, kext, lr ? vf.lx : vf.x);
    if constexpr (B_KMAJOR)
      load_tile<T, BN, BK, S::LDB>(sb, lr ? lw : w, lr ? p.ldlw : p.ldw, n0, k0, N, kext, lr ? vf.lw : vf.w);
    else
      load_tile<T, BK, BN, S::LDB>(sb, lr ? lw : w, lr ? p.ldlw : p.ldw, k0, n0, kext, N, lr ? vf.lw : vf.w);
  };

  Acc acc[FM][FN];
  Acc acc_lr[FM][FN];  // only touched when LR_SEPARATE; otherwise eliminated
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      zero_acc<MATH>(acc[i][j]);
      if constexpr (LR_SEPARATE) zero_acc<MATH>(acc_lr[i][j]);
    }

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < kt_total) load_stage(s, s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  for (int kt = 0; kt < kt_total; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile kt visible to all; every warp is done with the stage about to be refilled
    const int next = kt + STAGES - 1;
    if (next < kt_total) load_stage(next % STAGES, next);
    cp_async_commit();
    const T* sa = smem + (kt % STAGES) * S::STAGE_ELEMS;
    const T* sb = sa + S::A_ELEMS;
    if (LR_SEPARATE && kt >= kt_main)
      mma_tile<T, MATH, B_KMAJOR>(acc_lr, sa, sb, warp_m, warp_n, lane);
    else
      mma_tile<T, MATH, B_KMAJOR>(acc, sa, sb, warp_m, warp_n, lane);
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's smem becomes the epilogue's scratch

  // Epilogue: each warp stages one 16 x 16 fragment at a time in its own scratch, where element coordinates are
  // known, then adds bias / the masked rank-R term and stores 8 consecutive outputs per lane.
  float* scratch = reinterpret_cast<float*>(smem_raw) + warp * 512;
  const T* bias = static_cast<const T*>(p.bias);
  T* out = static_cast<T*>(p.out);
  DropoutMask mask{};
  if constexpr (LR_SEPARATE) mask = load_dropout_mask(p.drop);
  const int er = lane >> 1, ec = (lane & 1) * 8;
#pragma unroll
  for (int i = 0; i < FM; ++i) {
#pragma unroll
    for (int j = 0; j < FN; ++j) {
      store_acc<MATH>(scratch, acc[i][j], lane);
      if constexpr (LR_SEPARATE) store_acc<MATH>(scratch + 256, acc_lr[i][j], lane);
      __syncwarp();
      const int gm = m0 + warp_m * WM + i * 16 + er;
      const int gn0 = n0 + warp_n * WN + j * 16 + ec;
      if (gm < M) {
        alignas(16) T vals[8];
#pragma unroll
        for (int t = 0; t < 8; ++t) {
          const int gn = gn0 + t;
          float v = scratch[er * 16 + ec + t];
          if (bias != nullptr && gn < N) v += to_float(bias[gn]);
          if constexpr (LR_SEPARATE) v += mask.apply_at(scratch[256 + er * 16 + ec + t], gm, gn, N);
          vals[t] = from_float<T>(v);
        }
        T* o = out + int64_t(gm) * p.ldo + gn0;
        if (vf.out && gn0 + 8 <= N) {
#pragma unroll
          for (int q = 0; q < int(8 * sizeof(T) / 16); ++q)
            reinterpret_cast<uint4*>(o)[q] = reinterpret_cast<const uint4*>(vals)[q];
        } else {
#pragma unroll
          for (int t = 0; t < 8; ++t)
            if (gn0 + t < N) o[t] = vals[t];
        }
      }
      __syncwarp();  // scratch is reused by the next fragment
    }
  }
}

template <typename T, Math MATH, bool B_KMAJOR, bool LR_SEPARATE>
void launch(const GemmLowrankArgs& a, cudaStream_t stream, const char* name) {
  if (a.M <= 0 || a.N <= 0) return;
  using S = Smem<T, B_KMAJOR>;
  auto kernel = gemm_lowrank_kernel<T, MATH, B_KMAJOR, LR_SEPARATE>;
  const int es = int(sizeof(T));
  VecFlags vf;
  vf.x = rows_are_16b_aligned(a.x, a.ldx, es);
  vf.w = rows_are_16b_aligned(a.w, a.ldw, es);
  vf.lx = rows_are_16b_aligned(a.lx, a.ldlx, es);
  vf.lw = rows_are_16b_aligned(a.lw, a.ldlw, es);
  vf.out = rows_are_16b_aligned(a.out, a.ldo, es);
  const dim3 grid(ceil_div(a.M, BM), ceil_div(a.N, BN));
  if (grid.y > 65535u) throw std::runtime_error(std::string("kasa_kernels: ") + name + ": N too large");
  KASA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(S::BYTES)));
  kernel<<<grid, NT, S::BYTES, stream>>>(a, vf);
  KASA_CHECK_LAUNCH(name);
}

// Forward, backward without dropout, backward with dropout: the three variants every dtype needs.
template <typename T, Math MATH>
void dispatch(bool forward, const GemmLowrankArgs& a, cudaStream_t stream, const char* name) {
  if (forward)
    launch<T, MATH, true, false>(a, stream, name);
  else if (a.drop.seed != nullptr)
    launch<T, MATH, false, true>(a, stream, name);
  else
    launch<T, MATH, false, false>(a, stream, name);
}

}  // namespace gemm
}  // namespace kasa
