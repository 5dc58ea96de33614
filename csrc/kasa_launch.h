// The boundary between the host-side bindings (bindings.cpp, which sees torch) and the kernels (the .cu files,
// which do not): plain structs of raw pointers and sizes, and one launcher per fused op. Keeping torch headers out
// of nvcc's translation units keeps the build short (docs/design.md: CI compiles on 2 cores).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kasa {

enum class DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Dropout parameters of the shared hash mask (kasa_kernels/ops/rng.py). `seed` is the (2,) int64 device tensor,
// read inside the kernels so that drawing a seed never syncs the host.
struct DropoutArgs {
  const int64_t* seed = nullptr;  // null: no dropout
  uint32_t threshold = 0;         // keep iff hash >= threshold
  float keep_scale = 1.f;         // 1 / (1 - p)
};

// Forward shrink: H = dropout(x) A^T (fp32) and S = H * sd (in x's dtype, the GEMM's low-rank operand).
// When too few row blocks exist to fill the GPU (decode sizes), K is split over `splits` blocks per row block; the
// slices go to `partial` and a second launch adds them in slice order (no atomics) and writes H and S.
struct ShrinkArgs {
  const void* x; int64_t ldx;  // (M, K), unit column stride
  const float* a;              // (R, K) contiguous
  const float* sd;             // (R,)  s * d
  float* h;                    // (M, R) contiguous
  void* s;                     // (M, R) contiguous, x's dtype
  int M, K, R;
  DropoutArgs drop;
  int splits = 1;              // lowrank_shrink_splits(...) for these sizes
  float* partial = nullptr;    // (splits, M, R) fp32 workspace when splits > 1, allocated by the caller
};
// The split count lowrank_shrink expects for x of dtype dt and these sizes (depends on the current device).
int lowrank_shrink_splits(DType dt, int M, int K, int R);
void lowrank_shrink(DType dt, const ShrinkArgs& args, cudaStream_t stream);

// Backward dY pass over G (M, N): gH = s (G B) * d, dB = s G^T (H * d), dd = colsum(s (G B) * H).
// N is split over `splits` column slices (dy_pass_splits) so that the blocks fill the GPU; each slice's G B goes to
// gz_partial and a second launch adds the slices in order (no atomics) and writes gH, gh_lowp and dd_partial.
struct DyPassArgs {
  const void* g; int64_t ldg;  // (M, N), unit column stride
  const float* b;              // (N, R) contiguous
  const float* h;              // (M, R) contiguous
  const float* d;              // (R,)
  float scaling;
  int M, N, R;
  float* gh;                   // (M, R) fp32
  void* gh_lowp;               // (M, R) in g's dtype, or null
  float* db;                   // (N, R): atomically accumulated (zeroed by caller) unless db_partial is set
  float* db_partial;           // (ceil(M / kDyRows), N, R) or null (deterministic mode)
  float* dd_partial;           // (ceil(M / kDyRows), R)
  int splits = 1;              // dy_pass_splits(...) for these sizes
  float* gz_partial = nullptr; // (splits, M, R) fp32 workspace, allocated by the caller
};
constexpr int kDyRows = 128;
// The column-slice count dy_pass expects for G of dtype dt and these sizes (depends on the current device).
int dy_pass_splits(DType dt, int M, int N, int R);
void dy_pass(DType dt, const DyPassArgs& args, cudaStream_t stream);

// out[e] = sum_t partial[t * n + e], t in a fixed order (deterministic).
void sum_partials(const float* partial, int64_t tiles, int64_t n, float* out, cudaStream_t stream);

// dA = gH^T dropout(x), reduced over M in `splits` slices written to `partial` (splits > 1) or straight to da.
struct LowrankDaArgs {
  const void* x; int64_t ldx;  // (M, K)
  const float* gh;             // (M, R)
  int M, K, R;
  float* da;                   // (R, K)
  float* partial;              // (splits, R, K) when splits > 1
  int splits;
  DropoutArgs drop;
};
// The row-slice count lowrank_da expects for x of dtype dt and these sizes (depends on the current device).
int lowrank_da_splits(DType dt, int M, int K, int R);
void lowrank_da(DType dt, const LowrankDaArgs& args, cudaStream_t stream);

// The tensor-core GEMM with the rank-R term fused:
//   forward  (b_kmajor): out = x w^T + lx lw^T + bias      x (M,K) w (N,K) lx (M,R) lw (N,R)
//   backward          : out = x w + drop(lx lw)           x (M,K) w (K,N) lx (M,R) lw (R,N)
// drop(.) is the dropout mask of `drop` at element (m, n) of out (dx), scaled by keep_scale; without dropout the
// rank-R term is simply R extra steps of the same accumulator.
struct GemmLowrankArgs {
  const void* x; int64_t ldx;
  const void* w; int64_t ldw;
  int M, N, K;
  const void* lx; int64_t ldlx;
  const void* lw; int64_t ldlw;
  int R;
  const void* bias;  // (N,) or null
  void* out; int64_t ldo;
  DropoutArgs drop;  // backward only
};
enum class Fp32Math : int { kTF32 = 0, kFFMA = 1 };
// Per-dtype halves, one translation unit each so that ninja compiles them in parallel.
void gemm_lowrank_f16(bool forward, const GemmLowrankArgs& args, cudaStream_t stream);
void gemm_lowrank_bf16(bool forward, const GemmLowrankArgs& args, cudaStream_t stream);
void gemm_lowrank_f32(bool forward, Fp32Math math, const GemmLowrankArgs& args, cudaStream_t stream);

// Regularizer: one block per layer, one launch for the model.
struct RegLayer {
  const void* a; const void* b; const void* d;  // (r, K), (N, r), (r,), contiguous
  float* ga; float* gb; float* gd;              // gradients, fp32, same shapes
  float* gram_a; float* gram_b;                 // r x r workspaces
  int r, K, N;
  int dtype_a, dtype_b, dtype_d;                // DType codes
};
struct RegArgs {
  const RegLayer* layers;  // device table
  int n_layers;
  float beta, gamma;
  bool official;
  float* layer_terms;      // (n_layers,) workspace
  unsigned int* counter;   // zeroed; the last block to finish sums the terms and resets it
  float* loss;             // 0-dim
};
void regularizer(const RegArgs& args, cudaStream_t stream);

// Whether this build holds a kernel image the current device can run (cubin or PTX), for probe().
cudaError_t kernel_image_info(int* binary_version, int* ptx_version);

}  // namespace kasa
