"""ops/defs.py: each fused op is defined once (a torch.library custom op with one fake implementation), and every
backend supplies its kernels. Runs on meta tensors: no GPU, no kernel launch."""
import pytest
import torch

import kasa_kernels  # noqa: F401
from kasa_kernels import _backend
from kasa_kernels.ops import defs

OPAQUE = [name for name in _backend.NAMES if name not in defs.INLINE_BACKENDS]


def _linear_args(device="meta", dtype=torch.bfloat16, m=37, k=130, n=77, r=16):
    x = torch.empty(m, k, device=device, dtype=dtype)
    w = torch.empty(n, k, device=device, dtype=dtype)
    b = torch.empty(n, device=device, dtype=dtype)
    a = torch.empty(r, k, device=device, dtype=torch.float32)
    d = torch.empty(r, device=device, dtype=torch.float32)
    bb = torch.empty(n, r, device=device, dtype=torch.float32)
    seed = torch.zeros(2, device=device, dtype=torch.int64)
    return x, w, b, a, d, bb, 2.0, 0.1, seed


@pytest.mark.parametrize("name", defs.OPS)
def test_each_op_is_one_custom_op_with_a_fake(name):
    op = getattr(torch.ops.kasa_kernels, name).default
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "Meta")  # the fake implementation
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeExplicitAutograd")


@pytest.mark.parametrize("backend", _backend.NAMES)
def test_every_backend_registers_its_kernels(backend):
    _backend.load(backend)
    wanted = [op for op in defs.OPS if not (op == "base_gemm" and backend in defs.INLINE_BACKENDS)]
    for op in wanted:
        assert callable(defs.kernel(op, backend)), (op, backend)


@pytest.mark.parametrize("backend", _backend.NAMES)
def test_inline_kernel_is_the_registered_kernel_on_inline_backends_only(backend):
    """The autograd layer calls an inline backend's kernels directly and routes every other backend through the
    custom ops (whose fake implementations torch.compile traces)."""
    _backend.load(backend)
    for op in ("linear_forward", "linear_backward"):
        got = defs.inline_kernel(op, backend)
        if backend in defs.INLINE_BACKENDS:
            assert got is defs.kernel(op, backend)
        else:
            assert got is None


def test_resolve_remembers_per_device_until_clear_cache(monkeypatch):
    """Eager resolution is one lookup after the first call, per (name, device); clear_cache() forgets, so a changed
    KASA_KERNELS_BACKEND is read again."""
    cpu = torch.device("cpu")
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    _backend.clear_cache()
    try:
        assert _backend.resolve("torch", cpu) == "torch"
        assert _backend.resolve("auto", cpu) == "torch"
        assert _backend._BY_DEVICE[("torch", cpu)] == _backend._BY_DEVICE[("auto", cpu)] == "torch"
        monkeypatch.setenv(_backend.ENV_VAR, "nope")
        assert _backend.resolve("torch", cpu) == "torch"  # a named backend never reads the variable
        assert _backend.resolve("auto", cpu) == "torch"  # auto read it at its first call on this device
        _backend.clear_cache()
        assert not _backend._BY_DEVICE
        with pytest.raises(ValueError, match=_backend.ENV_VAR):
            _backend.resolve("auto", cpu)
        with pytest.raises(TypeError, match="backend: expected a string"):
            _backend.resolve(["torch"], cpu)
    finally:
        monkeypatch.delenv(_backend.ENV_VAR, raising=False)
        _backend.clear_cache()


def test_missing_kernel_names_the_backend_and_the_op():
    with pytest.raises(NotImplementedError, match="backend 'nope' has no linear_forward kernel"):
        defs.kernel("linear_forward", "nope")
    with pytest.raises(ValueError, match="op: expected one of"):
        defs.register_kernel("linear_fwd", "torch")


@pytest.mark.parametrize("backend", OPAQUE)
def test_fake_shapes_and_dtypes(backend):
    x, w, b, a, d, bb, s, p, seed = _linear_args()
    y, h = defs.linear_forward(backend, x, w, b, a, d, bb, s, p, seed)
    assert (y.shape, y.dtype, h.shape, h.dtype) == ((37, 77), torch.bfloat16, (37, 16), torch.float32)
    g = torch.empty(37, 77, device="meta", dtype=torch.bfloat16)
    dx, da, dd, db = defs.linear_backward(backend, g, x, w, a, d, bb, h, s, p, seed, (True, True, True, True))
    assert (dx.shape, dx.dtype) == ((37, 130), torch.bfloat16)
    assert [t.shape for t in (da, dd, db)] == [(16, 130), (16,), (77, 16)]
    assert all(t.dtype == torch.float32 for t in (da, dd, db))
    dx, da, dd, db = defs.linear_backward(backend, g, x, w, a, d, bb, h, s, p, seed, (False, True, False, False))
    assert dx is None and dd is None and db is None and da.shape == (16, 130)
    As = [torch.empty(4, 10, device="meta"), torch.empty(8, 6, device="meta", dtype=torch.bfloat16)]
    Bs = [torch.empty(7, 4, device="meta"), torch.empty(5, 8, device="meta", dtype=torch.bfloat16)]
    ds = [torch.empty(4, device="meta"), torch.empty(8, device="meta", dtype=torch.bfloat16)]
    loss, ga, gb, gd = defs.regularizer(backend, As, Bs, ds, 1e-4, 1e-3, "official")
    assert loss.shape == () and loss.dtype == torch.float32
    for got, want in zip(ga + gb + gd, As + Bs + ds):
        assert got.shape == want.shape and got.dtype == torch.float32
    y = defs.base_gemm(backend, x, w, None)
    assert (y.shape, y.dtype) == ((37, 77), torch.bfloat16)


@pytest.mark.parametrize("backend", OPAQUE)
def test_opcheck_on_meta_tensors(backend):
    # Without a GPU the only runnable kernel is the fake one; opcheck still validates the schema, the fake
    # implementation against the declared (non-)aliasing, and the autograd registration.
    x, w, b, a, d, bb, s, p, seed = _linear_args()
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.kasa_kernels.linear_forward.default, (backend, x, w, b, a, d, bb, s, p, seed),
                          test_utils=tests)
    h = torch.empty(37, 16, device="meta")
    g = torch.empty(37, 77, device="meta", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.kasa_kernels.linear_backward.default,
                          (backend, g, x, w, a, d, bb, h, s, p, seed, True, True, True, True), test_utils=tests)
    As, Bs, ds = [torch.empty(4, 10, device="meta")], [torch.empty(7, 4, device="meta")], [torch.empty(4, device="meta")]
    torch.library.opcheck(torch.ops.kasa_kernels.regularizer.default, (backend, As, Bs, ds, 1e-4, 1e-3, True),
                          test_utils=tests)
    torch.library.opcheck(torch.ops.kasa_kernels.base_gemm.default, (backend, x, w, b), test_utils=tests)


@pytest.mark.parametrize("backend", _backend.NAMES)
def test_direct_callers_get_named_dropout_errors(backend):
    x, w, b, a, d, bb, s, p, seed = _linear_args()
    with pytest.raises(ValueError, match="seed: required when dropout_p > 0"):
        defs.linear_forward(backend, x, w, b, a, d, bb, s, 0.1, None)
    with pytest.raises(ValueError, match="dropout_p: expected 0 <= p < 1, got 1.0"):
        defs.linear_forward(backend, x, w, b, a, d, bb, s, 1.0, seed)
    with pytest.raises(ValueError, match="form: expected 'paper' or 'official'"):
        defs.regularizer(backend, [a], [bb], [d], 1e-4, 1e-3, "squared")
