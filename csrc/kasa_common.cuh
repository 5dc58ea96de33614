// Device helpers shared by every kernel: dtype conversion, the dropout hash, cp.async, launch checks.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kasa_launch.h"

// Every launch is followed by this: a bad configuration surfaces here, naming the kernel, not at the next sync.
#define KASA_CHECK_LAUNCH(name)                                                                        \
  do {                                                                                                 \
    cudaError_t kasa_err_ = cudaGetLastError();                                                        \
    if (kasa_err_ != cudaSuccess)                                                                      \
      throw std::runtime_error(std::string("kasa_kernels: launch of ") + (name) + " failed: " +        \
                               cudaGetErrorString(kasa_err_) + " (" __FILE__ ":" + std::to_string(__LINE__) + ")"); \
  } while (0)

#define KASA_CUDA_CHECK(expr)                                                                          \
  do {                                                                                                 \
    cudaError_t kasa_err_ = (expr);                                                                    \
    if (kasa_err_ != cudaSuccess)                                                                      \
      throw std::runtime_error(std::string("kasa_kernels: ") + #expr + " failed: " +                   \
                               cudaGetErrorString(kasa_err_) + " (" __FILE__ ":" + std::to_string(__LINE__) + ")"); \
  } while (0)

namespace kasa {

// torch builds with __CUDA_NO_HALF_OPERATORS__ and friends, so conversions go through the intrinsics.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T> __device__ __forceinline__ T zero_value() { return from_float<T>(0.f); }

// Element idx of a tensor whose dtype is only known at run time (the regularizer's mixed parameter list).
__device__ __forceinline__ float load_as_float(const void* p, int64_t idx, int dtype) {
  if (dtype == static_cast<int>(DType::kF16)) return __half2float(static_cast<const __half*>(p)[idx]);
  if (dtype == static_cast<int>(DType::kBF16)) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[idx]);
  return static_cast<const float*>(p)[idx];
}

// The shared dropout mask (kasa_kernels/ops/rng.py): keep element i (row-major index of the logical matrix) iff
// mix32(mix32(lo32(i) ^ s0) ^ hi32(i) ^ s1) >= threshold. Unsigned 32-bit arithmetic wraps as the spec requires.
// The multipliers are rng.py's MIX_MUL1 / MIX_MUL2, passed by every build (setup.py, CMakeLists.txt,
// tests/cuda_emu/build.py) as -D definitions read from that file; the threshold and keep scale arrive as arguments.
#if !defined(KASA_MIX_MUL1) || !defined(KASA_MIX_MUL2)
#error "KASA_MIX_MUL1 and KASA_MIX_MUL2 must be defined by the build (from kasa_kernels/ops/rng.py)"
#endif
__device__ __forceinline__ uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= static_cast<uint32_t>(KASA_MIX_MUL1);
  h ^= h >> 15;
  h *= static_cast<uint32_t>(KASA_MIX_MUL2);
  h ^= h >> 15;
  return h;
}

struct DropoutMask {
  uint32_t s0, s1, threshold;
  float keep_scale;
  __device__ __forceinline__ bool keep(uint64_t i) const {
    return mix32(mix32(static_cast<uint32_t>(i) ^ s0) ^ static_cast<uint32_t>(i >> 32) ^ s1) >= threshold;
  }
  __device__ __forceinline__ float apply(float v, uint64_t i) const { return keep(i) ? v * keep_scale : 0.f; }
  // Element (row, col) of the logical row-major (rows, n_cols) matrix the mask is defined over (x's M x K).
  __device__ __forceinline__ float apply_at(float v, int64_t row, int64_t col, int64_t n_cols) const {
    return apply(v, static_cast<uint64_t>(row) * static_cast<uint64_t>(n_cols) + static_cast<uint64_t>(col));
  }
};

__device__ __forceinline__ DropoutMask load_dropout_mask(const DropoutArgs& d) {
  DropoutMask m;
  // The seed words are < 2**32 by construction (rng.make_seed masks them); the casts keep the low words anyway.
  m.s0 = static_cast<uint32_t>(static_cast<uint64_t>(d.seed[0]));
  m.s1 = static_cast<uint32_t>(static_cast<uint64_t>(d.seed[1]));
  m.threshold = d.threshold;
  m.keep_scale = d.keep_scale;
  return m;
}

// Asynchronous 16-byte global -> shared copy (sm80+), so the next tiles load while tensor cores work.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src));
}
// The 4-byte form keeps fp32 rows that are not 16-byte aligned (K not a multiple of 4) asynchronous too.
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// 16-byte vector access is legal when the base is 16-byte aligned and every row starts on a 16-byte boundary.
inline bool rows_are_16b_aligned(const void* p, int64_t ld, int elem_size) {
  return p != nullptr && (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((ld * elem_size) % 16 == 0);
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

int device_sm_count();

// Element e of the sum over `tiles` partial slices of n elements each, slices added in index order: a split
// reduction built on this gives the same bits on every run, whatever order the producing blocks ran in.
__device__ __forceinline__ float sum_partials_at(const float* __restrict__ part, int64_t tiles, int64_t n, int64_t e) {
  float s = 0.f;
  for (int64_t t = 0; t < tiles; ++t) s += part[t * n + e];
  return s;
}

// Deterministic block-wide sum (fixed shuffle tree, then warp 0 over the warp sums). All threads get the result.
template <int NT>
__device__ __forceinline__ float block_sum(float v, float* scratch /* >= NT/32 floats */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float t = 0.f;
#pragma unroll
  for (int w = 0; w < NT / 32; ++w) t += scratch[w];
  return t;
}

}  // namespace kasa
