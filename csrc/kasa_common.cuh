// Device helpers shared by every kernel: dtype conversion, the dropout hash, the PTX wrappers (cp.async, ldmatrix,
// mma.sync), launch checks.
#pragma once

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

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

// ---- PTX wrappers: cp.async, ldmatrix, mma.sync, cvt.tf32 -------------------------------------------------------
// tests/cuda_emu/emu_ptx.h replaces this section (up to its end marker) in the CPU emulation, which implements each
// instruction's semantics and fragment layout from the PTX ISA. Kernels reach these instructions only through here.

__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

// Asynchronous 16-byte global -> shared copy (sm80+), so the next tiles load while the math units work.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
}
// The same copy reading only the first src_bytes (0..16) and zero-filling the rest: chunks that cross a matrix edge
// and rows past it stay asynchronous (src_bytes = 0 reads nothing; gmem_src must still be a valid address).
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
// The 4-byte form keeps fp32 rows that are not 16-byte aligned (K not a multiple of 4) asynchronous too.
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N of this thread's committed groups are still in flight.
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16: N 8x8 matrices of 16-bit elements, one 16-byte row per address.
// Lane 8 i + j gives the address of row j of matrix i (lanes past 8 N are ignored); lane l receives in r[i] the
// elements (l / 4, 2 (l % 4)) and (l / 4, 2 (l % 4) + 1) of matrix i, or with TRANS those of its transpose.
template <int N, bool TRANS>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const unsigned a = smem_addr(row);
  if constexpr (N == 1 && !TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  else if constexpr (N == 1)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
  else if constexpr (N == 2 && !TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (N == 2)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
  else if constexpr (!TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}

// d = a b + d on tensor cores, fp32 accumulation, one warp: mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.
// Fragments (g = lane / 4, t = lane % 4; each 32-bit register holds two 16-bit elements, the lower column first):
//   a[0] = A[g][2t..2t+1]  a[1] = A[g+8][2t..]  a[2] = A[g][2t+8..]  a[3] = A[g+8][2t+8..]      A is 16 x 16
//   b[0] = B[2t..2t+1][g]  b[1] = B[2t+8..][g]                                                   B is 16 x 8
//   d[0..1] = D[g][2t..2t+1]  d[2..3] = D[g+8][2t..2t+1]                                         D is 16 x 8
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d = a b + d with TF32 operands (one fp32 bit pattern per register, rounded by tf32_bits first):
// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32. Fragments:
//   a[0] = A[g][t]  a[1] = A[g+8][t]  a[2] = A[g][t+4]  a[3] = A[g+8][t+4]                     A is 16 x 8
//   b[0] = B[t][g]  b[1] = B[t+4][g]                                                            B is 8 x 8
//   d as for m16n8k16.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
               "{%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// cvt.rna.tf32.f32: fp32 rounded to TF32 (nearest, ties away from zero), as the bit pattern mma_1688_tf32 takes.
__device__ __forceinline__ uint32_t tf32_bits(float v) {
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(u) : "f"(v));
  return u;
}
// ---- end of PTX wrappers ------------------------------------------------------------------------------------------

// One 16-byte chunk of a row-major matrix into shared memory at dst: `left` of its elements exist (<= 0: none), and
// none does when row_ok is false (a row past the matrix); the rest are zero. vec (the row is 16-byte aligned):
// cp.async, zero-filling by src-size; base is any 16-byte aligned address of the matrix, named when nothing is read.
// Otherwise element loads with zero fill (odd strides).
template <typename T>
__device__ __forceinline__ void copy_chunk(void* dst, const T* src, const void* base, bool row_ok, int left, bool vec) {
  constexpr int EPC = 16 / int(sizeof(T));
  if (vec) {
    const int bytes = row_ok && left > 0 ? (left >= EPC ? 16 : left * int(sizeof(T))) : 0;
    cp_async_16_zfill(dst, bytes > 0 ? static_cast<const void*>(src) : base, bytes);
  } else {
    T* e = static_cast<T*>(dst);
#pragma unroll
    for (int v = 0; v < EPC; ++v) e[v] = (row_ok && v < left) ? src[v] : zero_value<T>();
  }
}

// A ring of STAGES cp.async buffers over `steps` tiles; load(stage, step) issues the copies of tile `step` into buffer
// `stage`. The prologue issues tiles 0 .. STAGES - 2, one commit group each (empty groups keep the wait counts
// uniform near the end).
template <int STAGES, class Load>
__device__ __forceinline__ void pipeline_prologue(int steps, Load&& load) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();
  }
}
// Before computing on tile s (in buffer s % STAGES): waits until it has landed, makes it visible to the whole block
// (which also means every warp is done with the buffer about to be refilled), and issues tile s + STAGES - 1.
template <int STAGES, class Load>
__device__ __forceinline__ void pipeline_advance(int s, int steps, Load&& load) {
  cp_async_wait<STAGES - 2>();
  __syncthreads();
  if (s + STAGES - 1 < steps) load((s + STAGES - 1) % STAGES, s + STAGES - 1);
  cp_async_commit();
}

// 16-byte vector access is legal when the base is 16-byte aligned and every row starts on a 16-byte boundary.
inline bool rows_are_16b_aligned(const void* p, int64_t ld, int elem_size) {
  return p != nullptr && (reinterpret_cast<uintptr_t>(p) % 16 == 0) && ((ld * elem_size) % 16 == 0);
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Properties of the current device, queried once per device (kasa_device.cu): the launchers' heuristics read them on
// every call.
int current_device();
int device_sm_count();
int device_capability();   // 10 * major + minor, e.g. 86
int device_smem_optin();   // bytes of dynamic shared memory one block may opt into

// Raises `kernel`'s dynamic shared memory limit to `bytes` (needed above 48 KB) once per device.
template <class Kernel>
void opt_in_dynamic_smem(Kernel kernel, int bytes) {
  constexpr int kMaxDevices = 64;
  static std::atomic<bool> done[kMaxDevices];
  const int dev = current_device();
  const bool cached = dev >= 0 && dev < kMaxDevices;
  if (cached && done[dev].load(std::memory_order_relaxed)) return;
  KASA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  if (cached) done[dev].store(true, std::memory_order_relaxed);
}

// Two adjacent elements v0, v1 rounded to T, stored as one 4-byte (16-bit T) or 8-byte (fp32) access at o.
template <typename T>
__device__ __forceinline__ void store_pair(T* o, float v0, float v1) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float2*>(o) = make_float2(v0, v1);
  } else {
    const T lo = from_float<T>(v0), hi = from_float<T>(v1);
    uint32_t u;
    if constexpr (std::is_same_v<T, __half>)
      u = uint32_t(__half_as_ushort(lo)) | (uint32_t(__half_as_ushort(hi)) << 16);
    else
      u = uint32_t(__bfloat16_as_ushort(lo)) | (uint32_t(__bfloat16_as_ushort(hi)) << 16);
    *reinterpret_cast<uint32_t*>(o) = u;
  }
}

// Element e of the sum over `tiles` partial slices of n elements each, slices added in index order: a split
// reduction built on this gives the same bits on every run, whatever order the producing blocks ran in.
__device__ __forceinline__ float sum_partials_at(const float* __restrict__ part, int64_t tiles, int64_t n, int64_t e) {
  float s = 0.f;
  for (int64_t t = 0; t < tiles; ++t) s += part[t * n + e];
  return s;
}

// Element e of 16-bit or fp32 data packed in 32-bit words (as loaded by a vector access), as fp32 (exact).
template <typename T, int N> __device__ __forceinline__ float unpack_elem(const uint32_t (&w)[N], int e) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(w[e]);
  } else {
    const uint32_t u = w[e >> 1];
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
      return __uint_as_float((e & 1) ? (u & 0xffff0000u) : (u << 16));  // bf16 is the upper half of an fp32
    else
      return __half2float(__ushort_as_half(static_cast<unsigned short>((e & 1) ? (u >> 16) : (u & 0xffffu))));
  }
}

// Byte offset of 16-byte chunk c (0..3) of row r in a tile of 64-byte rows, XOR-swizzled: the chunks that 8
// consecutive rows contribute to one ldmatrix, or 4 rows to one 16-byte warp access, fall in different bank groups.
__device__ __forceinline__ int swz64(int r, int c) { return r * 64 + ((c ^ ((r >> 1) & 3)) << 4); }

// 2xTF32: v = hi + lo, both TF32 (hi = rna(v), lo = rna(v - hi)); against an operand that is exact in TF32 (fp16 and
// bf16 values are), the two products carry v to about 2^-24 relative: fp32 accuracy on TF32 tensor cores.
__device__ __forceinline__ void tf32_split(float v, uint32_t& hi, uint32_t& lo) {
  hi = tf32_bits(v);
  lo = tf32_bits(v - __uint_as_float(hi));
}

// The two 16-bit elements of a 32-bit register (lower address in the low half) as fp32 bit patterns: exact, and
// exact in TF32, so they feed mma_1688_tf32 without rounding.
template <typename T>
__device__ __forceinline__ void widen_pair(uint32_t u, uint32_t& lo, uint32_t& hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    lo = u << 16;
    hi = u & 0xffff0000u;
  } else {
    lo = __float_as_uint(__half2float(__ushort_as_half(static_cast<unsigned short>(u & 0xffffu))));
    hi = __float_as_uint(__half2float(__ushort_as_half(static_cast<unsigned short>(u >> 16))));
  }
}

// Whether the rank-r backward kernels (dy_pass, lowrank_da) run their 16-bit inputs on TF32 tensor cores (2xTF32)
// rather than FFMA: where the tensor cores' TF32 rate is several times the FP32 FMA rate (sm80, sm87, sm90 and
// newer). On sm86/sm89 it is the same rate, so 2xTF32 would halve the speed and FFMA stays.
inline bool rank_r_uses_tf32_mma() {
  const int cc = device_capability();
  return cc == 80 || cc == 87 || cc >= 90;
}

// N = 2 or 4 consecutive fp32 from shared memory as one 8- or 16-byte access (p aligned to it).
template <int N> __device__ __forceinline__ void load_floats(float (&v)[N], const float* p) {
  static_assert(N == 2 || N == 4, "8- or 16-byte accesses");
  if constexpr (N == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x, v[1] = t.y;
  }
}

// The FFMA core of the rank-r backward's reductions over rows (dY pass's dB, dA): for rows r = r_first, r_first + 4,
// ... < rows, acc[c * RPL + q] += X[r][col + c] * Y[r][q], X a tile of 64-byte swizzled rows of T (NCW elements = 8
// bytes at column col), Y fp32 rows of ld floats (RPL consecutive from y).
template <typename T, int NCW, int RPL>
__device__ __forceinline__ void accumulate_rows(float (&acc)[NCW * RPL], const unsigned char* xt, int col,
                                                const float* y, int ld, int r_first, int rows) {
  constexpr int EPC = 16 / int(sizeof(T));
  static_assert(NCW * int(sizeof(T)) == 8, "8 bytes of X per row");
#pragma unroll 4
  for (int r = r_first; r < rows; r += 4) {
    const uint2 x2 = *reinterpret_cast<const uint2*>(xt + swz64(r, col / EPC) + (col % EPC) * int(sizeof(T)));
    const uint32_t xw[2] = {x2.x, x2.y};
    float yv[RPL];
    load_floats(yv, y + r * ld);
#pragma unroll
    for (int c = 0; c < NCW; ++c) {
      const float xf = unpack_elem<T>(xw, c);
#pragma unroll
      for (int q = 0; q < RPL; ++q) acc[c * RPL + q] = fmaf(xf, yv[q], acc[c * RPL + q]);
    }
  }
}

// Sum pairs of lanes `offset` apart while halving what each lane holds: the lane whose `offset` bit is set keeps
// the upper HALF values (HALF shuffles instead of 2 HALF for a butterfly). Folding at offsets o1 > o2 > ... leaves
// each lane the slice of values its bits select, summed over the folded lanes in a fixed tree.
template <int HALF, int ACC>
__device__ __forceinline__ void fold_lanes(float (&v)[ACC], bool upper, int offset) {
#pragma unroll
  for (int q = 0; q < HALF; ++q) {
    const float lo = v[q], hi = v[HALF + q];
    v[q] = (upper ? hi : lo) + __shfl_xor_sync(0xffffffffu, upper ? lo : hi, offset);
  }
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
