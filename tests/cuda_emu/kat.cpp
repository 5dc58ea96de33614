// Known-answer kernels for the emulated PTX instructions (tests/test_cuda_emulation.py, "known answers"): each runs
// one warp through csrc's own wrappers (kasa_common.cuh, with emu_ptx.h spliced in) and writes every lane's
// registers or shared memory out, so the test can hold them to the PTX ISA's layout tables, written out again there.
#include <cstring>

#include "kasa_common.cuh"
#include "kat.h"

namespace {

unsigned char* smem() { return ::emu::dynamic_smem(); }

// smem = 64 rows of 8 16-bit elements (`in`); lane l hands ldmatrix the address of row rows[l].
template <int N, bool TRANS>
void ldmatrix_kernel(const uint16_t* in, const int* rows, uint32_t* out) {
  const unsigned l = threadIdx.x;
  for (unsigned r = l; r < 64; r += 32) std::memcpy(smem() + r * 16, in + r * 8, 16);
  __syncwarp();
  uint32_t reg[N];
  kasa::ldmatrix<N, TRANS>(reg, smem() + rows[l] * 16);
  for (int i = 0; i < N; ++i) out[l * N + i] = reg[i];
}

// Registers in, registers out: a (32 x 4), b (32 x 2), c (32 x 4 fp32) per lane; d = a b + c.
template <int KIND>  // 0: m16n8k16 bf16, 1: m16n8k16 f16, 2: m16n8k8 tf32
void mma_kernel(const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  const unsigned l = threadIdx.x;
  uint32_t ar[4], br[2];
  float dr[4];
  for (int q = 0; q < 4; ++q) ar[q] = a[l * 4 + q], dr[q] = c[l * 4 + q];
  for (int q = 0; q < 2; ++q) br[q] = b[l * 2 + q];
  if constexpr (KIND == 0) kasa::mma_16816<__nv_bfloat16>(dr, ar, br);
  if constexpr (KIND == 1) kasa::mma_16816<__half>(dr, ar, br);
  if constexpr (KIND == 2) kasa::mma_1688_tf32(dr, ar, br);
  for (int q = 0; q < 4; ++q) d[l * 4 + q] = dr[q];
}

// The composition the GEMM relies on: operands loaded by ldmatrix the way gemm_lowrank.cuh addresses them, then mma.
// smem: A (16 rows x 32 bytes, row-major), then B as 16 rows x 16 bytes: n-major (Bt, 8 x 16 16-bit or 8 x 8 fp32
// stored as 8 rows of 32 bytes) or, with B_TRANS, k-major (16 x 8 16-bit). D (16 x 8) lane-wise out.
template <int KIND, bool B_KMAJOR_STORED>
void ldmatrix_mma_kernel(const unsigned char* a_in, const unsigned char* b_in, float* d) {
  const unsigned l = threadIdx.x;
  std::memcpy(smem() + l * 16, a_in + l * 16, 16);
  if (l < 16) std::memcpy(smem() + 512 + l * 16, b_in + l * 16, 16);
  __syncwarp();
  uint32_t a[4], b[2];
  kasa::ldmatrix<4, false>(a, smem() + (l & 15) * 32 + (l >> 4) * 16);  // rows l % 16, 16-byte half l / 16
  if constexpr (B_KMAJOR_STORED)
    kasa::ldmatrix<2, true>(b, smem() + 512 + (l & 15) * 16);  // k rows 0-7 (matrix 0), 8-15 (matrix 1)
  else
    kasa::ldmatrix<2, false>(b, smem() + 512 + (l & 7) * 32 + ((l >> 3) & 1) * 16);  // n rows, k halves
  if constexpr (KIND == 2) {
    for (auto& v : a) v = kasa::tf32_bits(__uint_as_float(v));
    for (auto& v : b) v = kasa::tf32_bits(__uint_as_float(v));
  }
  float dr[4] = {0.f, 0.f, 0.f, 0.f};
  if constexpr (KIND == 0) kasa::mma_16816<__nv_bfloat16>(dr, a, b);
  if constexpr (KIND == 1) kasa::mma_16816<__half>(dr, a, b);
  if constexpr (KIND == 2) kasa::mma_1688_tf32(dr, a, b);
  for (int q = 0; q < 4; ++q) d[l * 4 + q] = dr[q];
}

// cp.async groups: lane 0 commits four 16-byte copies as four groups (full, src-size 5, src-size 0, full) and
// snapshots shared memory after wait_group 3, 2, 1, 0.
void cp_async_kernel(const unsigned char* src, unsigned char* out) {
  if (threadIdx.x != 0) return;
  unsigned char* s = smem();
  kasa::cp_async_16(s, src);
  kasa::cp_async_commit();
  kasa::cp_async_16_zfill(s + 16, src + 16, 5);
  kasa::cp_async_commit();
  kasa::cp_async_16_zfill(s + 32, src + 32, 0);
  kasa::cp_async_commit();
  kasa::cp_async_16(s + 48, src + 48);
  kasa::cp_async_commit();
  kasa::cp_async_wait<3>();
  std::memcpy(out + 0, s, 64);
  kasa::cp_async_wait<2>();
  std::memcpy(out + 64, s, 64);
  kasa::cp_async_wait<1>();
  std::memcpy(out + 128, s, 64);
  kasa::cp_async_wait<0>();
  std::memcpy(out + 192, s, 64);
}

}  // namespace

void kat_ldmatrix(int n, bool trans, const uint16_t* in, const int* rows, uint32_t* out) {
  const size_t bytes = 64 * 16;
  if (n == 1 && !trans) ::emu::launch(ldmatrix_kernel<1, false>, 1, 32, bytes)(in, rows, out);
  if (n == 1 && trans) ::emu::launch(ldmatrix_kernel<1, true>, 1, 32, bytes)(in, rows, out);
  if (n == 2 && !trans) ::emu::launch(ldmatrix_kernel<2, false>, 1, 32, bytes)(in, rows, out);
  if (n == 2 && trans) ::emu::launch(ldmatrix_kernel<2, true>, 1, 32, bytes)(in, rows, out);
  if (n == 4 && !trans) ::emu::launch(ldmatrix_kernel<4, false>, 1, 32, bytes)(in, rows, out);
  if (n == 4 && trans) ::emu::launch(ldmatrix_kernel<4, true>, 1, 32, bytes)(in, rows, out);
}

void kat_mma(int kind, const uint32_t* a, const uint32_t* b, const float* c, float* d) {
  if (kind == 0) ::emu::launch(mma_kernel<0>, 1, 32)(a, b, c, d);
  if (kind == 1) ::emu::launch(mma_kernel<1>, 1, 32)(a, b, c, d);
  if (kind == 2) ::emu::launch(mma_kernel<2>, 1, 32)(a, b, c, d);
}

void kat_ldmatrix_mma(int kind, bool b_kmajor, const unsigned char* a, const unsigned char* b, float* d) {
  const size_t bytes = 512 + 256;
  if (kind == 0 && !b_kmajor) ::emu::launch(ldmatrix_mma_kernel<0, false>, 1, 32, bytes)(a, b, d);
  if (kind == 0 && b_kmajor) ::emu::launch(ldmatrix_mma_kernel<0, true>, 1, 32, bytes)(a, b, d);
  if (kind == 1 && !b_kmajor) ::emu::launch(ldmatrix_mma_kernel<1, false>, 1, 32, bytes)(a, b, d);
  if (kind == 1 && b_kmajor) ::emu::launch(ldmatrix_mma_kernel<1, true>, 1, 32, bytes)(a, b, d);
  if (kind == 2 && !b_kmajor) ::emu::launch(ldmatrix_mma_kernel<2, false>, 1, 32, bytes)(a, b, d);
}

void kat_cp_async(const unsigned char* src, unsigned char* out) { ::emu::launch(cp_async_kernel, 1, 32, 64)(src, out); }
