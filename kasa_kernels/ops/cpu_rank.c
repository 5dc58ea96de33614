/* The torch backend's rank-r pass over the output gradient on CPU (docs/math.md, "Backward"), in one read of G:
 *
 *     gh  = s G Bd     (M x R)      Bd = B diag(d), N x R, row-major
 *     gth = s G^T H    (N x R)      H  = dropout(x) A^T, M x R, row-major
 *
 * for an fp32 G (M x N, row stride ldg, unit column stride). The torch form is two GEMMs that each read G, and
 * BLAS libraries run these rank-r shapes far below their GEMM rate: at r = 16, 1 thread, on a 2-core AMD EPYC
 * (2026-12-01/02, caches flushed before each call), MKL's two took 1.7-2.3 ms at M = 1024, N = 768 and 3.0-3.6 ms
 * at M = 512, N = 2048, where this pass took 1.1-1.25 and 1.6-1.75 ms (cpu_mask.dy_pass's whole call, its Python
 * and allocations included). Below 2^17 elements of G the call's own cost eats the gain, and ops/cpu_mask.py runs
 * the GEMMs there.
 *
 * Rows go two at a time: each G element is read once, for both its row's gh (R FMAs against Bd's row) and its
 * column's gth (R FMAs against H's row), and gth's row is loaded and stored once per two rows of G. R is a
 * compile-time constant (the instantiations below), so the R-wide loops vectorize. gh sums over n in order and gth
 * over m in order, in fp32, and s is applied once at the end; the values differ from the GEMMs' only in the order
 * of the sums.
 *
 * Threads split the rows of G; each sums its own partial gth (thread 0 into gth, the others into `scratch`,
 * (threads - 1) x N x R floats), added in thread order at the end. gh rows are each one thread's.
 * Built with ops/cpu_mask.c into one library by ops/cpu_mask.py, which calls it through ctypes.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define KASA_DY_RANGE(R)                                                                                          \
  static void dy_range_##R(const float* restrict g, int64_t m0, int64_t m1, int64_t n_cols, int64_t ldg,         \
                           const float* restrict bd, const float* restrict h, float s, float* restrict gh,        \
                           float* restrict acc) {                                                                 \
    memset(acc, 0, sizeof(float) * (size_t)n_cols * R);                                                           \
    int64_t m = m0;                                                                                               \
    for (; m + 2 <= m1; m += 2) {                                                                                 \
      const float* g0 = g + m * ldg;                                                                              \
      const float* g1 = g0 + ldg;                                                                                 \
      float a0[R], a1[R], h0[R], h1[R];                                                                           \
      for (int j = 0; j < R; j++) {                                                                               \
        a0[j] = 0.f;                                                                                              \
        a1[j] = 0.f;                                                                                              \
        h0[j] = h[m * R + j];                                                                                     \
        h1[j] = h[(m + 1) * R + j];                                                                               \
      }                                                                                                           \
      for (int64_t n = 0; n < n_cols; n++) {                                                                      \
        const float v0 = g0[n], v1 = g1[n];                                                                       \
        const float* b = bd + n * R;                                                                              \
        float* t = acc + n * R;                                                                                   \
        for (int j = 0; j < R; j++) {                                                                             \
          a0[j] += v0 * b[j];                                                                                     \
          a1[j] += v1 * b[j];                                                                                     \
          t[j] += v0 * h0[j] + v1 * h1[j];                                                                        \
        }                                                                                                         \
      }                                                                                                           \
      for (int j = 0; j < R; j++) {                                                                               \
        gh[m * R + j] = s * a0[j];                                                                                \
        gh[(m + 1) * R + j] = s * a1[j];                                                                          \
      }                                                                                                           \
    }                                                                                                             \
    for (; m < m1; m++) {                                                                                         \
      const float* g0 = g + m * ldg;                                                                              \
      float a0[R], h0[R];                                                                                         \
      for (int j = 0; j < R; j++) {                                                                               \
        a0[j] = 0.f;                                                                                              \
        h0[j] = h[m * R + j];                                                                                     \
      }                                                                                                           \
      for (int64_t n = 0; n < n_cols; n++) {                                                                      \
        const float v0 = g0[n];                                                                                   \
        const float* b = bd + n * R;                                                                              \
        float* t = acc + n * R;                                                                                   \
        for (int j = 0; j < R; j++) {                                                                             \
          a0[j] += v0 * b[j];                                                                                     \
          t[j] += v0 * h0[j];                                                                                     \
        }                                                                                                         \
      }                                                                                                           \
      for (int j = 0; j < R; j++) gh[m * R + j] = s * a0[j];                                                      \
    }                                                                                                             \
  }

KASA_DY_RANGE(4)
KASA_DY_RANGE(8)
KASA_DY_RANGE(16)
KASA_DY_RANGE(32)

typedef void (*dy_range_fn)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*, float,
                            float*, float*);

/* rows: M; cols: N. Returns 0, or -1 for an R without an instantiation (the caller then runs the GEMMs). */
int kasa_dy_pass_f32(const float* g, int64_t rows, int64_t cols, int64_t ldg, const float* bd, const float* h,
                     int64_t r, float s, float* gh, float* gth, float* scratch, int threads) {
  dy_range_fn fn;
  switch (r) {
    case 4: fn = dy_range_4; break;
    case 8: fn = dy_range_8; break;
    case 16: fn = dy_range_16; break;
    case 32: fn = dy_range_32; break;
    default: return -1;
  }
  if (threads < 1) threads = 1;
  /* each thread takes an even number of rows (its pairs stay whole) */
  const int64_t per = ((rows + threads - 1) / threads + 1) & ~(int64_t)1;
  const int64_t width = cols * r;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1)
#endif
  for (int t = 0; t < threads; t++) {
    const int64_t m0 = per * t, m1 = m0 + per < rows ? m0 + per : rows;
    float* acc = t == 0 ? gth : scratch + (int64_t)(t - 1) * width;
    if (m0 < m1) {
      fn(g, m0, m1, cols, ldg, bd, h, s, gh, acc);
    } else {
      memset(acc, 0, sizeof(float) * (size_t)width);
    }
  }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
  for (int64_t i = 0; i < width; i++) {
    float v = gth[i];
    for (int t = 1; t < threads; t++) v += scratch[(int64_t)(t - 1) * width + i];
    gth[i] = s * v;
  }
  return 0;
}
