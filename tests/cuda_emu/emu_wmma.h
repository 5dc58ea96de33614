// nvcuda::wmma on the CPU. CUDA leaves the fragment-to-lane mapping unspecified, so here every lane holds the whole
// tile (x[t] is element t of the row-major tile): correct for any kernel that only uses the API and elementwise
// loops over x[t], which is all csrc/gemm_lowrank.cuh does. Products are exact in fp32 for fp16, bf16 and TF32
// operands; sums are accumulated in fp32. TF32 mma ignores the low 13 mantissa bits as the hardware does, so an
// operand that was not rounded by __float_to_tf32 is truncated, not silently kept at full precision.
#pragma once
#include "emu_cuda.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision { struct tf32 {}; }

template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };

template <class Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { static constexpr int R = M, C = K; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { static constexpr int R = K, C = N; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { static constexpr int R = M, C = N; };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  using element_type = typename storage<T>::type;
  static constexpr int rows = shape<Use, M, N, K>::R, cols = shape<Use, M, N, K>::C;
  enum { num_elements = rows * cols };
  element_type x[num_elements];  // row-major rows x cols
};

inline float __float_to_tf32(float v) {
  // cvt.rna.tf32.f32: round to nearest, ties away from zero, to a 10-bit mantissa; NaN and Inf pass through.
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7F800000u) != 0x7F800000u) u = (u + 0x1000u) & 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}

namespace detail {
inline void check_ptr(const void* p, unsigned ldm, size_t es) {
  if (reinterpret_cast<uintptr_t>(p) % 32) ::emu::fail("wmma pointer not 256-bit aligned");
  if ((ldm * es) % 16) ::emu::fail("wmma ldm not a multiple of 16 bytes");
}
inline float as_float(float v) { return v; }
inline float as_float(__half v) { return __half2float(v); }
inline float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
inline float tf32_operand(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0xFFFFE000u;
  std::memcpy(&v, &u, 4);
  return v;
}
template <class T> inline float operand(T v, bool tf32) { return tf32 ? tf32_operand(as_float(v)) : as_float(v); }
}  // namespace detail

template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads need a layout argument");
  static_assert(std::is_same_v<P, typename fragment<Use, M, N, K, T, L>::element_type>, "pointer type");
  detail::check_ptr(p, ldm, sizeof(P));
  using F = fragment<Use, M, N, K, T, L>;
  constexpr bool col = std::is_same_v<L, col_major>;
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) f.x[r * F::cols + c] = col ? p[size_t(c) * ldm + r] : p[size_t(r) * ldm + c];
}

template <int M, int N, int K, class T>
void store_matrix_sync(T* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  detail::check_ptr(p, ldm, sizeof(T));
  // Each lane writes its share, so a reader in the warp needs the __syncwarp that hardware needs too.
  for (int e = int(::emu::lane_id()); e < M * N; e += 32) {
    const int r = e / N, c = e % N;
    p[layout == mem_row_major ? size_t(r) * ldm + c : size_t(c) * ldm + r] = f.x[e];
  }
}

template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, T v) {
  for (auto& e : f.x) e = v;
}

template <int M, int N, int K, class T, class LA, class LB>
__attribute__((no_sanitize("address", "undefined"))) void mma_sync(
    fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
    const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  constexpr bool tf32 = std::is_same_v<T, precision::tf32>;
  float av[M][K], bv[K][N], out[M][N];
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) av[i][k] = detail::operand(a.x[i * K + k], tf32);
  for (int k = 0; k < K; ++k)
    for (int j = 0; j < N; ++j) bv[k][j] = detail::operand(b.x[k * N + j], tf32);
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) out[i][j] = c.x[i * N + j];
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k)
      for (int j = 0; j < N; ++j) out[i][j] += av[i][k] * bv[k][j];  // exact products, fp32 sums
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) d.x[i * N + j] = out[i][j];
}

}  // namespace wmma
}  // namespace nvcuda
