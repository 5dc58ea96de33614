// The whole model's KaSA regularizer in one launch (docs/math.md, "Regularizer"): block l reads layer l's entry of
// a device pointer table and computes E_A = A A^T - I, E_B = B^T B - I (r x r, fp32), their Frobenius norms, the
// layer's loss term and the closed-form gradients 2 gamma E A / g_A, 2 gamma B E / g_B, 2 beta d. The last block to
// finish adds the per-layer terms in layer order, so the loss is deterministic. No K x K or N x N Gram is formed.
#include "kasa_common.cuh"

namespace kasa {
namespace {

constexpr int kThreads = 256;
constexpr int kSub = 32;  // Gram sub-block edge: thread t owns entries (t/8, 4*(t%8) .. +4) of each sub-block
constexpr int kKT = 32;   // reduction slice per smem tile

// E = F F^T - I for F(i, k) = f[i * si + k * sk] (i < r, k < len), written to e_out (r x r, row-major).
// Returns ||E||_F^2 to every thread.
__device__ float gram_minus_identity(const void* f, int dtype, int r, int len, int64_t si, int64_t sk, float* e_out,
                                     float* red) {
  __shared__ float fi[kSub][kKT + 1];
  __shared__ float fj[kSub][kKT + 1];
  const int ii = threadIdx.x / 8, jj0 = (threadIdx.x % 8) * 4;
  const int nsub = (r + kSub - 1) / kSub;
  float fro2 = 0.f;
  for (int bi = 0; bi < nsub; ++bi) {
    for (int bj = 0; bj < nsub; ++bj) {
      float acc[4] = {};
      for (int k0 = 0; k0 < len; k0 += kKT) {
        __syncthreads();
        for (int e = threadIdx.x; e < kSub * kKT; e += kThreads) {
          // Walk the contiguous index fastest so that the loads coalesce (k for A, i for B).
          const int row = sk == 1 ? e / kKT : e % kSub;
          const int kk = sk == 1 ? e % kKT : e / kSub;
          const int gk = k0 + kk, gi = bi * kSub + row, gj = bj * kSub + row;
          fi[row][kk] = (gi < r && gk < len) ? load_as_float(f, gi * si + gk * sk, dtype) : 0.f;
          fj[row][kk] = (gj < r && gk < len) ? load_as_float(f, gj * si + gk * sk, dtype) : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int kk = 0; kk < kKT; ++kk) {
          const float a = fi[ii][kk];
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[q] = fmaf(a, fj[jj0 + q][kk], acc[q]);
        }
      }
      const int gi = bi * kSub + ii;
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int gj = bj * kSub + jj0 + q;
        if (gi < r && gj < r) {
          const float e = acc[q] - (gi == gj ? 1.f : 0.f);
          e_out[gi * r + gj] = e;
          fro2 = fmaf(e, e, fro2);
        }
      }
    }
  }
  return block_sum<kThreads>(fro2, red);
}

// 2 gamma / g, with 0/0 taken as 0 (an exactly orthonormal factor is not differentiable there).
__device__ __forceinline__ float grad_scale(float gamma, float g, float inv_l) {
  return g > 0.f ? 2.f * gamma / g * inv_l : 0.f;
}

__global__ void __launch_bounds__(kThreads) regularizer_all_layers_kernel(const RegArgs p) {
  __shared__ float red[kThreads / 32];
  __shared__ bool is_last;
  const RegLayer L = p.layers[blockIdx.x];
  const float inv_l = p.official ? 1.f / float(p.n_layers) : 1.f;
  const int r = L.r, K = L.K, N = L.N;

  float dsq = 0.f;
  for (int i = threadIdx.x; i < r; i += kThreads) {
    const float v = load_as_float(L.d, i, L.dtype_d);
    dsq = fmaf(v, v, dsq);
    L.gd[i] = 2.f * p.beta * v * inv_l;
  }
  dsq = block_sum<kThreads>(dsq, red);

  // A (r, K): rows i, reduction over k.
  const float fa2 = gram_minus_identity(L.a, L.dtype_a, r, K, K, 1, L.gram_a, red);
  const float ga = p.official ? sqrtf(fa2 + float(K - r)) : sqrtf(fa2);
  const float sa = grad_scale(p.gamma, ga, inv_l);
  __syncthreads();  // E_A (global, written by this block) visible to the whole block
  for (int64_t e = threadIdx.x; e < int64_t(r) * K; e += kThreads) {
    const int i = int(e / K), k = int(e % K);
    float acc = 0.f;
    for (int j = 0; j < r; ++j) acc = fmaf(L.gram_a[i * r + j], load_as_float(L.a, int64_t(j) * K + k, L.dtype_a), acc);
    L.ga[e] = sa * acc;
  }

  // B (N, r): rows i are B's columns, reduction over n.
  const float fb2 = gram_minus_identity(L.b, L.dtype_b, r, N, 1, r, L.gram_b, red);
  const float gb = p.official ? sqrtf(fb2 + float(N - r)) : sqrtf(fb2);
  const float sb = grad_scale(p.gamma, gb, inv_l);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < int64_t(N) * r; e += kThreads) {
    const int64_t n = e / r;
    const int i = int(e % r);
    float acc = 0.f;
    for (int j = 0; j < r; ++j) acc = fmaf(load_as_float(L.b, n * r + j, L.dtype_b), L.gram_b[j * r + i], acc);
    L.gb[e] = sb * acc;
  }

  if (threadIdx.x == 0) {
    p.layer_terms[blockIdx.x] = p.beta * dsq + p.gamma * (ga + gb);
    __threadfence();  // the term is visible device-wide before this block is counted
    is_last = atomicAdd(p.counter, 1u) == unsigned(p.n_layers - 1);
  }
  __syncthreads();
  if (is_last && threadIdx.x == 0) {
    __threadfence();
    float total = 0.f;
    for (int l = 0; l < p.n_layers; ++l) total += __ldcg(&p.layer_terms[l]);  // L2, not a stale L1 line
    *p.loss = total * inv_l;
    *p.counter = 0u;
  }
}

}  // namespace

void regularizer(const RegArgs& args, cudaStream_t stream) {
  if (args.n_layers <= 0) throw std::runtime_error("kasa_kernels: regularizer: no layers");
  regularizer_all_layers_kernel<<<args.n_layers, kThreads, 0, stream>>>(args);
  KASA_CHECK_LAUNCH("regularizer_all_layers_kernel");
}

}  // namespace kasa
