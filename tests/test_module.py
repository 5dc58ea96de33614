"""KasaLinear, from_linear, svd_truncate, merge/unmerge, state_dict, inject, backends()."""
import math

import pytest
import torch
import torch.nn as nn

import kasa_kernels as kk
import kasa_reference as ref


@pytest.mark.parametrize("n,k", [(24, 40), (40, 24), (32, 32)])
@pytest.mark.parametrize("mode", ["peft", "official", "none"])
def test_svd_truncate_keeps_the_right_singular_values(n, k, mode):
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=torch.float64)
    r = 5
    got = kk.svd_truncate(w.float(), r, mode=mode).double()
    s_full = torch.linalg.svdvals(w)
    kk_min = min(n, k)
    keep = {"peft": kk_min - r, "official": min(kk_min, k - r), "none": kk_min}[mode]
    s_got = torch.linalg.svdvals(got)
    # the kept singular values are the largest ones, unchanged; the rest are (numerically) zero
    torch.testing.assert_close(s_got[:keep], s_full[:keep], rtol=1e-5, atol=1e-5)
    assert (s_got[keep:] < 1e-4 * s_full[0]).all()
    torch.testing.assert_close(got, ref.svd_truncate_ref(w, r, mode), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [0, -1, 24, 30])
def test_svd_truncate_rejects_bad_rank(r):
    with pytest.raises(ValueError, match=r"r: expected 1 <= r < min\(in_features, out_features\) = 24"):
        kk.svd_truncate(torch.randn(24, 40), r)


def test_svd_truncate_runs_in_fp32_and_returns_the_input_dtype():
    torch.manual_seed(0)
    w = torch.randn(48, 32, dtype=torch.bfloat16)
    got = kk.svd_truncate(w, 4)
    assert got.dtype == torch.bfloat16
    want = ref.svd_truncate_ref(w.double(), 4)
    # one rounding to bf16 of the fp32 result
    assert (got.double() - want).abs().max() <= 2 * 2**-8 * want.abs().max()


def test_peft_initialization():
    torch.manual_seed(0)
    k = 4096
    layer = kk.KasaLinear(k, 256, r=64)
    bound = 1 / math.sqrt(k)
    a = layer.lora_A.detach()
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert abs(a.var().item() - bound**2 / 3) < 0.05 * bound**2 / 3  # uniform(-b, b)
    assert torch.count_nonzero(layer.lora_B) == 0
    d = layer.lora_diag.detach()
    assert abs(d.mean().item()) < 0.5 and 0.5 < d.std().item() < 1.5  # N(0, 1), not zeros nor ones
    x = torch.randn(3, k)
    # B = 0: a fresh layer is exactly its base
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_parameters_names_and_freezing():
    layer = kk.KasaLinear(20, 12, r=4)
    names = dict(layer.named_parameters())
    assert set(names) == {"weight", "bias", "lora_A", "lora_B", "lora_diag"}
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert all(names[n].requires_grad for n in ("lora_A", "lora_B", "lora_diag"))
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (12, 4) and layer.lora_diag.shape == (4,)
    assert layer.scaling == 16 / 4
    assert kk.KasaLinear(20, 12, r=4, use_rslora=True).scaling == 16 / 2
    assert "r=4" in repr(layer) and "scaling=4" in repr(layer) and "merged=False" in repr(layer)
    assert kk.KasaLinear(20, 12, bias=False, r=4).bias is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("truncation", ["peft", "official"])
def test_from_linear(dtype, truncation):
    torch.manual_seed(0)
    lin = nn.Linear(40, 24).to(dtype)
    layer = kk.KasaLinear.from_linear(lin, r=4, alpha=8, dropout=0.1, truncation=truncation)
    assert layer.weight.dtype == dtype and layer.lora_A.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(layer.weight, kk.svd_truncate(lin.weight, 4, truncation))
    torch.testing.assert_close(layer.bias, lin.bias)
    assert layer.bias.data_ptr() != lin.bias.data_ptr()
    assert layer.dropout == 0.1 and layer.scaling == 2.0


def test_from_linear_accepts_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs, weight stored (40, 24)
    layer = kk.KasaLinear.from_linear(conv, r=4, truncation="none")
    x = torch.randn(3, 40)
    torch.testing.assert_close(layer(x), conv(x))
    del transformers


def test_merge_unmerge():
    torch.manual_seed(0)
    layer = kk.KasaLinear.from_linear(nn.Linear(40, 24), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 40)
    layer.eval()
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight, ref.merge_ref(w0, layer.lora_A, layer.lora_diag, layer.lora_B, layer.scaling))
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=1e-6, atol=1e-6)


def test_safe_merge_refuses_non_finite():
    layer = kk.KasaLinear(20, 12, r=4)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    layer = kk.KasaLinear.from_linear(nn.Linear(40, 24), r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A", "lora_B", "lora_diag"}
    path = tmp_path / "layer.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    other = kk.KasaLinear(40, 24, r=4)
    other.load_state_dict(safetensors_torch.load_file(str(path)))
    x = torch.randn(3, 40)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    assert not other.weight.requires_grad


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 32)
        self.v_proj = nn.Linear(32, 16)
        self.out = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(32)

    def forward(self, x):
        return self.out(self.v_proj(self.norm(x) + self.q_proj(x)))


def test_inject_replaces_targets_and_freezes_the_rest():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": _Block(), "b": _Block()})
    kk.inject(model, target_modules=["q_proj", "v_proj"], r=4, alpha=8)
    kasa = {n for n, m in model.named_modules() if isinstance(m, kk.KasaLinear)}
    assert kasa == {"a.q_proj", "a.v_proj", "b.q_proj", "b.v_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{b}.{m}.{p}" for b in "ab" for m in ("q_proj", "v_proj") for p in ("lora_A", "lora_B", "lora_diag")}
    with pytest.raises(ValueError, match="already a KasaLinear"):
        kk.inject(model, target_modules=["q_proj"])


def test_inject_regex_and_no_match():
    model = _Block()
    kk.inject(model, target_modules=r".*proj", r=4)
    assert isinstance(model.q_proj, kk.KasaLinear) and isinstance(model.v_proj, kk.KasaLinear)
    assert isinstance(model.out, nn.Linear)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        kk.inject(_Block(), target_modules=["k_proj"])


def test_backends_report_and_errors(monkeypatch):
    info = kk.backends("cpu")
    assert set(info) == {"torch", "triton", "cuda"}
    assert info["torch"].available
    assert not info["cuda"].available and "CUDA" in info["cuda"].reason
    x = torch.randn(2, 6)
    args = (x, torch.randn(5, 6), None, torch.randn(2, 6), torch.randn(2), torch.randn(5, 2), 1.0)
    with pytest.raises(kk.BackendUnavailableError, match=r"backend 'cuda' cannot run on cpu.*Usable here: .*torch"):
        kk.kasa_linear(*args, backend="cuda")
    with pytest.raises(ValueError, match="backend: expected one of"):
        kk.kasa_linear(*args, backend="cutlass")
    # the environment variable picks the backend for 'auto'
    from kasa_kernels import _backend

    monkeypatch.setenv("KASA_KERNELS_BACKEND", "cuda")
    _backend.clear_cache()
    try:
        with pytest.raises(kk.BackendUnavailableError):
            kk.kasa_linear(*args)
        kk.kasa_linear(*args, backend="torch")  # an explicit name wins over the variable
    finally:
        monkeypatch.delenv("KASA_KERNELS_BACKEND")
        _backend.clear_cache()
    kk.kasa_linear(*args)


def test_cli_self_check():
    from kasa_kernels.__main__ import main

    assert main([]) == 0
