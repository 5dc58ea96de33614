// The PTX instructions csrc/ uses, on the CPU: build.py splices this file in place of kasa_common.cuh's section of
// inline-asm wrappers. Each wrapper keeps its csrc signature and implements the instruction's semantics and register
// layout as the PTX ISA states them (sections "cp.async", "ldmatrix", "Matrix Fragments for mma.m16n8k16 with
// floating point type", "Matrix Fragments for mma.m16n8k8" (.tf32), "cvt"); tests/test_cuda_emulation.py checks each
// layout against an independent table in Python (known-answer tests).
//
// The warp-wide instructions (ldmatrix, mma) really exchange registers between the 32 lane threads (emu_cuda.h's
// warp_exchange): a lane contributes only what the hardware takes from it (its row address, its fragment registers)
// and gets back only its own result registers, so a kernel that computes a wrong lane address, or reads a fragment
// register as if it held another element, gets wrong numbers here as it would on a GPU.
#pragma once
#include "emu_cuda.h"

inline unsigned smem_addr(const void* p) { return unsigned(reinterpret_cast<uintptr_t>(p)); }

// ---- cp.async (deferred until its group is retired, see emu_cuda.h) ----
inline void cp_async_16(void* smem_dst, const void* gmem_src) { ::emu::cp_async(smem_dst, gmem_src, 16, 16); }
inline void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  ::emu::cp_async(smem_dst, gmem_src, 16, src_bytes);
}
inline void cp_async_4(void* smem_dst, const void* gmem_src) { ::emu::cp_async(smem_dst, gmem_src, 4, 4); }
inline void cp_async_commit() { ::emu::cp_commit(); }
template <int N> inline void cp_async_wait() { ::emu::cp_wait(N); }

// ---- ldmatrix.sync.aligned.m8n8.xN[.trans].shared.b16 ----
// Lane 8 i + j supplies the address of row j (16 bytes, 16-byte aligned, in shared memory) of matrix i < N; the
// addresses of lanes >= 8 N are not used (and not dereferenced here). Lane l receives in r[i] the two 16-bit
// elements (row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1) of matrix i, the lower column in the lower half; with
// .trans, those of the transposed matrix: (rows 2 (l % 4) and 2 (l % 4) + 1, column l / 4).
template <int N, bool TRANS>
void ldmatrix(uint32_t (&r)[N], const void* row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const unsigned l = ::emu::lane_id();
  if (l < 8u * N) {
    if (reinterpret_cast<uintptr_t>(row) % 16) ::emu::fail("ldmatrix row address not 16-byte aligned");
    if (!::emu::in_smem(row, 16)) ::emu::fail("ldmatrix row outside the block's dynamic shared memory");
  }
  ::emu::LaneIn me{};
  me.addr = static_cast<const unsigned char*>(row);
  const ::emu::LaneIn* all = ::emu::warp_exchange(me);
  auto element = [&](int matrix, int rr, int cc) {  // 16-bit element (rr, cc) of matrix `matrix` as stored
    uint16_t v;
    std::memcpy(&v, all[8 * matrix + rr].addr + 2 * cc, 2);
    return uint32_t(v);
  };
  for (int i = 0; i < N; ++i) {
    const int a = int(l / 4), b = 2 * int(l % 4);
    r[i] = TRANS ? element(i, b, a) | (element(i, b + 1, a) << 16) : element(i, a, b) | (element(i, a, b + 1) << 16);
  }
}

// ---- mma.sync.aligned: fragment layouts (g = lane / 4, t = lane % 4) ----
// (This file is spliced into csrc's namespace kasa, hence the relative namespace name below.)
namespace ptx_emu {
using ::emu::LaneIn;
using ::emu::lane_id;
using ::emu::warp_exchange;
inline float half_of(uint32_t reg, int hi, bool bf16) {
  const uint16_t h = uint16_t(hi ? reg >> 16 : reg & 0xffffu);
  return bf16 ? __bfloat162float(__nv_bfloat16{h}) : __half2float(__half{h});
}
// TF32 operands: the tensor core reads sign, exponent and the top 10 mantissa bits and ignores the other 13, so an
// operand that was not rounded by cvt.rna.tf32 is truncated.
inline float tf32_operand(uint32_t reg) { return __uint_as_float(reg & 0xFFFFE000u); }

// d[e] += sum_k A[row][k] B[k][col] for this lane's four accumulator elements (row g + 8 (e / 2), col 2t + e % 2),
// products exact in fp32 (16-bit and TF32 operands), summed in fp32 in k order. `a_at(row, k)` and `b_at(k, col)`
// read the element from the lane and register the PTX layout puts it in.
template <class A, class B>
void mma_accumulate(float (&d)[4], int K, A a_at, B b_at) {
  const int g = int(lane_id() / 4), t = int(lane_id() % 4);
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = d[e];
    for (int k = 0; k < K; ++k) acc += a_at(row, k) * b_at(k, col);
    d[e] = acc;
  }
}
inline const LaneIn* mma_exchange(const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  LaneIn me{};
  for (int q = 0; q < 4; ++q) me.w[q] = a[q];
  for (int q = 0; q < 2; ++q) me.w[4 + q] = b[q];
  return warp_exchange(me);
}
}  // namespace ptx_emu

// m16n8k16, .row.col, f32 += {bf16, f16} x {bf16, f16}. A (16 x 16): element (row, k) is in lane
// 4 (row % 8) + (k % 8) / 2, register (row / 8) + 2 (k / 8), half k % 2. B (16 x 8): element (k, col) is in lane
// 4 col + (k % 8) / 2, register k / 8, half k % 2.
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
  const ptx_emu::LaneIn* all = ptx_emu::mma_exchange(a, b);
  ptx_emu::mma_accumulate(
      d, 16,
      [&](int row, int k) { return ptx_emu::half_of(all[4 * (row % 8) + (k % 8) / 2].w[row / 8 + 2 * (k / 8)], k % 2, bf16); },
      [&](int k, int col) { return ptx_emu::half_of(all[4 * col + (k % 8) / 2].w[4 + k / 8], k % 2, bf16); });
}

// m16n8k8, .row.col, f32 += tf32 x tf32. A (16 x 8): element (row, k) is in lane 4 (row % 8) + k % 4, register
// (row / 8) + 2 (k / 4). B (8 x 8): element (k, col) is in lane 4 col + k % 4, register k / 4.
inline void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const ptx_emu::LaneIn* all = ptx_emu::mma_exchange(a, b);
  ptx_emu::mma_accumulate(
      d, 8, [&](int row, int k) { return ptx_emu::tf32_operand(all[4 * (row % 8) + k % 4].w[row / 8 + 2 * (k / 4)]); },
      [&](int k, int col) { return ptx_emu::tf32_operand(all[4 * col + k % 4].w[4 + k / 4]); });
}

// cvt.rna.tf32.f32: round to nearest, ties away from zero, to a 10-bit mantissa; NaN and Inf pass through.
inline uint32_t tf32_bits(float v) {
  uint32_t u = __float_as_uint(v);
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x1000u) & 0xFFFFE000u;
  return u;
}
