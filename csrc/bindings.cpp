// kasa_kernels._C: the host side of the CUDA backend. Every entry point validates its arguments once, here, with a
// message naming the argument, then allocates outputs and launches on torch's current stream. The kernels live in
// the .cu files behind kasa_launch.h and never see a torch header.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "kasa_launch.h"

// setup.py / CMakeLists.txt pass the built architectures as a shell-safe token, e.g. 80_86_90.
#define KASA_STRINGIFY_(x) #x
#define KASA_STRINGIFY(x) KASA_STRINGIFY_(x)
#ifdef KASA_CUDA_ARCHS_TOKEN
#define KASA_CUDA_ARCHS KASA_STRINGIFY(KASA_CUDA_ARCHS_TOKEN)
#else
#define KASA_CUDA_ARCHS ""
#endif

namespace {

using at::Tensor;
using c10::optional;

constexpr int64_t kIntMax = std::numeric_limits<int32_t>::max();

kasa::DType dtype_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kasa::DType::kF32;
    case at::kHalf: return kasa::DType::kF16;
    case at::kBFloat16: return kasa::DType::kBF16;
    default:
      TORCH_CHECK(false, "kasa_kernels cuda: ", name, ": expected float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return kasa::DType::kF32;
}

void check_on(const Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), "kasa_kernels cuda: ", name, ": expected a tensor, got None");
  TORCH_CHECK(t.is_cuda(), "kasa_kernels cuda: ", name, ": expected a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, "kasa_kernels cuda: ", name, ": expected device ", device, ", got ", t.device());
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, "kasa_kernels cuda: ", name, ": expected shape ", want, ", got ", t.sizes());
}

void check_dim_fits(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= kIntMax, "kasa_kernels cuda: ", what, " = ", v, " exceeds the 32-bit index range");
}

// The kernels take a row stride but need unit column stride; other layouts are copied once.
Tensor unit_column_stride(const Tensor& t) { return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous(); }

// Row stride as the kernels see it (rows of a 1-row or 0-size matrix are never stepped over).
int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0); }

// The shared dropout mask: no seed means no dropout. threshold and keep_scale are computed once, in Python
// (kasa_kernels/ops/rng.py: dropout_threshold, keep_scale), and only checked here.
kasa::DropoutArgs make_dropout(int64_t threshold, double keep_scale, const optional<Tensor>& seed,
                               const at::Device& device) {
  kasa::DropoutArgs d;
  if (!seed.has_value() || !seed->defined()) return d;
  check_on(*seed, "seed", device);
  TORCH_CHECK(seed->scalar_type() == at::kLong && seed->dim() == 1 && seed->size(0) == 2 && seed->is_contiguous(),
              "kasa_kernels cuda: seed: expected a contiguous int64 tensor of shape (2,), got ", seed->scalar_type(),
              " ", seed->sizes());
  TORCH_CHECK(threshold >= 0 && threshold <= int64_t(UINT32_MAX), "kasa_kernels cuda: dropout_threshold: expected "
              "0 <= threshold < 2**32, got ", threshold);
  TORCH_CHECK(std::isfinite(keep_scale) && keep_scale >= 1.0, "kasa_kernels cuda: keep_scale: expected a finite "
              "1 / (1 - p) >= 1, got ", keep_scale);
  d.seed = seed->data_ptr<int64_t>();
  d.threshold = static_cast<uint32_t>(threshold);
  d.keep_scale = static_cast<float>(keep_scale);
  return d;
}

struct LinearShapes { int64_t M, K, N, R; };

LinearShapes check_linear(const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_diag,
                          const Tensor& lora_B) {
  const at::Device dev = x.device();
  check_on(x, "x2d", dev);
  TORCH_CHECK(x.dim() == 2, "kasa_kernels cuda: x2d: expected a 2-D tensor (M, K), got shape ", x.sizes());
  dtype_code(x, "x2d");
  check_on(weight, "weight", dev);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1),
              "kasa_kernels cuda: weight: expected shape (N, ", x.size(1), "), got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "kasa_kernels cuda: weight: expected dtype ", x.scalar_type(),
              " (x's), got ", weight.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  check_on(lora_A, "lora_A", dev);
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == K && lora_A.size(0) >= 1,
              "kasa_kernels cuda: lora_A: expected shape (r, ", K, ") with r >= 1, got ", lora_A.sizes());
  const int64_t R = lora_A.size(0);
  dtype_code(lora_A, "lora_A");
  check_on(lora_diag, "lora_diag", dev);
  check_shape(lora_diag, "lora_diag", {R});
  dtype_code(lora_diag, "lora_diag");
  check_on(lora_B, "lora_B", dev);
  check_shape(lora_B, "lora_B", {N, R});
  dtype_code(lora_B, "lora_B");
  check_dim_fits(M, "M (rows of x2d)");
  check_dim_fits(K, "K (in_features)");
  check_dim_fits(N, "N (out_features)");
  check_dim_fits(R, "r (rank)");
  return {M, K, N, R};
}

// fp16 cannot hold H-sized values (65504 max: S = H s d, or gH, can exceed it while the output does not), so the
// rank-R operands left (M, R) and right (R, n) are cast to fp16 after an exact rebalancing by powers of two. The rule
// is kasa_kernels.ops.precision.fp16_rebalance, which the torch backend uses too; it is called here rather than
// written twice (entry points run with the GIL held, from Python).
std::pair<Tensor, Tensor> fp16_rebalance(const Tensor& left, const Tensor& right) {
  py::gil_scoped_acquire gil;
  const py::tuple out = py::module_::import("kasa_kernels.ops.precision").attr("fp16_rebalance")(left, right);
  return {out[0].cast<Tensor>().contiguous(), out[1].cast<Tensor>().contiguous()};
}

// The fused GEMM for x's dtype (forward: out = x w^T + lx lw^T + bias; backward: out = x w + drop(lx lw)).
void run_gemm_lowrank(kasa::DType dt, bool forward, const kasa::GemmLowrankArgs& g, bool allow_tf32,
                      cudaStream_t stream) {
  switch (dt) {
    case kasa::DType::kF16: kasa::gemm_lowrank_f16(forward, g, stream); break;
    case kasa::DType::kBF16: kasa::gemm_lowrank_bf16(forward, g, stream); break;
    case kasa::DType::kF32:
      kasa::gemm_lowrank_f32(forward, allow_tf32 ? kasa::Fp32Math::kTF32 : kasa::Fp32Math::kFFMA, g, stream);
      break;
  }
}

// bias (N,) in x's dtype, made contiguous, or an undefined tensor when absent.
Tensor checked_bias(const optional<Tensor>& bias_in, int64_t N, const Tensor& x, const at::Device& dev) {
  if (!bias_in.has_value() || !bias_in->defined()) return Tensor();
  check_on(*bias_in, "bias", dev);
  check_shape(*bias_in, "bias", {N});
  TORCH_CHECK(bias_in->scalar_type() == x.scalar_type(), "kasa_kernels cuda: bias: expected dtype ", x.scalar_type(),
              " (x's), got ", bias_in->scalar_type());
  return bias_in->contiguous();
}

std::tuple<Tensor, Tensor> linear_forward(const Tensor& x_in, const Tensor& weight_in, const optional<Tensor>& bias_in,
                                          const Tensor& lora_A, const Tensor& lora_diag, const Tensor& lora_B,
                                          double scaling, int64_t dropout_threshold, double keep_scale,
                                          const optional<Tensor>& seed, bool allow_tf32) {
  const LinearShapes s = check_linear(x_in, weight_in, lora_A, lora_diag, lora_B);
  const at::Device dev = x_in.device();
  const Tensor bias = checked_bias(bias_in, s.N, x_in, dev);
  const kasa::DropoutArgs drop = make_dropout(dropout_threshold, keep_scale, seed, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const kasa::DType dt = dtype_code(x_in, "x2d");

  Tensor y = at::empty({s.M, s.N}, x_in.options());
  Tensor h = at::empty({s.M, s.R}, x_in.options().dtype(at::kFloat));
  if (s.M == 0) return {y, h};
  const Tensor x = unit_column_stride(x_in);
  const Tensor weight = unit_column_stride(weight_in);
  const Tensor a32 = lora_A.to(at::kFloat).contiguous();
  const Tensor sd = (lora_diag.to(at::kFloat) * scaling).contiguous();
  Tensor s_lowp = at::empty({s.M, s.R}, x_in.options());

  kasa::ShrinkArgs sa{};
  sa.x = x.data_ptr(); sa.ldx = row_stride(x);
  sa.a = a32.data_ptr<float>(); sa.sd = sd.data_ptr<float>();
  sa.h = h.data_ptr<float>(); sa.s = s_lowp.data_ptr();
  sa.M = int(s.M); sa.K = int(s.K); sa.R = int(s.R);
  sa.drop = drop;
  sa.splits = kasa::lowrank_shrink_splits(dt, sa.M, sa.K, sa.R);
  Tensor shrink_partial;  // K split over blocks (few rows): per-split sums, added in a fixed order by the kernel
  if (sa.splits > 1) {
    shrink_partial = at::empty({sa.splits, s.M, s.R}, x_in.options().dtype(at::kFloat));
    sa.partial = shrink_partial.data_ptr<float>();
  }
  kasa::lowrank_shrink(dt, sa, stream);

  if (s.N == 0) return {y, h};
  const Tensor b_lowp = dt == kasa::DType::kF16 ? Tensor() : lora_B.to(x_in.scalar_type()).contiguous();
  kasa::GemmLowrankArgs g{};
  g.x = x.data_ptr(); g.ldx = row_stride(x);
  g.w = weight.data_ptr(); g.ldw = row_stride(weight);
  g.M = int(s.M); g.N = int(s.N); g.K = int(s.K);
  g.lx = s_lowp.data_ptr(); g.ldlx = s.R;
  g.lw = b_lowp.defined() ? b_lowp.data_ptr() : nullptr; g.ldlw = s.R;
  g.R = int(s.R);
  g.bias = bias.defined() ? bias.data_ptr() : nullptr;
  g.out = y.data_ptr(); g.ldo = s.N;
  Tensor s16, b16;  // fp16's range: see fp16_rebalance; the rank-R term stays fused
  if (dt == kasa::DType::kF16) {
    Tensor b16_rows;
    std::tie(s16, b16_rows) = fp16_rebalance(h * sd, lora_B.to(at::kFloat).t());
    b16 = b16_rows.t().contiguous();  // back to B's (N, R) layout, which the forward GEMM reads
    g.lx = s16.data_ptr();
    g.lw = b16.data_ptr();
  }
  run_gemm_lowrank(dt, /*forward=*/true, g, allow_tf32, stream);
  return {y, h};
}

// out = x W^T + b: the forward GEMM of linear_forward with the adapter switched off (no rank-R k-steps), so the
// benchmarks can compare this kernel alone with cuBLAS.
Tensor base_gemm(const Tensor& x_in, const Tensor& weight_in, const optional<Tensor>& bias_in, bool allow_tf32) {
  const at::Device dev = x_in.device();
  check_on(x_in, "x2d", dev);
  TORCH_CHECK(x_in.dim() == 2, "kasa_kernels cuda: x2d: expected a 2-D tensor (M, K), got shape ", x_in.sizes());
  const kasa::DType dt = dtype_code(x_in, "x2d");
  check_on(weight_in, "weight", dev);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(1),
              "kasa_kernels cuda: weight: expected shape (N, ", x_in.size(1), "), got ", weight_in.sizes());
  TORCH_CHECK(weight_in.scalar_type() == x_in.scalar_type(), "kasa_kernels cuda: weight: expected dtype ",
              x_in.scalar_type(), " (x's), got ", weight_in.scalar_type());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0);
  check_dim_fits(M, "M (rows of x2d)");
  check_dim_fits(K, "K (in_features)");
  check_dim_fits(N, "N (out_features)");
  const Tensor bias = checked_bias(bias_in, N, x_in, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  Tensor y = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return y;
  const Tensor x = unit_column_stride(x_in);
  const Tensor weight = unit_column_stride(weight_in);
  kasa::GemmLowrankArgs g{};
  g.x = x.data_ptr(); g.ldx = row_stride(x);
  g.w = weight.data_ptr(); g.ldw = row_stride(weight);
  g.M = int(M); g.N = int(N); g.K = int(K);
  g.R = 0;
  g.bias = bias.defined() ? bias.data_ptr() : nullptr;
  g.out = y.data_ptr(); g.ldo = N;
  run_gemm_lowrank(dt, /*forward=*/true, g, allow_tf32, stream);
  return y;
}

// Backward's dY pass: gH (fp32, and in x's dtype for bf16's dX GEMM), dB and dd from one read of G. dB is reduced
// over M by atomics, or per row tile and summed in a fixed order under deterministic algorithms; dd and gH always
// in a fixed order.
struct DyPassResult { Tensor gh, gh_lowp, dd, db; };

DyPassResult run_dy_pass(kasa::DType dt, const Tensor& grad_y, const Tensor& h, const Tensor& lora_B,
                         const Tensor& lora_diag, double scaling, const LinearShapes& s, bool need_gh_lowp,
                         cudaStream_t stream) {
  const auto f32 = grad_y.options().dtype(at::kFloat);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int64_t m_tiles = (s.M + kasa::kDyRows - 1) / kasa::kDyRows;
  const Tensor b32 = lora_B.to(at::kFloat).contiguous();
  const Tensor d32 = lora_diag.to(at::kFloat).contiguous();
  DyPassResult out;
  out.gh = at::empty({s.M, s.R}, f32);
  if (need_gh_lowp) out.gh_lowp = at::empty({s.M, s.R}, grad_y.options());
  Tensor dd_partial = at::empty({m_tiles, s.R}, f32);
  out.db = deterministic ? at::empty({s.N, s.R}, f32) : at::zeros({s.N, s.R}, f32);
  Tensor db_partial;
  if (deterministic && s.N > 0) db_partial = at::empty({m_tiles, s.N, s.R}, f32);
  kasa::DyPassArgs dy{};
  dy.g = grad_y.data_ptr(); dy.ldg = row_stride(grad_y);
  dy.b = b32.data_ptr<float>(); dy.h = h.data_ptr<float>(); dy.d = d32.data_ptr<float>();
  dy.scaling = static_cast<float>(scaling);
  dy.M = int(s.M); dy.N = int(s.N); dy.R = int(s.R);
  dy.gh = out.gh.data_ptr<float>();
  dy.gh_lowp = out.gh_lowp.defined() ? out.gh_lowp.data_ptr() : nullptr;
  dy.db = out.db.data_ptr<float>();
  dy.db_partial = db_partial.defined() ? db_partial.data_ptr<float>() : nullptr;
  dy.dd_partial = dd_partial.data_ptr<float>();
  dy.splits = kasa::dy_pass_splits(dt, dy.M, dy.N, dy.R);
  Tensor gz_partial = at::empty({dy.splits, s.M, s.R}, f32);  // each column slice's G B, added in slice order
  dy.gz_partial = gz_partial.data_ptr<float>();
  kasa::dy_pass(dt, dy, stream);
  out.dd = at::empty({s.R}, f32);
  kasa::sum_partials(dd_partial.data_ptr<float>(), m_tiles, s.R, out.dd.data_ptr<float>(), stream);
  if (db_partial.defined())
    kasa::sum_partials(db_partial.data_ptr<float>(), m_tiles, s.N * s.R, out.db.data_ptr<float>(), stream);
  return out;
}

// dA (R, K) fp32 = gH^T dropout(x), split over M when few row blocks exist, partials summed in a fixed order.
Tensor run_lowrank_da(kasa::DType dt, const Tensor& x, const Tensor& gh, const kasa::DropoutArgs& drop,
                      const LinearShapes& s, cudaStream_t stream) {
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor da = at::empty({s.R, s.K}, f32);
  kasa::LowrankDaArgs la{};
  la.x = x.data_ptr(); la.ldx = row_stride(x);
  la.gh = gh.data_ptr<float>();
  la.M = int(s.M); la.K = int(s.K); la.R = int(s.R);
  la.da = da.data_ptr<float>();
  la.splits = kasa::lowrank_da_splits(dt, la.M, la.K, la.R);
  Tensor partial;
  if (la.splits > 1) {
    partial = at::empty({la.splits, s.R, s.K}, f32);
    la.partial = partial.data_ptr<float>();
  }
  la.drop = drop;
  kasa::lowrank_da(dt, la, stream);
  if (la.splits > 1) kasa::sum_partials(la.partial, la.splits, s.R * s.K, la.da, stream);
  return da;
}

// dx (M, K) = G W + drop(gH A): the fused GEMM with the rank-R term masked per element when dropout is on.
Tensor run_dx_gemm(kasa::DType dt, const Tensor& grad_y, const Tensor& weight_in, const Tensor& lora_A,
                   const DyPassResult& dy, const kasa::DropoutArgs& drop, const LinearShapes& s, bool allow_tf32,
                   cudaStream_t stream) {
  Tensor dx = at::empty({s.M, s.K}, grad_y.options());
  if (s.K == 0) return dx;
  const Tensor weight = unit_column_stride(weight_in);
  const Tensor a_lowp = dt == kasa::DType::kF16 ? Tensor() : lora_A.to(grad_y.scalar_type()).contiguous();
  kasa::GemmLowrankArgs g{};
  g.x = grad_y.data_ptr(); g.ldx = row_stride(grad_y);
  g.w = weight.data_ptr(); g.ldw = row_stride(weight);  // W (N, K) read as the K-dim-major (N x K) operand
  g.M = int(s.M); g.N = int(s.K); g.K = int(s.N);
  g.lx = dy.gh_lowp.defined() ? dy.gh_lowp.data_ptr() : dy.gh.data_ptr(); g.ldlx = s.R;
  g.lw = a_lowp.defined() ? a_lowp.data_ptr() : nullptr; g.ldlw = s.K;
  g.R = int(s.R);
  g.bias = nullptr;
  g.out = dx.data_ptr(); g.ldo = s.K;
  g.drop = drop;
  Tensor gh16, a16;  // fp16's range: see fp16_rebalance (the dropout mask applies unchanged)
  if (dt == kasa::DType::kF16) {
    std::tie(gh16, a16) = fp16_rebalance(dy.gh, lora_A.to(at::kFloat));
    g.lx = gh16.data_ptr();
    g.lw = a16.data_ptr();
  }
  run_gemm_lowrank(dt, /*forward=*/false, g, allow_tf32, stream);
  return dx;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_backward(
    const Tensor& grad_y_in, const Tensor& x_in, const Tensor& weight_in, const Tensor& lora_A, const Tensor& lora_diag,
    const Tensor& lora_B, const Tensor& h_in, double scaling, int64_t dropout_threshold, double keep_scale,
    const optional<Tensor>& seed, bool need_dx, bool need_da, bool need_dd, bool need_db, bool allow_tf32) {
  const LinearShapes s = check_linear(x_in, weight_in, lora_A, lora_diag, lora_B);
  const at::Device dev = x_in.device();
  check_on(grad_y_in, "grad_y", dev);
  check_shape(grad_y_in, "grad_y", {s.M, s.N});
  TORCH_CHECK(grad_y_in.scalar_type() == x_in.scalar_type(), "kasa_kernels cuda: grad_y: expected dtype ",
              x_in.scalar_type(), " (x's), got ", grad_y_in.scalar_type());
  check_on(h_in, "h", dev);
  check_shape(h_in, "h", {s.M, s.R});
  TORCH_CHECK(h_in.scalar_type() == at::kFloat, "kasa_kernels cuda: h: expected float32, got ", h_in.scalar_type());
  const kasa::DropoutArgs drop = make_dropout(dropout_threshold, keep_scale, seed, dev);
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const kasa::DType dt = dtype_code(x_in, "x2d");
  const auto f32 = x_in.options().dtype(at::kFloat);
  // A fresh (0,) fp32 tensor per unneeded output: torch.library.custom_op rejects outputs that share a storage
  // ("may not alias ... other returns"), so one shared placeholder for, e.g., dd and db would raise.
  auto none = [&] { return at::empty({0}, f32); };

  if (s.M == 0) {
    return {need_dx ? at::empty({0, s.K}, x_in.options()) : none(), need_da ? at::zeros({s.R, s.K}, f32) : none(),
            need_dd ? at::zeros({s.R}, f32) : none(), need_db ? at::zeros({s.N, s.R}, f32) : none()};
  }
  if (!(need_dx || need_da || need_dd || need_db)) return {none(), none(), none(), none()};

  const Tensor grad_y = unit_column_stride(grad_y_in);
  const DyPassResult dy = run_dy_pass(dt, grad_y, h_in.contiguous(), lora_B, lora_diag, scaling, s,
                                      /*need_gh_lowp=*/need_dx && dt == kasa::DType::kBF16, stream);
  Tensor da = need_da ? run_lowrank_da(dt, unit_column_stride(x_in), dy.gh, drop, s, stream) : none();
  Tensor dx = need_dx ? run_dx_gemm(dt, grad_y, weight_in, lora_A, dy, drop, s, allow_tf32, stream) : none();
  return {dx, da, need_dd ? dy.dd : none(), need_db ? dy.db : none()};
}

// Returns (loss, flat): the fp32 gradients of every A, then every B, then every d, each flattened, in one buffer
// (kasa_kernels/ops/defs.py's layout for the regularizer op).
std::tuple<Tensor, Tensor> regularizer(
    const std::vector<Tensor>& lora_As, const std::vector<Tensor>& lora_Bs, const std::vector<Tensor>& lora_diags,
    double beta, double gamma, bool official) {
  const size_t L = lora_As.size();
  TORCH_CHECK(L >= 1, "kasa_kernels cuda: lora_As: expected at least one layer");
  TORCH_CHECK(lora_Bs.size() == L && lora_diags.size() == L, "kasa_kernels cuda: lora_As, lora_Bs, lora_diags: "
              "expected equal lengths, got ", L, ", ", lora_Bs.size(), ", ", lora_diags.size());
  TORCH_CHECK(L <= size_t(kIntMax), "kasa_kernels cuda: too many layers");
  const at::Device dev = lora_As[0].device();
  check_on(lora_As[0], "lora_As[0]", dev);  // before the guard, which needs a CUDA device
  const c10::cuda::CUDAGuard guard(dev);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dev.index()).stream();
  const auto f32 = lora_As[0].options().dtype(at::kFloat);

  std::vector<Tensor> keep;  // contiguous inputs, alive until the launch is enqueued (the caching allocator
  keep.reserve(3 * L);       // keeps their memory stream-ordered after that)
  std::vector<kasa::RegLayer> table(L);
  int64_t numel_a = 0, numel_b = 0, numel_d = 0;
  for (size_t l = 0; l < L; ++l) {
    numel_a += lora_As[l].numel();
    numel_b += lora_Bs[l].numel();
    numel_d += lora_diags[l].numel();
  }
  Tensor flat = at::empty({numel_a + numel_b + numel_d}, f32);
  int64_t off_a = 0, off_b = numel_a, off_d = numel_a + numel_b;
  int64_t gram_elems = 0;
  for (size_t l = 0; l < L; ++l) {
    const std::string tag = "[" + std::to_string(l) + "]";
    const std::string na = "lora_As" + tag, nb = "lora_Bs" + tag, nd = "lora_diags" + tag;
    const Tensor& a = lora_As[l];
    const Tensor& b = lora_Bs[l];
    const Tensor& d = lora_diags[l];
    check_on(a, na.c_str(), dev);
    check_on(b, nb.c_str(), dev);
    check_on(d, nd.c_str(), dev);
    TORCH_CHECK(a.dim() == 2 && a.size(0) >= 1, "kasa_kernels cuda: ", na, ": expected shape (r, K), got ", a.sizes());
    const int64_t r = a.size(0), K = a.size(1);
    TORCH_CHECK(b.dim() == 2 && b.size(1) == r, "kasa_kernels cuda: ", nb, ": expected shape (N, ", r, "), got ",
                b.sizes());
    check_shape(d, nd.c_str(), {r});
    const int64_t N = b.size(0);
    check_dim_fits(r * K, (na + " numel").c_str());
    check_dim_fits(N * r, (nb + " numel").c_str());
    TORCH_CHECK(r <= 4096, "kasa_kernels cuda: ", na, ": rank ", r, " exceeds the supported 4096");
    kasa::RegLayer& t = table[l];
    t.dtype_a = int(dtype_code(a, na.c_str()));
    t.dtype_b = int(dtype_code(b, nb.c_str()));
    t.dtype_d = int(dtype_code(d, nd.c_str()));
    keep.push_back(a.contiguous());
    keep.push_back(b.contiguous());
    keep.push_back(d.contiguous());
    t.a = keep[keep.size() - 3].data_ptr();
    t.b = keep[keep.size() - 2].data_ptr();
    t.d = keep[keep.size() - 1].data_ptr();
    t.ga = flat.data_ptr<float>() + off_a;
    t.gb = flat.data_ptr<float>() + off_b;
    t.gd = flat.data_ptr<float>() + off_d;
    off_a += r * K;
    off_b += N * r;
    off_d += r;
    t.r = int(r); t.K = int(K); t.N = int(N);
    gram_elems += 2 * r * r;
  }
  Tensor grams = at::empty({gram_elems}, f32);
  int64_t off = 0;
  for (auto& t : table) {
    t.gram_a = grams.data_ptr<float>() + off;
    off += int64_t(t.r) * t.r;
    t.gram_b = grams.data_ptr<float>() + off;
    off += int64_t(t.r) * t.r;
  }
  // The table goes through pinned memory so the copy is stream-ordered and does not block the host.
  const int64_t bytes = int64_t(L * sizeof(kasa::RegLayer));
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), table.data(), size_t(bytes));
  Tensor dev_table = host.to(dev, /*non_blocking=*/true);
  Tensor terms = at::empty({int64_t(L)}, f32);
  Tensor counter = at::zeros({1}, lora_As[0].options().dtype(at::kInt));
  Tensor loss = at::empty({}, f32);

  kasa::RegArgs args{};
  args.layers = reinterpret_cast<const kasa::RegLayer*>(dev_table.data_ptr());
  args.n_layers = int(L);
  args.beta = float(beta);
  args.gamma = float(gamma);
  args.official = official;
  args.layer_terms = terms.data_ptr<float>();
  args.counter = reinterpret_cast<unsigned int*>(counter.data_ptr<int>());
  args.loss = loss.data_ptr<float>();
  kasa::regularizer(args, stream);
  return {loss, flat};
}

// (ok, message): whether a kernel image in this build runs on `device_index`.
std::tuple<bool, std::string> kernel_image_status(int64_t device_index) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index));
  int binary = 0, ptx = 0;
  const cudaError_t err = kasa::kernel_image_info(&binary, &ptx);
  if (err != cudaSuccess) return {false, std::string(cudaGetErrorString(err))};
  return {true, "sm_" + std::to_string(binary) + " image (PTX " + std::to_string(ptx) + ")"};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kasa_kernels CUDA C++ kernels (see kasa_kernels/ops/cuda_linear.py and cuda_reg.py)";
  m.def("linear_forward", &linear_forward, "Y = x W^T + b + s ((dropout(x) A^T) d) B^T; returns (Y, H fp32)",
        py::arg("x2d"), py::arg("weight"), py::arg("bias"), py::arg("lora_A"), py::arg("lora_diag"), py::arg("lora_B"),
        py::arg("scaling"), py::arg("dropout_threshold"), py::arg("keep_scale"), py::arg("seed"),
        py::arg("allow_tf32"));
  m.def("linear_backward", &linear_backward, "(dx, dA, dd, dB); empty tensors where not needed", py::arg("grad_y"),
        py::arg("x2d"), py::arg("weight"), py::arg("lora_A"), py::arg("lora_diag"), py::arg("lora_B"), py::arg("h"),
        py::arg("scaling"), py::arg("dropout_threshold"), py::arg("keep_scale"), py::arg("seed"), py::arg("need_dx"),
        py::arg("need_da"), py::arg("need_dd"), py::arg("need_db"), py::arg("allow_tf32"));
  m.def("base_gemm", &base_gemm, "x W^T + b with the fused GEMM kernel and the adapter switched off",
        py::arg("x2d"), py::arg("weight"), py::arg("bias"), py::arg("allow_tf32"));
  m.def("regularizer", &regularizer, "(loss, flat fp32 gradients of every A, B, d) of the KaSA regularizer",
        py::arg("lora_As"), py::arg("lora_Bs"), py::arg("lora_diags"), py::arg("beta"), py::arg("gamma"),
        py::arg("official"));
  m.def("kernel_image_status", &kernel_image_status, py::arg("device_index"));
  m.attr("compiled_archs") = std::string(KASA_CUDA_ARCHS);
}
