"""Memory (no growth over many steps, nothing M x N saved for backward, activation checkpointing) and numerics (fp16
of large magnitude, regularizer at B = 0 and at exactly orthonormal A)."""
from __future__ import annotations

import gc
import weakref
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import kasa_kernels as kk
import kasa_reference as ref

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKENDS = [n for n, i in kk.backends(DEVICE).items() if i.available and not (n == "triton" and DEVICE.type == "cpu")]


def _live_tensors():
    """Live real tensors (fake and meta tensors left in torch.compile caches by earlier tests are not this test's
    business). Returned as {id: weakref}, so a later call can tell which tensors are new."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some torch.distributed module objects warns of deprecation
        warnings.simplefilter("ignore")
        ts = [o for o in gc.get_objects()
              if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.device.type != "meta"]
    return {id(t): weakref.ref(t) for t in ts}


def _new_since(before):
    """(count, bytes) of live tensors that did not exist at `before`. Tensors freed meanwhile (caches of earlier tests
    being collected) do not offset new ones."""
    new = [w() for key, w in _live_tensors().items() if key not in before or before[key]() is not w()]
    new = [t for t in new if t is not None]
    return len(new), sum(t.numel() * t.element_size() for t in new)


def _model(backend, dropout=0.0, dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Sequential(kk.KasaLinear(24, 40, r=4, dropout=dropout, backend=backend, dtype=dtype), nn.GELU(),
                      kk.KasaLinear(40, 16, r=4, dropout=dropout, backend=backend, dtype=dtype)).to(DEVICE)
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.lora_B.normal_()
    return m


def _steps(model, n, leak=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for i in range(n):
        x = torch.randn(3, 7, 24, device=DEVICE, dtype=model[0].weight.dtype)
        loss = model(x).float().pow(2).mean() + kk.kasa_regularizer(model)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        if leak is not None:
            leak.append(loss)  # keeps the whole graph of this step alive


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_no_growth_over_many_steps_cpu(backend, dropout):
    model = _model(backend, dropout)
    _steps(model, 5)  # warm-up: optimizer state, grads, caches
    before = _live_tensors()
    _steps(model, 60)
    n, nbytes = _new_since(before)
    assert n == 0, f"{n} tensors ({nbytes} bytes) created during 60 steps are still alive"


def test_the_growth_check_catches_a_leak():
    # the check above is sensitive: keeping each step's loss (and so its graph) alive is detected
    model, kept = _model("torch"), []
    _steps(model, 5)
    before = _live_tensors()
    _steps(model, 20, leak=kept)
    assert _new_since(before)[0] >= 20


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_growth_over_many_steps_gpu(backend):
    model = _model(backend, 0.1, torch.bfloat16)
    _steps(model, 5)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    _steps(model, 200)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


def _saved_for_backward(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "3d"])
def test_nothing_activation_sized_is_saved(backend, dropout, layout):
    # M, K, N, r pairwise distinct and M*N, M*K distinct from every parameter size
    m, k, n, r = 30, 22, 34, 3
    layer = kk.KasaLinear(k, n, r=r, dropout=dropout, backend=backend).to(DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()
    if layout == "contiguous":
        x = torch.randn(m, k, device=DEVICE)
    elif layout == "strided":
        x = torch.randn(m, 2 * k, device=DEVICE)[:, ::2]
    else:
        x = torch.randn(5, 6, k, device=DEVICE)
    x.requires_grad_(True)
    y, saved = _saved_for_backward(lambda: layer(x))
    assert saved, "the saved-tensor hooks saw nothing: the check would be vacuous"
    params = {p.data_ptr() for p in layer.parameters()}
    for t in saved:
        assert t.numel() != m * n, f"saved an M x N tensor {tuple(t.shape)}"
        if t.numel() == m * k:
            assert t.data_ptr() == x.data_ptr(), f"saved an M x K tensor that is not x: {tuple(t.shape)}"
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in params | {x.data_ptr()})
    assert extra <= m * r * 4 + 2 * 8, f"{extra} bytes saved beyond x and the parameters (allowed: H and the seed)"
    y.float().sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(backend, use_reentrant):
    # dropout on: the seed is drawn from torch's generator, which checkpoint restores for the recomputation
    def run(ckpt):
        model = _model(backend, dropout=0.25)
        torch.manual_seed(5)
        x = torch.randn(4, 9, 24, device=DEVICE, requires_grad=True)
        y = checkpoint(model, x, use_reentrant=use_reentrant) if ckpt else model(x)
        y.pow(2).sum().backward()
        return [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]

    plain, ckpt = run(False), run(True)
    assert len(plain) == 7
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)
    # and the comparison is not vacuous: another dropout seed changes the gradients
    model = _model(backend, dropout=0.25)
    torch.manual_seed(6)
    x = torch.randn(4, 9, 24, device=DEVICE, requires_grad=True)
    torch.manual_seed(99)
    model(x).pow(2).sum().backward()
    assert not torch.equal(x.grad, plain[0])


# ---------------------------------------------------------------------------------------------------------------
# Numerics


def _large_fp16_case(k=2048, m=16, n=64, r=4, magnitude=2e3):
    """|x| ~ 2e3, A aligned with x's signs (|A| = 1/sqrt(K), the init bound): every H = x A^T ~ 2e3 sqrt(K) ~ 9e4
    exceeds fp16's 65504, so a naive fp16 accumulation (or an fp16 copy of H or S = s H d) overflows. B is small, so
    the output itself (~500) is well inside fp16's range."""
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (k,), generator=g).float() * 2 - 1
    x = (magnitude * sign * (0.9 + 0.2 * torch.rand(m, k, generator=g))).half()
    w = (torch.randn(n, k, generator=g) * 1e-5).half()
    a = sign / k**0.5 * torch.linspace(1.0, 0.7, r)[:, None]
    d = torch.ones(r)
    b = torch.randn(n, r, generator=g) * 1e-3
    return x, w, a, d, b


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_large_magnitude_does_not_overflow_in_the_adapter_path(backend):
    x, w, a, d, b = _large_fp16_case()
    h64 = x.double() @ a.double().t()
    assert h64.abs().max() > 65504, "the case must overflow a naive fp16 accumulation of H"
    x = x.to(DEVICE).requires_grad_(True)
    params = [t.to(DEVICE).requires_grad_(True) for t in (a, d, b)]
    y = kk.kasa_linear(x, w.to(DEVICE), None, *params, 1.0, backend=backend)
    gy = torch.ones_like(y)
    grads = torch.autograd.grad(y, [x] + params, gy)
    leaves = [t.detach().double().requires_grad_(True) for t in [x] + params]
    y64 = ref.kasa_linear_ref(leaves[0], w.double().to(DEVICE), None, *leaves[1:], 1.0)
    grads64 = torch.autograd.grad(y64, leaves, gy.double())
    assert y64.abs().max() < 1e3
    for name, got, want in zip(["y", "dx", "dA", "dd", "dB"], [y] + list(grads), [y64] + list(grads64)):
        assert torch.isfinite(got).all(), f"{name}: overflow ({got.isinf().sum().item()} inf entries)"
        # fp16 output: a few ulps of the largest value; fp32 gradients of adapters: fp32-accumulated sums
        tol = (4 * 2**-10 if got.dtype == torch.float16 else 1e-5) * want.abs().max().item()
        err = (got.double() - want).abs().max().item()
        assert err <= tol, f"{name}: error {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("form", ["paper", "official"])
def test_regularizer_finite_gradients_at_init_and_orthonormal_a(form):
    torch.manual_seed(0)
    layer = kk.KasaLinear(32, 24, r=6)  # fresh: B = 0, so f_B = sqrt(r) and dR/dB = 0
    assert torch.count_nonzero(layer.lora_B) == 0
    reg = kk.kasa_regularizer(layer, form=form)
    reg.backward()
    for p in (layer.lora_A, layer.lora_B, layer.lora_diag):
        assert torch.isfinite(p.grad).all()
    assert torch.count_nonzero(layer.lora_B.grad) == 0
    # exactly orthonormal rows of A (a permutation of identity rows): A A^T - I = 0 exactly, f_A = 0
    with torch.no_grad():
        layer.lora_A.zero_()
        layer.lora_A[torch.arange(6), torch.tensor([3, 0, 7, 1, 30, 12])] = 1.0
    assert torch.equal(layer.lora_A @ layer.lora_A.t(), torch.eye(6))
    for p in layer.parameters():
        p.grad = None
    reg = kk.kasa_regularizer(layer, beta=1e-4, gamma=1e-3, form=form)
    reg.backward()
    assert torch.isfinite(reg)
    for p in (layer.lora_A, layer.lora_B, layer.lora_diag):
        assert torch.isfinite(p.grad).all(), "0/0 at f = 0 must be taken as 0, not NaN"
    if form == "paper":
        assert torch.count_nonzero(layer.lora_A.grad) == 0  # the documented choice: dR/dA = 0 where f_A = 0
    want = ref.regularizer_ref([(layer.lora_A.double(), layer.lora_B.double(), layer.lora_diag.double())], form=form)
    torch.testing.assert_close(reg.double(), want.detach(), rtol=1e-6, atol=1e-9)
