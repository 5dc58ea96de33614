/* The torch backend's fp32 GEMM on CPU, with the rank-r term as extra k-steps (docs/math.md, "Forward"):
 *
 *     C = A B (+ bias) (+ alpha L R)      A: M x K, B: K x N, L: M x r, R: r x N, bias: N; C: M x N, row stride ldc
 *
 * Forward is Y = x W^T + b + s H (B diag(d))^T (A = x, B = W^T, L = H, R = (B diag(d))^T, alpha = s); backward's
 * dx is G W + gH A (A = G, B = W, L = gH, R = lora_A). The rank-r term rides in the last k-block as r more
 * k-steps, so it costs no pass over C: the unfused form's addmm_ reads and writes the whole M x N output once more.
 * The fused Triton and CUDA kernels do the same on a GPU.
 *
 * The layout is the usual packed one (Goto's): B is packed in KC x NC blocks into NR-column micro-panels, A in
 * MC x KC blocks into MR-row micro-panels, and a 6 x 16 register-blocked micro-kernel (12 AVX2 accumulators, two
 * B loads and six broadcasts per k) runs over them. Any element strides are accepted for A, B, L and R (the
 * packing reads them); the common ones have fast packing paths: a row-major A, a B with unit column stride (W in
 * backward) and a B with unit row stride (W^T in forward, packed by 8 x 8 transposes). KC, MC and NC are what
 * measured best on the one CPU we have (2-core AMD EPYC, Zen 3: 32 KiB L1d, 512 KiB L2 per core), a sweep of
 * KC in {192, 256, 384} and MC in {72, 144, 240}; the differences were within a few per cent.
 *
 * Sums: each C element sums its K products in k order within a k-block, the blocks in order, then the r rank-r
 * products (alpha applied to L as it is packed); fp32 throughout. The values differ from MKL's only in the order
 * of the sums.
 *
 * Timed against torch.mm (MKL 2024.2; a 64 MB cache flush before each call, the two in a random order, median of
 * the per-round ratios; 2-core AMD EPYC, Zen 3, 2026-12-02; a diagnostic, not a results file), x W^T / G W:
 *   1 thread:  0.89 / 0.95 at 256^3, 0.95 / 0.83 at 1024 x 768 x 768, 0.86 / 0.96 at 512 x 2048 x 2048 (the
 *              first version, A packed by scalar loads; this one was 0.89 / 0.92 and 0.86 / 0.90 at the first
 *              two sizes, timed with each side allocating its output);
 *   2 threads: 0.87 / 0.90, 0.93 / 0.93, 0.96 / 0.94 (this version's thread split).
 * In the cache the micro-kernel ran at 85-90 % of the core's FMA peak (90 GFLOP/s, measured), MKL at 60-85 %. Small
 * products are MKL's: at 64^3 and 128^3 (warm, with the rank-r term) this took 32 and 83 us against 21 and 70, the
 * packing and the call's own cost being a larger share there (cpu_mask.GEMM_MIN_MACS).
 *
 * Threads split C's MR-row panels evenly, each taking its contiguous share in blocks of at most MC rows (it packs
 * its own A block), and share the packed B block, which they pack together. The packing buffers, (KC + r) x
 * min(N, NC) floats for B and MC x (KC + r) per thread for A (2.3 MB at most for r = 16 and one thread; allocated a
 * quarter larger, so that it seldom grows), are one block per calling thread, kept for its next call.
 *
 * Built with ops/cpu_mask.c and ops/cpu_rank.c into one library by ops/cpu_mask.py, which calls it through ctypes
 * (cpu_mask.gemm). Without AVX2 and FMA (another architecture, an old x86) kasa_gemm_f32_available() returns 0
 * and the torch backend keeps torch's GEMMs.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

int kasa_gemm_f32_available(void) { return 1; }

#define GM_MR 6
#define GM_NR 16
#define GM_KC 256
#define GM_MC 72
#define GM_NC 2048
#define GM_MAX_R 64

static inline int64_t gm_min(int64_t a, int64_t b) { return a < b ? a : b; }

/* Transposes the 8 x 8 block in r[0..7] (row j in r[j]) in place: afterwards r[k] holds column k. */
static inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
               t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]),
               t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
               t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* Rows [0, mc) of A (columns [0, kc)) then of alpha L (columns [0, r)) into MR-row micro-panels: panel p holds
 * rows p .. p + MR - 1, k-step by k-step (MR floats each), kc + r steps; rows past mc are zero. */
static void pack_a(int64_t mc, int64_t kc, const float* a, int64_t sa0, int64_t sa1, int64_t r, const float* l,
                   int64_t sl0, int64_t sl1, float alpha, float* restrict buf) {
  const int64_t steps = kc + r;
  for (int64_t p = 0; p < mc; p += GM_MR) {
    const int64_t mr = gm_min(GM_MR, mc - p);
    float* restrict dst = buf + p * steps;
    const float* src = a + p * sa0;
    int64_t k = 0;
    if (mr == GM_MR && sa1 == 1) {
      /* 8 k-steps at a time: the six rows (and two copies of the last) transposed, each column stored as 8 floats
       * whose last two the next store overwrites (past the block's last step: the rank-r steps or the next panel,
       * written after, or past this thread's last panel, its slack) */
      for (; k + 8 <= kc; k += 8, dst += 8 * GM_MR) {
        __m256 v[8];
        for (int i = 0; i < GM_MR; i++) v[i] = _mm256_loadu_ps(src + i * sa0 + k);
        v[6] = v[7] = v[5];
        transpose8(v);
        for (int j = 0; j < 8; j++) _mm256_storeu_ps(dst + j * GM_MR, v[j]);
      }
    }
    for (; k < kc; k++, dst += GM_MR)
      for (int64_t i = 0; i < GM_MR; i++) dst[i] = i < mr ? src[i * sa0 + k * sa1] : 0.f;
    for (int64_t e = 0; e < r; e++, dst += GM_MR)
      for (int64_t i = 0; i < GM_MR; i++) dst[i] = i < mr ? alpha * l[(p + i) * sl0 + e * sl1] : 0.f;
  }
}

/* Columns [q, q + NR) of B (rows [0, kc)) then of R (rows [0, r)) into one NR-column micro-panel at dst: k-step by
 * k-step, NR floats each; columns past nc are zero. */
static void pack_b_panel(int64_t q, int64_t nc, int64_t kc, const float* b, int64_t sb0, int64_t sb1, int64_t r,
                         const float* rr, int64_t sr0, int64_t sr1, float* restrict dst) {
  const int64_t nr = gm_min(GM_NR, nc - q);
  const float* src = b + q * sb1;
  int64_t k = 0;
  if (nr == GM_NR && sb1 == 1) {
    for (; k < kc; k++) {
      _mm256_store_ps(dst + k * GM_NR, _mm256_loadu_ps(src + k * sb0));
      _mm256_store_ps(dst + k * GM_NR + 8, _mm256_loadu_ps(src + k * sb0 + 8));
    }
  } else if (nr == GM_NR && sb0 == 1) {  /* B = W^T: B's column j is W's row j, contiguous in k */
    for (; k + 8 <= kc; k += 8)
      for (int h = 0; h < 2; h++) {
        __m256 v[8];
        for (int j = 0; j < 8; j++) v[j] = _mm256_loadu_ps(src + (8 * h + j) * sb1 + k);
        transpose8(v);
        for (int j = 0; j < 8; j++) _mm256_store_ps(dst + (k + j) * GM_NR + 8 * h, v[j]);
      }
  }
  for (; k < kc; k++)
    for (int64_t j = 0; j < GM_NR; j++) dst[k * GM_NR + j] = j < nr ? src[k * sb0 + j * sb1] : 0.f;
  for (int64_t e = 0; e < r; e++)
    for (int64_t j = 0; j < GM_NR; j++) dst[(kc + e) * GM_NR + j] = j < nr ? rr[e * sr0 + (q + j) * sr1] : 0.f;
}

/* c[0..mr) x [0..nr) (row stride ldc) = (accumulate ? c : bias) + a-panel x b-panel over `steps` k-steps. */
static inline void micro_kernel(int64_t steps, const float* restrict a, const float* restrict b, float* c,
                                int64_t ldc, int64_t mr, int64_t nr, int accumulate, const float* bias) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
         c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t i = 0; i < mr; i++) {
    _mm_prefetch((const char*)(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch((const char*)(c + i * ldc + GM_NR - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < steps; k++) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 t;
    t = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(t, b0, c00);
    c01 = _mm256_fmadd_ps(t, b1, c01);
    t = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(t, b0, c10);
    c11 = _mm256_fmadd_ps(t, b1, c11);
    t = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(t, b0, c20);
    c21 = _mm256_fmadd_ps(t, b1, c21);
    t = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(t, b0, c30);
    c31 = _mm256_fmadd_ps(t, b1, c31);
    t = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(t, b0, c40);
    c41 = _mm256_fmadd_ps(t, b1, c41);
    t = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(t, b0, c50);
    c51 = _mm256_fmadd_ps(t, b1, c51);
    a += GM_MR;
    b += GM_NR;
  }
  float tile[GM_MR * GM_NR] __attribute__((aligned(32)));
  _mm256_store_ps(tile + 0, c00);
  _mm256_store_ps(tile + 8, c01);
  _mm256_store_ps(tile + 16, c10);
  _mm256_store_ps(tile + 24, c11);
  _mm256_store_ps(tile + 32, c20);
  _mm256_store_ps(tile + 40, c21);
  _mm256_store_ps(tile + 48, c30);
  _mm256_store_ps(tile + 56, c31);
  _mm256_store_ps(tile + 64, c40);
  _mm256_store_ps(tile + 72, c41);
  _mm256_store_ps(tile + 80, c50);
  _mm256_store_ps(tile + 88, c51);
  if (nr == GM_NR) {
    __m256 base0 = _mm256_setzero_ps(), base1 = base0;
    if (!accumulate && bias) {
      base0 = _mm256_loadu_ps(bias);
      base1 = _mm256_loadu_ps(bias + 8);
    }
    for (int64_t i = 0; i < mr; i++) {
      float* row = c + i * ldc;
      __m256 v0 = _mm256_load_ps(tile + i * GM_NR), v1 = _mm256_load_ps(tile + i * GM_NR + 8);
      if (accumulate) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(row));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(row + 8));
      } else if (bias) {
        v0 = _mm256_add_ps(v0, base0);
        v1 = _mm256_add_ps(v1, base1);
      }
      _mm256_storeu_ps(row, v0);
      _mm256_storeu_ps(row + 8, v1);
    }
  } else {
    for (int64_t i = 0; i < mr; i++)
      for (int64_t j = 0; j < nr; j++) {
        const float base = accumulate ? c[i * ldc + j] : bias ? bias[j] : 0.f;
        c[i * ldc + j] = base + tile[i * GM_NR + j];
      }
  }
}

/* The calling thread's packing buffer, at least `floats` long and 64-byte aligned; kept between calls (grown, never
 * shrunk) because a fresh one per call is fresh pages from the kernel, whose faults cost a 256^3 GEMM several per
 * cent. NULL when it cannot be had. */
static float* workspace(int64_t floats) {
  static __thread float* buf = NULL;
  static __thread int64_t cap = 0;
  if (floats > cap) {
    free(buf);
    const int64_t want = floats + floats / 4;
    buf = aligned_alloc(64, (size_t)((want * 4 + 63) / 64 * 64));
    cap = buf ? want : 0;
  }
  return buf;
}

/* C = A B (+ bias) (+ alpha L R); see the top of the file. Element (i, k) of A is a[i * sa0 + k * sa1], and so on;
 * C's rows are contiguous with stride ldc >= N. bias may be NULL (none); r may be 0 (no rank-r term; l and rr are
 * then not read). Returns 0, or -1 for arguments out of range, -2 when the packing buffers cannot be allocated
 * (C is then unwritten). */
int kasa_gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa0, int64_t sa1, const float* b,
                  int64_t sb0, int64_t sb1, const float* bias, int64_t r, const float* l, int64_t sl0, int64_t sl1,
                  const float* rr, int64_t sr0, int64_t sr1, float alpha, float* c, int64_t ldc, int threads) {
  if (M <= 0 || N <= 0 || K <= 0 || r < 0 || r > GM_MAX_R || ldc < N || !a || !b || !c || (r > 0 && (!l || !rr)))
    return -1;
  /* each thread takes a contiguous share of the MR-row panels (an even split, so no thread waits on another's
   * extra block at the barriers), in blocks of at most MC rows */
  const int64_t row_panels = (M + GM_MR - 1) / GM_MR;
  int nt = threads < 1 ? 1 : threads;
  if (nt > row_panels) nt = (int)row_panels;
  const int64_t mc = GM_MC;
  const int64_t nc_max = gm_min(N, GM_NC);
  const int64_t b_floats = (GM_KC + r) * ((nc_max + GM_NR - 1) / GM_NR * GM_NR);
  /* per thread, with 16 floats of slack for pack_a's overlapping stores */
  const int64_t a_floats = (mc + GM_MR - 1) / GM_MR * GM_MR * (GM_KC + r) + 16;
  float* pb = workspace((b_floats + 15) / 16 * 16 + a_floats * nt);
  if (!pb) return -2;
  float* pa = pb + (b_floats + 15) / 16 * 16;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
#endif
  {
#ifdef _OPENMP
    /* the team the runtime gave (fewer than nt inside another parallel region, say): the rows split over it */
    const int t = omp_get_thread_num(), team = omp_get_num_threads();
#else
    const int t = 0, team = 1;
#endif
    float* my_pa = pa + t * a_floats;
    const int64_t row0 = gm_min(M, row_panels * t / team * GM_MR);
    const int64_t row1 = gm_min(M, row_panels * (t + 1) / team * GM_MR);
    for (int64_t j0 = 0; j0 < N; j0 += GM_NC) {
      const int64_t nc = gm_min(GM_NC, N - j0);
      const int64_t panels = (nc + GM_NR - 1) / GM_NR;
      for (int64_t k0 = 0; k0 < K; k0 += GM_KC) {
        const int last = k0 + GM_KC >= K;
        const int64_t kc = last ? K - k0 : GM_KC, re = last ? r : 0, steps = kc + re;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t pq = 0; pq < panels; pq++)
          pack_b_panel(pq * GM_NR, nc, kc, b + k0 * sb0 + j0 * sb1, sb0, sb1, re, rr ? rr + j0 * sr1 : rr, sr0,
                       sr1, pb + pq * GM_NR * steps);
        /* the implicit barrier: pb is whole before any thread reads it */
        for (int64_t i0 = row0; i0 < row1; i0 += mc) {
          const int64_t mcb = gm_min(mc, row1 - i0);
          pack_a(mcb, kc, a + i0 * sa0 + k0 * sa1, sa0, sa1, re, l ? l + i0 * sl0 : l, sl0, sl1, alpha, my_pa);
          for (int64_t pq = 0; pq < panels; pq++) {
            const int64_t q = pq * GM_NR, nr = gm_min(GM_NR, nc - q);
            for (int64_t p = 0; p < mcb; p += GM_MR)
              micro_kernel(steps, my_pa + p * steps, pb + q * steps, c + (i0 + p) * ldc + j0 + q, ldc,
                           gm_min(GM_MR, mcb - p), nr, k0 > 0, bias ? bias + j0 + q : bias);
          }
        }
        /* and every thread is done with pb before it is packed anew */
#ifdef _OPENMP
#pragma omp barrier
#endif
      }
    }
  }
  return 0;
}

#else /* no AVX2 + FMA: the torch backend keeps torch's GEMMs */

int kasa_gemm_f32_available(void) { return 0; }

int kasa_gemm_f32(int64_t M, int64_t N, int64_t K, const float* a, int64_t sa0, int64_t sa1, const float* b,
                  int64_t sb0, int64_t sb1, const float* bias, int64_t r, const float* l, int64_t sl0, int64_t sl1,
                  const float* rr, int64_t sr0, int64_t sr1, float alpha, float* c, int64_t ldc, int threads) {
  (void)M, (void)N, (void)K, (void)a, (void)sa0, (void)sa1, (void)b, (void)sb0, (void)sb1, (void)bias, (void)r;
  (void)l, (void)sl0, (void)sl1, (void)rr, (void)sr0, (void)sr1, (void)alpha, (void)c, (void)ldc, (void)threads;
  return -1;
}

#endif
