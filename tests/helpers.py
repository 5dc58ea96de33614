"""Shared test helpers: every tolerance is derived from the reference's own error in a dtype.

One rule, `reference_bound`, for every kernel-against-reference check:

    |got - ref64|_max <= factor * |ref_lowp - ref64|_max          the plain formula's own error in that dtype
                        + eps(dtype) * |ref64|_max                 one rounding of the result to that dtype
                        + ulps * eps(accumulate) * |magnitude|_max what the order of a sum can move
                        + tiny(accumulate)                         so the bound is > 0 where all of it is exactly 0

`magnitude` is, for each element, the sum of the absolute values of the terms summed into it (for a multilinear
formula: the same formula on |inputs|, in fp64; `kasa_linear_magnitudes` and `regularizer_magnitudes` below). The
reference's own error alone is no floor: on one CPU its BLAS may sum in an order that happens to be nearly exact,
and the kernel, summing in another order, then looks 10x worse than "the reference" without any bug (seen: fp16
regularizer gradients on an Intel Xeon with AMX, where the reference's own error was 3e-11 and the kernel's 1.4e-10).
A sum of n terms in another order moves by a few ulps of sum |terms| at the sizes tested here; a real bug (a wrong
mask, a dropped term, a scaled output) moves it by orders of magnitude more.

The references must be finite: a NaN in ref64 or ref_lowp (e.g. a BLAS call that read poisoned padding) makes the
check fail with that message: a NaN bound fails every comparison, and the message would blame the kernel.
"""
import contextlib
import math

import torch

SUMMATION_ULPS = 4


@contextlib.contextmanager
def torch_threads(n):
    """torch.set_num_threads(n) for the block, the previous count restored after it (the C kernels take it too)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as64(t, what, name):
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    t = t.detach().double().cpu()
    if not torch.isfinite(t).all():
        raise AssertionError(f"{name}: {what} is not finite ({(~torch.isfinite(t)).sum().item()} elements): the test "
                             f"computed it from invalid data, e.g. through a library call that read poisoned padding")
    return t


def reference_bound(ref64, ref_lowp, dtype, *, magnitude, factor=2.0, ulps=SUMMATION_ULPS, accumulate=None,
                    name="check"):
    """(bound, the reference's own max error): see the module docstring. `accumulate` is the dtype the checked code
    sums in (fp32 for every backend here, fp64 for fp64 inputs); pass `dtype` itself where the code under test rounds
    partial sums to it (then the floor is `ulps` ulps of the low-precision dtype)."""
    accumulate = accumulate or _accumulation_dtype(dtype)
    ref64 = _as64(ref64, "the fp64 reference", name)
    ref_lowp = _as64(ref_lowp, f"the {dtype} reference", name)
    magnitude = _as64(magnitude, "the magnitude of the summed terms", name)
    if magnitude.shape != ref64.shape:
        magnitude = magnitude.expand(ref64.shape)
    # sum |terms| >= |sum terms| for every element, up to fp64 rounding: a smaller one was computed wrongly
    short = ref64.abs() - magnitude * (1 + 1e-9)
    if (short > 1e-300).any():
        raise AssertionError(f"{name}: magnitude is below |ref64| by up to {short.max().item():.3e}: it must be the "
                             f"sum of |terms|, not a smaller estimate")
    err_ref = (ref_lowp - ref64).abs().max().item() if ref64.numel() else 0.0
    top = ref64.abs().max().item() if ref64.numel() else 0.0
    mag = magnitude.abs().max().item() if magnitude.numel() else 0.0
    bound = (factor * err_ref + torch.finfo(dtype).eps * top + ulps * torch.finfo(accumulate).eps * mag
             + torch.finfo(accumulate).tiny)
    assert math.isfinite(bound) and bound > 0, f"{name}: bound {bound!r} is not finite and positive"
    return bound, err_ref


def assert_close_to_reference(name, got, ref64, ref_lowp, dtype, *, magnitude, factor=2.0, ulps=SUMMATION_ULPS,
                              accumulate=None):
    """|got - ref64|_max <= reference_bound(...); prints max and mean error first (STYLE.md)."""
    got = got.detach().double().cpu()
    assert got.shape == tuple(ref64.shape), f"{name}: shape {tuple(got.shape)} != reference {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    bound, err_ref = reference_bound(ref64, ref_lowp, dtype, magnitude=magnitude, factor=factor, ulps=ulps,
                                     accumulate=accumulate, name=name)
    err = (got - ref64.detach().double().cpu()).abs()
    emax = err.max().item() if err.numel() else 0.0
    emean = err.mean().item() if err.numel() else 0.0
    print(f"{name} [{dtype}]: max err {emax:.3e} mean {emean:.3e}; reference's own {err_ref:.3e}; bound {bound:.3e}")
    assert emax <= bound, f"{name}: max error {emax:.3e} > bound {bound:.3e}"


def kasa_linear_magnitudes(x, w, b, a, d, bb, gy, scaling, mask=None, p=0.0):
    """[y, dx, dA, dd, dB] of the KaSA layer evaluated on |operands| in fp64 (with |gy| and |scaling|): the formula
    and its gradients are multilinear, so each element is the sum of |terms| summed into the real one."""
    import kasa_reference as ref

    f = lambda t: None if t is None else t.detach().double().cpu().abs()  # noqa: E731
    leaves = [f(t).requires_grad_(True) for t in (x, a, d, bb)]
    m = None if mask is None else mask.cpu()
    y = ref.kasa_linear_ref(leaves[0], f(w), f(b), *leaves[1:], abs(scaling), dropout_mask=m, dropout_p=p)
    return [y.detach()] + [g.detach() for g in torch.autograd.grad(y, leaves, f(gy))]


def regularizer_magnitudes(layers, beta, gamma, form):
    """[loss, (|A|-, |B|-, |d|-gradient magnitudes) per layer] for regularizer_ref over (A, B, d) triples, in fp64.

    The gradient 2 gamma E A / g (E = A A^T - I, g = ||E||_F or sqrt(||E||^2 + K - r)) has two rounding sources:
    the sum E A, whose terms are P |A| with P = |A||A|^T + I, and g itself, which the rounding of E (up to a few ulps
    of P) moves by ||P||_F, i.e. the gradient by |grad| ||P||_F / g. Where E nearly cancels (||A A^T|| ~ 1) the
    second dominates: that is the gradient's real conditioning, not slack. Likewise for B with P = |B|^T |B| + I."""
    scale = 1.0 / len(layers) if form == "official" else 1.0
    loss = 0.0
    grads = []
    for a, b, d in layers:
        A, B, D = (t.detach().double().cpu() for t in (a, b, d))
        r, k = A.shape
        n = B.shape[0]
        eye = torch.eye(r, dtype=torch.float64)
        per = []
        norms = []
        for E, P, F, extra, left in ((A @ A.T - eye, A.abs() @ A.abs().T + eye, A, k - r, True),
                                     (B.T @ B - eye, B.abs().T @ B.abs() + eye, B, n - r, False)):
            f = torch.linalg.matrix_norm(E).item()
            g = (f * f + extra) ** 0.5 if form == "official" else f
            p_norm = torch.linalg.matrix_norm(P).item()
            norms.append(g + p_norm)
            if g == 0.0:
                # E = 0 exactly: the gradient is 0 by convention and has no rounding scale; reference_bound refuses
                # this magnitude, so such a case must be checked for exact zeros instead
                per.append(torch.full_like(F, float("inf")))
                continue
            grad = 2 * gamma * scale * ((E @ F) if left else (F @ E)) / g
            terms = 2 * gamma * scale * ((P @ F.abs()) if left else (F.abs() @ P)) / g
            per.append(terms + grad.abs() * p_norm / g)
        per.append(2 * beta * scale * D.abs())
        grads.append(tuple(per))
        loss += scale * (beta * (D * D).sum().item() + gamma * sum(norms))
    return torch.tensor(loss, dtype=torch.float64), grads


# Whole-model checks (PEFT and transformers integrations), where many ops compose: a fixed per-dtype floor relative
# to max(1, |ref64|) stands in for the summation floor above.
FLOOR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def assert_within_ref(name, out, ref64, ref_lp, dtype):
    """|out - ref64| <= 2 |ref_lp - ref64| + floor * max(1, |ref64|), all as max norms; references must be finite."""
    ref64 = _as64(ref64, "the fp64 reference", name)
    ref_lp = _as64(ref_lp, f"the {dtype} reference", name)
    out = out.detach().double().cpu()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    scale = max(1.0, ref64.abs().max().item())
    err = (out - ref64).abs().max().item()
    ref_err = (ref_lp - ref64).abs().max().item()
    bound = 2 * ref_err + FLOOR[dtype] * scale
    print(f"{name}: err {err:.3e}  ref err {ref_err:.3e}  bound {bound:.3e}")
    assert err <= bound, f"{name}: error {err:.3e} exceeds {bound:.3e} (reference error {ref_err:.3e})"


# ----------------------------------------------------------------------------------------------------------------
# One KaSA linear case, run through a backend and checked against python/kasa_reference (shared by the backend
# test files).

LINEAR_NAMES = ["y", "dx", "dA", "dd", "dB"]


def make_case(lead, k, n, r, dtype, adapter_dtype=None, bias=True, noncontig=False, seed=0, device="cpu"):
    """(x, W, b, A, d, B, G) with x (*lead, K): noncontig makes x a strided view with an offset (every other column
    of a wider tensor, starting at column 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 2 * k if noncontig else k, generator=g)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    a = torch.randn(r, k, generator=g) / k**0.5
    d = torch.randn(r, generator=g)
    bb = torch.randn(n, r, generator=g) / r**0.5
    gy = torch.randn(*lead, n, generator=g)
    adapter_dtype = adapter_dtype or dtype
    x, w, gy = (t.to(device=device, dtype=dtype) for t in (x, w, gy))
    b = None if b is None else b.to(device=device, dtype=dtype)
    a, d, bb = (t.to(device=device, dtype=adapter_dtype) for t in (a, d, bb))
    if noncontig:
        x = x[..., 1::2]
        assert not x.is_contiguous()
    return x, w, b, a, d, bb, gy


def run_backend(x, w, b, a, d, bb, gy, scaling, p=0.0, seed=None, backend="torch", training=True):
    """[y, dx, dA, dd, dB] of kasa_linear on `backend`, with x used as laid out (a view stays a view)."""
    import kasa_kernels as kk

    x = x.detach().requires_grad_(True)
    params = [t.detach().clone().requires_grad_(True) for t in (a, d, bb)]
    y = kk.kasa_linear(x, w, b, *params, scaling, dropout_p=p, training=training, backend=backend, dropout_seed=seed)
    return [y] + list(torch.autograd.grad(y, [x] + params, gy))


def run_reference(x, w, b, a, d, bb, gy, scaling, dtype, mask=None, p=0.0):
    """The reference's [y, dx, dA, dd, dB] with every operand cast to `dtype` (float64 for the oracle)."""
    import kasa_reference as ref

    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, a, d, bb)]
    y = ref.kasa_linear_ref(leaves[0], w.to(dtype), None if b is None else b.to(dtype), *leaves[1:], scaling,
                            dropout_mask=mask, dropout_p=p)
    return [y] + list(torch.autograd.grad(y, leaves, gy.to(dtype)))


def check_against_reference(case, scaling=2.0, p=0.0, backend="torch", weight_ref=None):
    """Forward output and every gradient of `backend` within reference_bound of the reference, for the same dropout
    mask; dtypes and shapes as promised (y and dx in x's dtype, each adapter gradient in its parameter's).

    weight_ref: the (N, K) fp32 matrix the reference uses where the case's weight is a quantized one (bitsandbytes'
    own dequantization of it); the case's weight itself otherwise."""
    from kasa_kernels.ops.rng import keep_mask, make_seed

    x, w_kernel, b, a, d, bb, gy = case
    w = w_kernel if weight_ref is None else weight_ref
    dtype = x.dtype
    seed = make_seed(777, x.device) if p > 0 else None
    mask = keep_mask(seed, x.numel() // x.shape[-1], x.shape[-1], p).view(x.shape) if p > 0 else None
    got = run_backend(x, w_kernel, b, a, d, bb, gy, scaling, p, seed, backend)
    want64 = run_reference(x, w, b, a, d, bb, gy, scaling, torch.float64, mask, p)
    wantlp = run_reference(x, w, b, a, d, bb, gy, scaling, dtype, mask, p)
    assert got[0].dtype == dtype and got[0].shape == (*x.shape[:-1], w.shape[0])
    assert got[1].dtype == dtype and got[1].shape == x.shape
    for t, param in zip(got[2:], (a, d, bb)):
        assert t.dtype == param.dtype and t.shape == param.shape
    magnitude = kasa_linear_magnitudes(x, w, b, a, d, bb, gy, scaling, mask, p)
    for name, g_, w64, wlp, mag in zip(LINEAR_NAMES, got, want64, wantlp, magnitude):
        assert_close_to_reference(f"{backend} {name}", g_, w64, wlp, dtype, magnitude=mag)


def randomize_kasa(model, seed=1, b_scale=0.5):
    """Random lora_B and lora_diag in every KaSA layer (B = 0 at init would hide most of the adapter's math)."""
    import kasa_kernels as kk

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, kk.KasaLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * b_scale)
                m.lora_diag.copy_(torch.randn(m.lora_diag.shape, generator=g))
