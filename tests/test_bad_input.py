"""Every public entry point refuses bad input at the boundary with a ValueError or TypeError that names the argument.

A second device is the 'meta' device, so the device checks run on a CPU-only machine.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import kasa_kernels as kk
from kasa_kernels import _backend

N, K, R = 6, 5, 2


def _args(dtype=torch.float32, bias=True):
    torch.manual_seed(0)
    return dict(
        x=torch.randn(3, K, dtype=dtype),
        weight=torch.randn(N, K, dtype=dtype),
        bias=torch.randn(N, dtype=dtype) if bias else None,
        lora_A=torch.randn(R, K, dtype=dtype, requires_grad=True),
        lora_diag=torch.randn(R, dtype=dtype, requires_grad=True),
        lora_B=torch.randn(N, R, dtype=dtype, requires_grad=True),
        scaling=2.0,
    )


def _call(**over):
    kw = _args()
    kw.update(over)
    return kk.kasa_linear(**kw)


def test_valid_arguments_pass():
    # The baseline every case below perturbs by one argument.
    y = _call()
    assert y.shape == (3, N)
    _call(x=torch.randn(2, 3, K), dropout_p=0.5, dropout_seed=3)


# ---------------------------------------------------------------------------------------------------------------
# kasa_linear: shapes


@pytest.mark.parametrize(
    "arg,value,match",
    [
        ("x", torch.randn(3, K + 1), r"^x: expected last dim = in_features = 5"),
        ("x", torch.randn(()), r"^x: "),
        ("weight", torch.randn(N * K), r"^weight: expected a 2-D"),
        ("weight", torch.randn(N, K + 1), r"^x: expected last dim = in_features = 6"),
        ("lora_A", torch.randn(R, K + 1), r"^lora_A: expected \(r, 5\)"),
        ("lora_A", torch.randn(R, K, 1), r"^lora_A: "),
        ("lora_A", torch.randn(0, K), r"^lora_A: expected r >= 1"),
        ("lora_diag", torch.randn(R + 1), r"^lora_diag: expected \(2,\)"),
        ("lora_diag", torch.randn(R, 1), r"^lora_diag: expected \(2,\)"),
        ("lora_B", torch.randn(N, R + 1), r"^lora_B: expected \(6, 2\)"),
        ("lora_B", torch.randn(R, N), r"^lora_B: expected \(6, 2\)"),
        ("bias", torch.randn(N + 1), r"^bias: expected \(6,\)"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_kasa_linear_rejects_shape_mismatch(arg, value, match):
    with pytest.raises(ValueError, match=match):
        _call(**{arg: value})


# ---------------------------------------------------------------------------------------------------------------
# kasa_linear: types and dtypes


@pytest.mark.parametrize(
    "arg,value,match",
    [
        ("x", [[1.0] * K], r"^x: expected a torch.Tensor, got list"),
        ("weight", None, r"^weight: expected a torch.Tensor, got NoneType"),
        ("lora_A", 1.0, r"^lora_A: expected a torch.Tensor"),
        ("lora_diag", "d", r"^lora_diag: expected a torch.Tensor"),
        ("lora_B", None, r"^lora_B: expected a torch.Tensor"),
        ("bias", 0.0, r"^bias: expected a torch.Tensor"),
        ("x", torch.ones(3, K, dtype=torch.int32), r"^x: expected dtype in"),
        ("x", torch.randn(3, K, dtype=torch.complex64), r"^x: expected dtype in"),
        ("weight", torch.randn(N, K, dtype=torch.float16), r"^weight: expected x's dtype torch.float32"),
        ("bias", torch.randn(N, dtype=torch.bfloat16), r"^bias: expected x's dtype torch.float32"),
        ("lora_A", torch.randn(R, K, dtype=torch.float16), r"^lora_A: expected x's dtype torch.float32"),
        ("lora_diag", torch.randn(R, dtype=torch.float64), r"^lora_diag: expected x's dtype"),
        ("lora_B", torch.randn(N, R, dtype=torch.bfloat16), r"^lora_B: expected x's dtype"),
        ("scaling", torch.tensor(2.0), r"^scaling: expected a finite Python float"),
        ("scaling", math.inf, r"^scaling: expected a finite Python float"),
        ("scaling", math.nan, r"^scaling: expected a finite Python float"),
        ("scaling", "2", r"^scaling: "),
        ("dropout_p", "0.1", r"^dropout_p: expected a float in \[0, 1\)"),
        ("dropout_p", True, r"^dropout_p: "),
        ("backend", 3, r"^backend: expected a string"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_kasa_linear_rejects_wrong_types(arg, value, match):
    with pytest.raises(TypeError, match=match):
        _call(**{arg: value})


def test_fp64_is_refused_for_every_backend_but_torch():
    # fp64 is the torch backend's alone (gradcheck); the fused ones take fp32, fp16, bf16. The checks are called
    # directly: on this machine only the torch backend resolves.
    from kasa_kernels.functional import _check_linear_args, _linear_args_ok

    kw = _args(torch.float64)
    args = [kw[k] for k in ("x", "weight", "bias", "lora_A", "lora_diag", "lora_B", "scaling")]
    assert _linear_args_ok(*args, "torch")  # kasa_linear's fast path passes it
    _check_linear_args(*args, "torch")
    for backend in ("triton", "cuda"):
        assert not _linear_args_ok(*args, backend)  # the fast path sends it to the checks that name it
        with pytest.raises(TypeError, match=rf"^x: expected dtype in .* for backend '{backend}'"):
            _check_linear_args(*args, backend)


def test_kasa_linear_rejects_adapter_dtype_that_is_neither_x_nor_fp32():
    kw = _args(torch.bfloat16)
    kw["lora_A"] = torch.randn(R, K, dtype=torch.float16)
    with pytest.raises(TypeError, match=r"^lora_A: expected x's dtype torch.bfloat16 or torch.float32"):
        kk.kasa_linear(**kw)
    kw = _args(torch.bfloat16)
    kw.update(lora_A=kw["lora_A"].float(), lora_diag=kw["lora_diag"].float(), lora_B=kw["lora_B"].float())
    assert kk.kasa_linear(**kw).dtype == torch.bfloat16  # fp32 adapters beside bf16 activations are fine


@pytest.mark.parametrize("arg", ["weight", "bias"])
def test_kasa_linear_rejects_trainable_base(arg):
    kw = _args()
    kw[arg].requires_grad_(True)
    with pytest.raises(ValueError, match=rf"^{arg}: the base layer is frozen"):
        kk.kasa_linear(**kw)


# ---------------------------------------------------------------------------------------------------------------
# kasa_linear: devices (meta stands in for a second device)


@pytest.mark.parametrize("arg", ["weight", "bias", "lora_A", "lora_diag", "lora_B"])
def test_kasa_linear_rejects_a_tensor_on_another_device(arg):
    kw = _args()
    kw[arg] = kw[arg].detach().to("meta")
    with pytest.raises(ValueError, match=rf"^{arg}: expected x's device cpu, got .* on meta"):
        kk.kasa_linear(**kw)


def test_kasa_linear_rejects_x_on_another_device():
    kw = _args()
    kw["x"] = kw["x"].to("meta")
    with pytest.raises(ValueError, match=r"^weight: expected x's device meta, got .* on cpu"):
        kk.kasa_linear(**kw)


# ---------------------------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("p", [1.0, 1.5, -0.1, -1e-12, math.nan, math.inf])
def test_kasa_linear_rejects_dropout_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"^dropout_p: expected a float in \[0, 1\)"):
        _call(dropout_p=p)


def test_kasa_linear_rejects_bad_dropout_also_in_eval_mode():
    with pytest.raises(ValueError, match=r"^dropout_p: "):
        _call(dropout_p=1.5, training=False)


@pytest.mark.parametrize(
    "seed,exc,match",
    [
        (torch.tensor([1, 2], dtype=torch.int32), ValueError, r"^dropout_seed: expected an int64 tensor of shape \(2,\)"),
        (torch.tensor([1, 2, 3]), ValueError, r"^dropout_seed: "),
        (1.5, TypeError, r"^dropout_seed: "),
        ("7", TypeError, r"^dropout_seed: "),
        (True, TypeError, r"^dropout_seed: "),
    ],
)
def test_kasa_linear_rejects_bad_dropout_seed(seed, exc, match):
    with pytest.raises(exc, match=match):
        _call(dropout_p=0.1, dropout_seed=seed)


# ---------------------------------------------------------------------------------------------------------------
# backends


@pytest.mark.parametrize("name", ["nope", "", "Torch", "triton "])
def test_unknown_backend_name(name):
    with pytest.raises(ValueError, match=r"^backend: expected one of \('auto', 'cuda', 'triton', 'torch'\)"):
        _call(backend=name)


def test_unknown_backend_name_from_environment(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "fastest")
    _backend.clear_cache()
    try:
        with pytest.raises(ValueError, match=r"^KASA_KERNELS_BACKEND: .*got 'fastest'"):
            _call(backend="auto")
    finally:
        monkeypatch.delenv(_backend.ENV_VAR)
        _backend.clear_cache()


def test_unusable_backend_raises_and_names_the_usable_ones():
    info = kk.backends("cpu")
    unusable = [n for n, b in info.items() if not b.available]
    usable = [n for n, b in info.items() if b.available]
    assert "torch" in usable and "cuda" in unusable  # the CUDA extension never runs on CPU tensors
    for name in unusable:
        with pytest.raises(kk.BackendUnavailableError) as e:
            _call(backend=name)
        msg = str(e.value)
        assert f"backend {name!r} cannot run on cpu tensors" in msg
        assert info[name].reason in msg
        assert f"Usable here: {', '.join(usable)}" in msg
        with pytest.raises(kk.BackendUnavailableError, match=f"Usable here: {', '.join(usable)}"):
            kk.kasa_regularizer(kk.KasaLinear(K, N, r=R), backend=name)
        layer = kk.KasaLinear(K, N, r=R, backend=name)
        with pytest.raises(kk.BackendUnavailableError, match=f"backend {name!r}"):
            layer(torch.randn(2, K))


def test_kasa_linear_module_rejects_unknown_backend_name_at_construction():
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        kk.KasaLinear(K, N, r=R, backend="nope")


# ---------------------------------------------------------------------------------------------------------------
# KasaLinear(...) and KasaLinear.from_linear


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(in_features=0), ValueError, r"^in_features: expected a positive int"),
        (dict(in_features=-3), ValueError, r"^in_features: "),
        (dict(in_features=5.0), ValueError, r"^in_features: "),
        (dict(out_features=0), ValueError, r"^out_features: "),
        (dict(r=0), ValueError, r"^r: expected 1 <= r < min\(in_features, out_features\) = 5"),
        (dict(r=-1), ValueError, r"^r: "),
        (dict(r=K), ValueError, r"^r: .* got r=5"),  # r == min(N, K)
        (dict(r=K + 10), ValueError, r"^r: "),
        (dict(r=2.0), TypeError, r"^r: expected an int, got float"),
        (dict(r=True), TypeError, r"^r: expected an int, got bool"),
        (dict(dropout=1.0), ValueError, r"^dropout: expected a float in \[0, 1\)"),
        (dict(dropout=-0.5), ValueError, r"^dropout: "),
        (dict(dropout=None), TypeError, r"^dropout: "),
        (dict(alpha=math.nan), TypeError, r"^alpha: expected a finite number"),
        (dict(alpha="16"), TypeError, r"^alpha: "),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_kasa_linear_module_rejects_bad_arguments(kwargs, exc, match):
    args = dict(in_features=K, out_features=N, r=R)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        kk.KasaLinear(args.pop("in_features"), args.pop("out_features"), **args)


@pytest.mark.parametrize(
    "linear,kwargs,exc,match",
    [
        (nn.Conv2d(2, 2, 1), {}, TypeError, r"^linear: expected nn.Linear or transformers Conv1D, got Conv2d"),
        (torch.randn(N, K), {}, TypeError, r"^linear: "),
        (nn.Linear(K, N), dict(truncation="svd"), ValueError, r"^truncation: expected one of \('peft', 'official', 'none'\)"),
        (nn.Linear(K, N), dict(truncation=None), ValueError, r"^truncation: "),
        (nn.Linear(K, N), dict(r=0), ValueError, r"^r: "),
        (nn.Linear(K, N), dict(r=K), ValueError, r"^r: .*= 5"),
        (nn.Linear(K, N), dict(r=1.5), TypeError, r"^r: "),
        (nn.Linear(K, N), dict(dropout=1.0), ValueError, r"^dropout: "),
        (nn.Linear(K, N), dict(alpha=math.inf), TypeError, r"^alpha: "),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_from_linear_rejects_bad_arguments(linear, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kk.KasaLinear.from_linear(linear, **{"r": R, **kwargs})


# ---------------------------------------------------------------------------------------------------------------
# safe merge


def _layer_with_delta(dtype, magnitude):
    torch.manual_seed(0)
    layer = kk.KasaLinear(K, N, r=R, dtype=dtype)
    with torch.no_grad():
        layer.lora_A.fill_(1.0)
        layer.lora_diag.fill_(1.0)
        layer.lora_B.fill_(magnitude)
    return layer


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_safe_merge_refuses_non_finite_adapters(bad):
    layer = _layer_with_delta(torch.float32, 1.0)
    with torch.no_grad():
        layer.lora_B[1, 0] = bad
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^merge: .*NaN or inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    assert torch.equal(layer.weight, w0), "a refused merge must leave the weight untouched"


def test_safe_merge_refuses_overflow_in_fp32():
    layer = _layer_with_delta(torch.float32, 3e38)  # s (B d) A = 3e38 * r * s overflows fp32
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^merge: "):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_safe_merge_refuses_overflow_in_the_weight_dtype():
    # delta = s * r * 1e4 = 8 * 2 * 1e4 = 1.6e5: finite in fp32, above fp16's largest value 65504.
    layer = _layer_with_delta(torch.float16, 1e4)
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"^merge: "):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_unsafe_merge_is_documented_to_pass_non_finite_through():
    # Without safe_merge the merge is not checked (as PEFT): the test pins that the flag is what makes the difference.
    layer = _layer_with_delta(torch.float32, math.inf)
    layer.merge()
    assert layer.merged and not torch.isfinite(layer.weight).all()


# ---------------------------------------------------------------------------------------------------------------
# kasa_regularizer


def test_kasa_regularizer_rejects_bad_arguments():
    layer = kk.KasaLinear(K, N, r=R)
    with pytest.raises(ValueError, match=r"^form: expected one of \('paper', 'official'\), got 'peft'"):
        kk.kasa_regularizer(layer, form="peft")
    for name in ("beta", "gamma"):
        for v in (math.nan, math.inf, "1e-4", True, torch.tensor(1e-4)):  # None: each adapter's own config
            with pytest.raises(TypeError, match=rf"^{name}: expected None or a finite float"):
                kk.kasa_regularizer(layer, **{name: v})
    with pytest.raises(TypeError, match=r"^adapter_names: expected None, a str or a list of str, got 3"):
        kk.kasa_regularizer(layer, adapter_names=3)
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        kk.kasa_regularizer(layer, backend="nope")
    with pytest.raises(TypeError, match=r"^backend: expected a string"):
        kk.kasa_regularizer(layer, backend=None)


def test_kasa_regularizer_rejects_bad_models():
    # no KaSA layer is not an error: the regularizer is 0, as PEFT's _get_kasa_loss returns (tests/test_peft_parity.py)
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        kk.kasa_regularizer(nn.Linear(K, N), backend="nope")
    with pytest.raises(TypeError, match=r"^model_or_modules: expected an nn.Module or an iterable"):
        kk.kasa_regularizer(3)
    with pytest.raises(TypeError, match=r"^model_or_modules\[1\]: expected an nn.Module, got Tensor"):
        kk.kasa_regularizer([kk.KasaLinear(K, N, r=R), torch.randn(2)])


def test_kasa_regularizer_rejects_layers_on_different_devices():
    a = kk.KasaLinear(K, N, r=R)
    b = kk.KasaLinear(K, N, r=R, device="meta")
    with pytest.raises(ValueError, match=r"^layer 1: expected every adapter on cpu, got meta"):
        kk.kasa_regularizer([a, b])


def test_kasa_regularizer_rejects_inconsistent_adapter_shapes():
    layer = kk.KasaLinear(K, N, r=R)
    layer.lora_diag = nn.Parameter(torch.randn(R + 1))
    with pytest.raises(ValueError, match=r"^layer 0: inconsistent adapter shapes"):
        kk.kasa_regularizer(layer)


# ---------------------------------------------------------------------------------------------------------------
# svd_truncate


@pytest.mark.parametrize(
    "weight,r,mode,exc,match",
    [
        ([[1.0, 2.0]], 1, "peft", TypeError, r"^weight: expected a torch.Tensor, got list"),
        (torch.randn(8), 1, "peft", ValueError, r"^weight: expected a 2-D"),
        (torch.randn(2, 3, 4), 1, "peft", ValueError, r"^weight: expected a 2-D"),
        (torch.randn(8, 6), 1, "svd", ValueError, r"^mode: expected one of \('peft', 'official', 'none'\)"),
        (torch.randn(8, 6), 0, "peft", ValueError, r"^r: .*= 6"),
        (torch.randn(8, 6), 6, "official", ValueError, r"^r: "),
        (torch.randn(8, 6), 6, "none", ValueError, r"^r: "),
        (torch.randn(8, 6), 2.0, "peft", TypeError, r"^r: expected an int"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_svd_truncate_rejects_bad_arguments(weight, r, mode, exc, match):
    with pytest.raises(exc, match=match):
        kk.svd_truncate(weight, r, mode=mode)


# ---------------------------------------------------------------------------------------------------------------
# inject


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(K, N)
        self.v_proj = nn.Linear(K, N)
        self.norm = nn.LayerNorm(N)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(target_modules=[]), ValueError, r"^target_modules: expected a non-empty list"),
        (dict(target_modules=["q_proj", 3]), ValueError, r"^target_modules: "),
        (dict(target_modules=["k_proj"]), ValueError, r"^target_modules: \['k_proj'\] matched no nn.Linear"),
        (dict(target_modules="norm"), ValueError, r"^target_modules: 'norm' matched no nn.Linear"),
        (dict(r=0), ValueError, r"^r: "),
        (dict(r=K), ValueError, r"^r: "),
        (dict(dropout=2.0), ValueError, r"^dropout: "),
        (dict(truncation="full"), ValueError, r"^truncation: expected one of"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_inject_rejects_bad_arguments(kwargs, exc, match):
    model = _Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(exc, match=match):
        kk.inject(model, **{"r": R, **kwargs})
    # validation failed before the first replacement: the model is untouched
    assert not any(isinstance(m, kk.KasaLinear) for m in model.modules())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad


def test_inject_rejects_non_module_and_double_injection():
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module, got dict"):
        kk.inject({"q_proj": nn.Linear(K, N)})
    model = kk.inject(_Tiny(), target_modules=["q_proj"], r=R)
    with pytest.raises(ValueError, match=r"^target_modules: 'q_proj' is already a KasaLinear"):
        kk.inject(model, target_modules=["q_proj"], r=R)


def test_inject_is_all_or_nothing():
    # r = 10 fits the first target (32x32) but not the second (32x8): nothing may be replaced or unfrozen
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 8))
    with pytest.raises(ValueError, match=r"^r: "):
        kk.inject(model, target_modules=["0", "1"], r=10)
    assert not any(isinstance(m, kk.KasaLinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_inject_keeps_the_model_in_eval_mode():
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    kk.inject(model, target_modules=["0"], r=4, dropout=0.5)
    assert not model[0].training
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # no dropout in eval


@pytest.mark.parametrize("targets,exc,match", [
    (3, TypeError, r"^target_modules: expected a list of names or a regex string, got int"),
    ("(", ValueError, r"^target_modules: '\(' is not a valid regular expression"),
])
def test_inject_rejects_bad_target_modules(targets, exc, match):
    with pytest.raises(exc, match=match):
        kk.inject(_Tiny(), target_modules=targets, r=R)


def test_fold_regularizer_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"^model: expected an nn.Module"):
        kk.fold_regularizer([kk.KasaLinear(K, N, r=R)])


def test_non_floating_dtypes_are_refused():
    with pytest.raises(TypeError, match=r"^dtype: expected a floating-point torch.dtype"):
        kk.KasaLinear(K, N, r=R, dtype=torch.int32)
    with pytest.raises(TypeError, match=r"^adapter_dtype: "):
        kk.KasaLinear(K, N, r=R, adapter_dtype=torch.int64)
    with pytest.raises(TypeError, match=r"^weight: expected a floating-point tensor"):
        kk.svd_truncate(torch.ones(N, K, dtype=torch.int64), R)


def test_dropout_seed_is_checked_without_dropout_too():
    with pytest.raises(TypeError, match=r"^dropout_seed: "):
        _call(dropout_p=0.0, dropout_seed="abc")
