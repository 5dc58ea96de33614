/* The torch backend's rank-r pass over the output gradient on CPU (docs/math.md, "Backward"), in one read of G:
 *
 *     Z   = G B                  (M x R)      B: N x R, row-major
 *     gh  = s Z diag(d)          (M x R)
 *     dB  = s G^T (H diag(d))    (N x R)      H = dropout(x) A^T, M x R, row-major
 *     dd  = s colsum(Z * H)      (R)
 *
 * for an fp32 G (M x N, row stride ldg, unit column stride). This is the factoring the Triton and CUDA dY passes
 * use: d is applied to the r-wide rows (of Z and of H), never to an N x R product, so the pass reads B and d as
 * they are and writes the three gradients directly. The torch form is two GEMMs that each read G, plus B diag(d),
 * dB's product with d, dd's reduction and the copy autograd makes of dd's strided diagonal, and BLAS runs these
 * rank-r shapes far below its GEMM rate. Timed against that torch form (cpu_mask.dy_grads' whole call, its Python
 * and allocations included; r = 16, 1 thread, a 4 MB cache flush before each call, the two in a random order; 2-core
 * AMD EPYC, 2026-12-02; a diagnostic, not a results file): 157 against 200 us at 256 x 256, 1.37 against 1.87 ms at
 * 1024 x 768, 1.83 against 3.35 ms at 512 x 2048.
 *
 * Rows go two at a time: each G element is read once, for both its row's Z (R FMAs against B's row) and its
 * column's dB (R FMAs against the row's H diag(d)), and dB's row is loaded and stored once per two rows of G. R is
 * a compile-time constant (the instantiations below), so the R-wide loops vectorize. Z sums over n in order, dB
 * and dd over m in order, in fp32, and s is applied once at the end; the values differ from the GEMMs' only in the
 * order of the sums.
 *
 * Threads split the rows of G; each sums its own partial dB and dd (thread 0 into db and dd, the others into
 * `scratch`: (threads - 1) x (N + 1) x R floats), added in thread order at the end. gh rows are each one thread's.
 * Built with ops/cpu_mask.c into one library by ops/cpu_mask.py, which calls it through ctypes.
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define KASA_DY_RANGE(R)                                                                                          \
  static void dy_range_##R(const float* restrict g, int64_t m0, int64_t m1, int64_t n_cols, int64_t ldg,         \
                           const float* restrict b, const float* restrict d, const float* restrict h, float s,    \
                           float* restrict gh, float* restrict acc, float* restrict dd) {                         \
    memset(acc, 0, sizeof(float) * (size_t)n_cols * R);                                                           \
    float dv[R], ds[R];                                                                                           \
    for (int j = 0; j < R; j++) {                                                                                 \
      dv[j] = d[j];                                                                                               \
      ds[j] = 0.f;                                                                                                \
    }                                                                                                             \
    int64_t m = m0;                                                                                               \
    for (; m + 2 <= m1; m += 2) {                                                                                 \
      const float* g0 = g + m * ldg;                                                                              \
      const float* g1 = g0 + ldg;                                                                                 \
      float z0[R], z1[R], q0[R], q1[R];                                                                           \
      for (int j = 0; j < R; j++) {                                                                               \
        z0[j] = 0.f;                                                                                              \
        z1[j] = 0.f;                                                                                              \
        q0[j] = h[m * R + j] * dv[j];                                                                             \
        q1[j] = h[(m + 1) * R + j] * dv[j];                                                                       \
      }                                                                                                           \
      for (int64_t n = 0; n < n_cols; n++) {                                                                      \
        const float v0 = g0[n], v1 = g1[n];                                                                       \
        const float* bn = b + n * R;                                                                              \
        float* t = acc + n * R;                                                                                   \
        for (int j = 0; j < R; j++) {                                                                             \
          z0[j] += v0 * bn[j];                                                                                    \
          z1[j] += v1 * bn[j];                                                                                    \
          t[j] += v0 * q0[j] + v1 * q1[j];                                                                        \
        }                                                                                                         \
      }                                                                                                           \
      for (int j = 0; j < R; j++) {                                                                               \
        gh[m * R + j] = s * z0[j] * dv[j];                                                                        \
        gh[(m + 1) * R + j] = s * z1[j] * dv[j];                                                                  \
        ds[j] += z0[j] * h[m * R + j] + z1[j] * h[(m + 1) * R + j];                                               \
      }                                                                                                           \
    }                                                                                                             \
    for (; m < m1; m++) {                                                                                         \
      const float* g0 = g + m * ldg;                                                                              \
      float z0[R], q0[R];                                                                                         \
      for (int j = 0; j < R; j++) {                                                                               \
        z0[j] = 0.f;                                                                                              \
        q0[j] = h[m * R + j] * dv[j];                                                                             \
      }                                                                                                           \
      for (int64_t n = 0; n < n_cols; n++) {                                                                      \
        const float v0 = g0[n];                                                                                   \
        const float* bn = b + n * R;                                                                              \
        float* t = acc + n * R;                                                                                   \
        for (int j = 0; j < R; j++) {                                                                             \
          z0[j] += v0 * bn[j];                                                                                    \
          t[j] += v0 * q0[j];                                                                                     \
        }                                                                                                         \
      }                                                                                                           \
      for (int j = 0; j < R; j++) {                                                                               \
        gh[m * R + j] = s * z0[j] * dv[j];                                                                        \
        ds[j] += z0[j] * h[m * R + j];                                                                            \
      }                                                                                                           \
    }                                                                                                             \
    for (int j = 0; j < R; j++) dd[j] = ds[j];                                                                    \
  }

KASA_DY_RANGE(4)
KASA_DY_RANGE(8)
KASA_DY_RANGE(16)
KASA_DY_RANGE(32)

typedef void (*dy_range_fn)(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                            const float*, float, float*, float*, float*);

/* rows: M; cols: N. Writes gh (M x r), db (N x r), dd (r). Returns 0, or -1 for an R without an instantiation
 * (the caller then runs the GEMMs). */
int kasa_dy_grads_f32(const float* g, int64_t rows, int64_t cols, int64_t ldg, const float* b, const float* d,
                      const float* h, int64_t r, float s, float* gh, float* db, float* dd, float* scratch,
                      int threads) {
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
    float* acc = t == 0 ? db : scratch + (int64_t)(t - 1) * (width + r);
    float* dp = t == 0 ? dd : acc + width;
    if (m0 < m1) {
      fn(g, m0, m1, cols, ldg, b, d, h, s, gh, acc, dp);
    } else {
      memset(acc, 0, sizeof(float) * (size_t)width);
      memset(dp, 0, sizeof(float) * (size_t)r);
    }
  }
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
  for (int64_t i = 0; i < width; i++) {
    float v = db[i];
    for (int t = 1; t < threads; t++) v += scratch[(int64_t)(t - 1) * (width + r) + i];
    db[i] = s * v;
  }
  for (int64_t j = 0; j < r; j++) {
    float v = dd[j];
    for (int t = 1; t < threads; t++) v += scratch[(int64_t)(t - 1) * (width + r) + width + j];
    dd[j] = s * v;
  }
  return 0;
}
