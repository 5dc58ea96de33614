/* The dropout-mask kernels of ops/rng.py for CPU tensors, in C: one pass each, no torch headers.
 *
 * ops/cpu_mask.py compiles this file at first use (cc -O3 -march=native, OpenMP where the compiler has it), loads it
 * with ctypes and calls it with the tensors' data pointers and strides. The hash is ops/rng.py's spec; the constants
 * come from ops/rng_constants.py as -D definitions. Each kernel is instantiated for the (x dtype, operand dtype) pairs
 * the torch backend uses (X, D below); cpu_mask.py sends every other combination to the torch forms. The arithmetic
 * is torch's: an add of two 16-bit or fp32 values is done in fp32 and rounded once to the output dtype (round to
 * nearest even), fp64 in fp64; a masked value is x converted exactly (the pairs only widen or keep the dtype).
 *
 *   masked          dst[m, k] = keep ? x[m, k] : 0                            dst contiguous (rows, cols) in D
 *   add_masked      out[m, k] += keep ? t[m, k] : 0                            out in X, t in D
 *   dropout_bwd     dx[m, k] += keep ? t[m, k] : 0;  t[m, k] = keep ? x[m, k] : 0
 *                   (dx in X, or fp32 beside a 16-bit x: the _wide_ forms)
 *
 * Every pointer and stride comes from a tensor torch allocated with those sizes, so indices stay in bounds; strides
 * and sizes are in elements, as torch gives them. */
#include <stdint.h>
#include <string.h>

#if !defined(KASA_MIX_MUL1) || !defined(KASA_MIX_MUL2)
#error "build with the -D definitions of ops/rng_constants.py (cxx_defines)"
#endif

/* below this many elements one thread does the whole tensor: starting a team costs more than it saves */
#define KASA_PAR_MIN (1 << 15)

static inline uint32_t xorshift(uint32_t h, int s) { return h ^ (h >> s); }

static inline uint32_t mix32(uint32_t h) {
    h = xorshift(h, 16) * (uint32_t)KASA_MIX_MUL1;
    h = xorshift(h, 15) * (uint32_t)KASA_MIX_MUL2;
    return xorshift(h, 15);
}

/* keep iff hash(i) >= thr, i = lo + 2^32 hi the row-major element index */
static inline int keep32(uint32_t lo, uint32_t hi, uint32_t s0, uint32_t s1, uint32_t thr) {
    return mix32(mix32(lo ^ s0) ^ hi ^ s1) >= thr;
}

typedef float f32_t;
typedef double f64_t;
typedef uint16_t bf16_t;
typedef _Float16 f16_t;

static inline float bf16_to_f(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16_t f_to_bf16(float f) { /* c10::BFloat16's round to nearest even; NaN to the quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    bf16_t rounded = (bf16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return f != f ? (bf16_t)0x7FC0 : rounded; /* a select, not a branch: the loops stay vectorizable */
}

/* loads to the arithmetic type, stores from it */
#define LD_f32(v) (v)
#define LD_f64(v) (v)
#define LD_bf16(v) bf16_to_f(v)
#define LD_f16(v) ((float)(v))
#define ST_f32(v) ((float)(v))
#define ST_f64(v) ((double)(v))
#define ST_bf16(v) f_to_bf16(v)
#define ST_f16(v) ((_Float16)(v))

/* The loop over one row: the index's high word is the same across the row unless the row crosses a multiple of
 * 2^32, which takes the 64-bit loop. BODY sees k (column), keep (0/1). */
#define ROW_LOOP(cols, base, s0, s1, thr, BODY)                                                 \
    do {                                                                                        \
        uint64_t base_ = (base);                                                                \
        if ((base_ >> 32) == ((base_ + (uint64_t)(cols) - 1) >> 32)) {                         \
            uint32_t lo_ = (uint32_t)base_, hi_ = (uint32_t)(base_ >> 32);                      \
            for (int64_t k = 0; k < (cols); ++k) {                                              \
                int keep = keep32(lo_ + (uint32_t)k, hi_, s0, s1, thr);                         \
                BODY;                                                                           \
            }                                                                                   \
        } else {                                                                                \
            for (int64_t k = 0; k < (cols); ++k) {                                              \
                uint64_t i_ = base_ + (uint64_t)k;                                              \
                int keep = keep32((uint32_t)i_, (uint32_t)(i_ >> 32), s0, s1, thr);             \
                BODY;                                                                           \
            }                                                                                   \
        }                                                                                       \
    } while (0)

#ifdef _OPENMP
#define PAR_ROWS _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1 && rows * cols >= KASA_PAR_MIN)")
#else
#define PAR_ROWS
#endif

/* Row bodies with the column strides as parameters: called with literal 1s where every column stride is 1, so the
 * compiler sees unit-stride loops and vectorizes them, and with the strides otherwise. */
/* Every load is unconditional and `keep` only selects, so the loops have no control flow to stop vectorizing. */
#define MASKED_ROW(X, D, XCS) ROW_LOOP(cols, (uint64_t)m * (uint64_t)cols, s0, s1, thr, { \
    D##_t xv = ST_##D(LD_##X(xr[k * (XCS)]));                                            \
    d[k] = keep ? xv : ST_##D(0);                                                        \
})
#define ADD_ROW(X, D, OP, OCS, TCS) ROW_LOOP(cols, (uint64_t)m * (uint64_t)cols, s0, s1, thr, { \
    OP tv = (OP)LD_##D(tr[k * (TCS)]);                                                          \
    o[k * (OCS)] = ST_##X((OP)LD_##X(o[k * (OCS)]) + (keep ? tv : (OP)0));                      \
})
#define BWD_ROW(O, X, D, OP, DCS, TCS, XCS) ROW_LOOP(cols, (uint64_t)m * (uint64_t)cols, s0, s1, thr, { \
    OP tv = (OP)LD_##D(tr[k * (TCS)]);                                                               \
    D##_t xv = ST_##D(LD_##X(xr[k * (XCS)]));                                                        \
    OP tm = keep ? tv : (OP)0; /* both selects before either store: gcc 12 vectorizes only this order */ \
    D##_t xm = keep ? xv : ST_##D(0);                                                                \
    o[k * (DCS)] = ST_##O((OP)LD_##O(o[k * (DCS)]) + tm);                                            \
    tr[k * (TCS)] = xm;                                                                              \
})

/* X: x's dtype (and out's, dx's); D: the operand dtype (t's, dst's); OP: the arithmetic type of the adds. The
 * tensors of one call never overlap (restrict): the written ones are fresh buffers of the torch backend. */
#define DEFINE_KERNELS(X, D, OP)                                                                              \
    void kasa_masked_##X##_##D(D##_t *restrict dst, const X##_t *restrict x, int64_t rows, int64_t cols,     \
                               int64_t xrs, int64_t xcs, uint32_t s0, uint32_t s1, uint32_t thr,             \
                               int nthreads) {                                                                \
        PAR_ROWS                                                                                              \
        for (int64_t m = 0; m < rows; ++m) {                                                                  \
            D##_t *restrict d = dst + m * cols;                                                               \
            const X##_t *restrict xr = x + m * xrs;                                                           \
            if (xcs == 1)                                                                                     \
                MASKED_ROW(X, D, 1);                                                                          \
            else                                                                                              \
                MASKED_ROW(X, D, xcs);                                                                        \
        }                                                                                                     \
    }                                                                                                         \
    void kasa_add_masked_##X##_##D(X##_t *restrict out, int64_t ors, int64_t ocs, const D##_t *restrict t,   \
                                   int64_t trs, int64_t tcs, int64_t rows, int64_t cols, uint32_t s0,        \
                                   uint32_t s1, uint32_t thr, int nthreads) {                                 \
        PAR_ROWS                                                                                              \
        for (int64_t m = 0; m < rows; ++m) {                                                                  \
            X##_t *restrict o = out + m * ors;                                                                \
            const D##_t *restrict tr = t + m * trs;                                                           \
            if (ocs == 1 && tcs == 1)                                                                         \
                ADD_ROW(X, D, OP, 1, 1);                                                                      \
            else                                                                                              \
                ADD_ROW(X, D, OP, ocs, tcs);                                                                  \
        }                                                                                                     \
    }                                                                                                         \
    DEFINE_DROPOUT_BWD(X, X, D, OP, X##_##D)

/* dropout_bwd with dx in O, t in D, x in X. NAME: the function's suffix. */
#define DEFINE_DROPOUT_BWD(O, X, D, OP, NAME)                                                                  \
    void kasa_dropout_bwd_##NAME(O##_t *restrict dx, int64_t drs, int64_t dcs, D##_t *restrict t, int64_t trs, \
                                 int64_t tcs, const X##_t *restrict x, int64_t xrs, int64_t xcs, int64_t rows,  \
                                 int64_t cols, uint32_t s0, uint32_t s1, uint32_t thr, int nthreads) {          \
        PAR_ROWS                                                                                              \
        for (int64_t m = 0; m < rows; ++m) {                                                                  \
            O##_t *restrict o = dx + m * drs;                                                                 \
            D##_t *restrict tr = t + m * trs;                                                                 \
            const X##_t *restrict xr = x + m * xrs;                                                           \
            if (dcs == 1 && tcs == 1 && xcs == 1)                                                             \
                BWD_ROW(O, X, D, OP, 1, 1, 1);                                                                \
            else                                                                                              \
                BWD_ROW(O, X, D, OP, dcs, tcs, xcs);                                                          \
        }                                                                                                     \
    }

DEFINE_KERNELS(f32, f32, float)
DEFINE_KERNELS(f64, f64, double)
DEFINE_KERNELS(bf16, bf16, float)
DEFINE_KERNELS(bf16, f32, float)
DEFINE_KERNELS(f16, f32, float)
/* a 16-bit layer on a CPU without 16-bit GEMM kernels: dx is formed in fp32 (torch_linear.py), x stays 16-bit */
DEFINE_DROPOUT_BWD(f32, bf16, f32, float, wide_bf16)
DEFINE_DROPOUT_BWD(f32, f16, f32, float, wide_f16)

/* lets the loader check that it has this file's build, with the constants it was given */
uint32_t kasa_mask_hash(uint64_t i, uint32_t s0, uint32_t s1) {
    return mix32(mix32((uint32_t)i ^ s0) ^ (uint32_t)(i >> 32) ^ s1);
}
