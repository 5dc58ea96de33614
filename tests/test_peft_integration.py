"""kasa_kernels.integrations.peft: PEFT KaSA layers through kasa_linear, and checkpoints in both directions.

Every fused result is compared with the fp64 oracle (python/kasa_reference) and allowed at most twice the error the
plain formula makes in the same dtype, plus a floor (fp32 1e-4, bf16 5e-2), relative to the oracle's magnitude.
Fallback cases must not call kasa_linear at all and must equal PEFT's own forward bit for bit.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import KasaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402

import kasa_kernels as kk  # noqa: E402
from kasa_kernels.integrations import peft as kk_peft  # noqa: E402
from kasa_kernels.ops.rng import keep_mask  # noqa: E402
from kasa_reference import kasa_linear_ref, regularizer_ref, svd_truncate_ref  # noqa: E402
from helpers import assert_within_ref, randomize_kasa  # noqa: E402



class Tiny(nn.Module):
    """Two linear layers with shapes that are not powers of two, one without bias."""

    def __init__(self, k=48, n1=40, n2=24):
        super().__init__()
        self.q = nn.Linear(k, n1)
        self.v = nn.Linear(k, n2, bias=False)

    def forward(self, x):
        return self.q(x).sum(-1) + self.v(x).sum(-1)


def make_peft_tiny(dtype=torch.float32, r=5, alpha=10, dropout=0.0, seed=0, **cfg):
    torch.manual_seed(seed)
    base = Tiny().to(dtype)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=["q", "v"],
                        kasa_config=KasaConfig(), **cfg)
    pm = get_peft_model(base, config)
    randomize_peft_adapters(pm)
    return pm


def randomize_peft_adapters(model, seed=1):
    # B = 0 at init would make every adapter test pass trivially.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_diag" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def layer_params(layer, name="default"):
    base = layer.base_layer
    return (base.weight, base.bias, layer.lora_A[name].weight, layer.lora_diag[name], layer.lora_B[name].weight,
            layer.scaling[name])


@pytest.fixture
def count_fused(monkeypatch):
    calls = []
    real = kk_peft.kasa_linear

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(kk_peft, "kasa_linear", counting)
    return calls


def run_layer(layer, x, grad_out, adapters=("default",)):
    """Output and gradients of one PEFT layer: y, dx, then dA, dd, dB of each of `adapters`."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(grad_out)
    grads = [t.grad.clone() for a in adapters for t in layer_params(layer, a)[2:5]]
    return (y.detach(), x.grad, *grads)


def ref_layer(layer, x, grad_out, dtype=None, mask=None, p=0.0):
    """kasa_linear_ref on the layer's own parameters, cast to `dtype` (None: fp64), with autograd gradients."""
    dtype = dtype or torch.float64
    w, b, a, d, bb, s = layer_params(layer)
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, a, d, bb)]
    xr, ar, dr, br = leaves
    y = kasa_linear_ref(xr, w.detach().to(dtype), None if b is None else b.detach().to(dtype), ar, dr, br, s,
                        dropout_mask=mask, dropout_p=p)
    y.backward(grad_out.to(dtype))
    return (y.detach(),) + tuple(t.grad for t in leaves)


NAMES = ("y", "dx", "dA", "dd", "dB")


# ----------------------------------------------------------------------------------------------------------------
# Patched forward: numerics against the oracle and PEFT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("which", ["q", "v"])
def test_patched_layer_matches_reference_and_peft(dtype, which, count_fused):
    pm = make_peft_tiny(dtype)
    layer = getattr(pm.base_model.model, which)
    # non-contiguous input: every other column of a wider tensor
    x = torch.randn(3, 7, 96, dtype=dtype)[..., ::2]
    g = torch.randn(3, 7, layer.base_layer.out_features, dtype=dtype)
    peft_out = run_layer(layer, x, g)
    kk_peft.patch_peft_model(pm, backend="torch")
    ours = run_layer(layer, x, g)
    assert len(count_fused) == 1
    assert ours[0].dtype == peft_out[0].dtype == dtype
    ref64 = ref_layer(layer, x, g)
    ref_lp = ref_layer(layer, x, g, dtype=dtype)
    for name, o, r64, rlp, po in zip(NAMES, ours, ref64, ref_lp, peft_out):
        assert_within_ref(name, o, r64, rlp, dtype)
        if dtype == torch.float32:  # PEFT's fp32 eager path is itself within the same bound
            assert_within_ref(name + " (PEFT)", po, r64, rlp, dtype)


def test_patched_dropout_uses_shared_mask_and_matches_reference(count_fused):
    p = 0.25
    pm = make_peft_tiny(dropout=p)
    pm.train()
    layer = pm.base_model.model.q
    kk_peft.patch_peft_model(pm, backend="torch")
    x = torch.randn(4, 5, 48)
    g = torch.randn(4, 5, 40)
    torch.manual_seed(123)  # kasa_linear draws its (2,) int64 dropout seed from torch's generator
    seed = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    torch.manual_seed(123)
    ours = run_layer(layer, x, g)
    assert len(count_fused) == 1
    mask = keep_mask(seed, 20, 48, p).view(4, 5, 48)
    assert 0.6 < mask.float().mean() < 0.9
    ref64 = ref_layer(layer, x, g, mask=mask, p=p)
    ref32 = ref_layer(layer, x, g, dtype=torch.float32, mask=mask, p=p)
    for name, o, r64, r32 in zip(NAMES, ours, ref64, ref32):
        assert_within_ref(name, o, r64, r32, torch.float32)
    # eval: no dropout, equal to PEFT's eval forward
    pm.eval()
    with torch.no_grad():
        y_eval = layer(x)
        kk_peft.unpatch_peft_model(pm)
        torch.testing.assert_close(y_eval, layer(x), rtol=1e-5, atol=1e-5)


def test_patched_autocast_bf16_behaves_like_peft(count_fused):
    pm = make_peft_tiny()
    layer = pm.base_model.model.q
    x = torch.randn(2, 9, 48)
    g = torch.randn(2, 9, 40, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        peft_out = run_layer(layer, x, g)
        kk_peft.patch_peft_model(pm, backend="torch")
        ours = run_layer(layer, x, g)
    assert len(count_fused) == 1
    assert ours[0].dtype == peft_out[0].dtype == torch.bfloat16
    assert ours[2].dtype == torch.float32  # adapter grads stay in the adapter dtype
    ref64 = ref_layer(layer, x, g)
    ref_lp = ref_layer(layer, x, g, dtype=torch.bfloat16)
    for name, o, r64, rlp in zip(NAMES, ours, ref64, ref_lp):
        assert_within_ref(name, o, r64, rlp, torch.bfloat16)


def test_patched_whole_model_under_autocast_bf16(count_fused):
    """Inside an autocast model x reaches each layer in bf16 while the base weight is fp32."""
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 kasa_config=KasaConfig()))
    randomize_peft_adapters(pm)
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want64 = copy.deepcopy(pm).double()(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = pm(ids).logits
            kk_peft.patch_peft_model(pm, backend="torch")
            got = pm(ids).logits
    assert len(count_fused) == 6
    assert got.dtype == want.dtype
    assert_within_ref("bf16 autocast logits", got, want64, want, torch.bfloat16)


def test_patch_keeps_parameters_state_dict_and_undo():
    pm = make_peft_tiny()
    x = torch.randn(2, 3, 48)
    keys = list(pm.state_dict())
    params = {n: p.data_ptr() for n, p in pm.named_parameters()}
    y0 = pm(x)
    kk_peft.patch_peft_model(pm)
    assert sorted(kk_peft.fused_layer_names(pm)) == ["base_model.model.q", "base_model.model.v"]
    assert list(pm.state_dict()) == keys
    assert {n: p.data_ptr() for n, p in pm.named_parameters()} == params
    assert isinstance(pm.base_model.model.q, PeftLoraLinear)
    kk_peft.unpatch_peft_model(pm)
    assert type(pm.base_model.model.q) is PeftLoraLinear and kk_peft.fused_layer_names(pm) == []
    assert torch.equal(pm(x), y0)


def test_patch_rejects_models_without_kasa_and_bad_backend():
    torch.manual_seed(0)
    plain = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["q", "v"]))
    with pytest.raises(ValueError, match="no PEFT KaSA LoRA"):
        kk_peft.patch_peft_model(plain)
    with pytest.raises(ValueError, match="backend"):
        kk_peft.patch_peft_model(make_peft_tiny(), backend="nope")


def test_regularizer_on_peft_model_matches_peft_loss_and_grads():
    pm = make_peft_tiny()
    kk_peft.patch_peft_model(pm)
    ours = kk.kasa_regularizer(pm)
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    theirs = pm.base_model._get_kasa_loss()
    theirs.backward()
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-7)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g_ours[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)
    layers = [(m.lora_A["default"].weight.double(), m.lora_B["default"].weight.double(), m.lora_diag["default"].double())
              for m in (pm.base_model.model.q, pm.base_model.model.v)]
    torch.testing.assert_close(ours.double(), regularizer_ref(layers), rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# Fallbacks: PEFT's forward runs, bit for bit


def _peft_and_patched(pm, fn):
    kk_peft.unpatch_peft_model(pm)
    want = fn()
    kk_peft.patch_peft_model(pm)
    got = fn()
    return want, got


@pytest.mark.parametrize("case", ["merged", "disabled", "adapter_names", "two_active_dropout_training",
                                  "custom_dropout", "no_active"])
def test_fallback_to_peft_forward(case, count_fused):
    pm = make_peft_tiny(dropout=0.3 if case == "two_active_dropout_training" else 0.0)
    pm.eval()
    layer = pm.base_model.model.q
    x = torch.randn(2, 5, 48)
    kwargs = {}
    if case == "merged":
        pm.merge_adapter()
    elif case == "adapter_names":
        kwargs = {"adapter_names": ["default", "__base__"]}
    elif case == "two_active_dropout_training":
        # PEFT draws one dropout mask per adapter; one fused call would share one (tests/test_peft_parity.py fuses
        # several adapters where no dropout applies)
        pm.add_adapter("other", LoraConfig(r=3, lora_alpha=6, lora_dropout=0.3, target_modules=["q", "v"],
                                           kasa_config=KasaConfig()))
        randomize_peft_adapters(pm, seed=7)
        pm.base_model.set_adapter(["default", "other"])
        pm.train()
    elif case == "custom_dropout":

        class MyDropout(nn.Dropout):
            pass

        layer.lora_dropout["default"] = MyDropout(0.0)
    elif case == "no_active":
        pm.add_adapter("other", LoraConfig(r=3, lora_alpha=6, target_modules=["v"], kasa_config=KasaConfig()))
        pm.set_adapter("other")  # layer q has no adapter "other": it runs only its base layer

    def fwd():
        torch.manual_seed(5)  # the same dropout masks in both runs
        with torch.no_grad():
            if case == "disabled":
                with pm.disable_adapter():
                    return layer(x)
            return layer(x, **kwargs)

    want, got = _peft_and_patched(pm, fwd)
    assert len(count_fused) == 0, f"{case}: the fused path ran but must fall back"
    assert torch.equal(want, got)


def test_second_kasa_adapter_is_fused_when_it_is_the_only_active_one(count_fused):
    pm = make_peft_tiny()
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=6, target_modules=["q", "v"], kasa_config=KasaConfig()))
    randomize_peft_adapters(pm, seed=7)
    pm.set_adapter("other")
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        want, got = _peft_and_patched(pm, lambda: pm(x))
    assert len(count_fused) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def logits_and_grads(model, ids, grad_of):
    """Logits and {module name: (dA, dd, dB)} for loss = mean(logits^2); grad_of(module) -> (A, d, B) params."""
    model.zero_grad()
    out = model(ids).logits
    out.square().mean().backward()
    grads = {}
    for n, m in model.named_modules():
        params = grad_of(m)
        if params is not None:
            key = n.removeprefix("base_model.model.")
            grads[key] = tuple(p.grad.detach().clone() for p in params)
    return out.detach(), grads


def peft_params(m):
    if isinstance(m, PeftLoraLinear) and "default" in getattr(m, "lora_diag", {}):
        return m.lora_A["default"].weight, m.lora_diag["default"], m.lora_B["default"].weight
    return None


def kk_params(m):
    return (m.lora_A, m.lora_diag, m.lora_B) if isinstance(m, kk.KasaLinear) else None


def assert_models_agree(ours, theirs, theirs64, tag):
    (y_o, g_o), (y_t, g_t), (y_64, g_64) = ours, theirs, theirs64
    assert_within_ref(f"{tag} logits", y_o, y_64, y_t, torch.float32)
    assert sorted(g_o) == sorted(g_t) == sorted(g_64) and g_o
    for name in g_o:
        for what, go, gt, g64 in zip(("dA", "dd", "dB"), g_o[name], g_t[name], g_64[name]):
            assert_within_ref(f"{tag} {name} {what}", go, g64, gt, torch.float32)


def test_peft_checkpoint_loads_into_kasa_kernels(tmp_path):
    original = tiny_llama()
    pm = get_peft_model(copy.deepcopy(original), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 6}, alpha_pattern={"v_proj": 3}, kasa_config=KasaConfig()))
    randomize_peft_adapters(pm)
    pm.eval()
    pm.save_pretrained(tmp_path)
    ours = kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path, backend="torch").eval()

    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, kk.KasaLinear) and layer.r == 6 and layer.scaling == 8 / 6 and layer.dropout == 0.1
    assert ours.model.layers[0].self_attn.v_proj.scaling == 3 / 4
    trainable = {n.rsplit(".", 1)[-1] for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_diag"}
    # same truncated base weight as PEFT's (both truncate the original weight, keeping min(N, K) - r triplets)
    w_orig = original.model.layers[1].mlp.down_proj.weight
    torch.testing.assert_close(layer.weight, pm.base_model.model.model.layers[1].mlp.down_proj.base_layer.weight,
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.weight.double(), svd_truncate_ref(w_orig.double(), 6), rtol=0, atol=1e-5)

    ids = torch.randint(0, 96, (2, 11))
    assert_models_agree(logits_and_grads(ours, ids, kk_params), logits_and_grads(pm, ids, peft_params),
                        logits_and_grads(copy.deepcopy(pm).double(), ids, peft_params), "PEFT->kk")


def test_kasa_kernels_checkpoint_loads_into_peft(tmp_path):
    original = tiny_llama()
    ours = kk.inject(copy.deepcopy(original), ["q_proj", "v_proj"], r=4, alpha=8, backend="torch")
    kk.inject(ours, ["o_proj"], r=2, alpha=5, backend="torch")
    randomize_kasa(ours)
    ours.eval()
    kk_peft.save_peft_adapter(ours, tmp_path, beta=2e-4, gamma=3e-3, base_model_name_or_path="tiny-llama")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["kasa_config"] == {"beta": 2e-4, "gamma": 3e-3} and cfg["r"] == 4
    assert cfg["target_modules"] == ["o_proj", "q_proj", "v_proj"]

    pm = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path, is_trainable=True).eval()
    assert pm.peft_config["default"].kasa_config.gamma == 3e-3
    assert pm.base_model.model.model.layers[0].self_attn.o_proj.r["default"] == 2
    assert pm.base_model.model.model.layers[0].self_attn.o_proj.scaling["default"] == 5 / 2
    ids = torch.randint(0, 96, (2, 9))
    assert_models_agree(logits_and_grads(ours, ids, kk_params), logits_and_grads(pm, ids, peft_params),
                        logits_and_grads(copy.deepcopy(pm).double(), ids, peft_params), "kk->PEFT")
    # and the regularizer weights travel: PEFT's loss with the saved beta/gamma equals ours
    torch.testing.assert_close(pm.base_model._get_kasa_loss().float(),
                               kk.kasa_regularizer(ours, beta=2e-4, gamma=3e-3), rtol=1e-5, atol=1e-8)


def test_kasa_kernels_round_trip_and_patched_peft_agree(tmp_path):
    """kk -> files -> kk gives the same model; the PEFT model from the same files, patched, gives the same logits."""
    original = tiny_llama(seed=3)
    ours = kk.inject(copy.deepcopy(original), ["q_proj", "k_proj", "gate_proj"], r=3, alpha=6, backend="torch")
    randomize_kasa(ours)
    kk_peft.save_peft_adapter(ours, tmp_path)
    again = kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path)
    sd_a, sd_b = ours.state_dict(), again.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for k in sd_a:
        assert torch.equal(sd_a[k], sd_b[k]), k
    pm = kk_peft.patch_peft_model(PeftModel.from_pretrained(copy.deepcopy(original), tmp_path))
    ids = torch.randint(0, 96, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, ours.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def test_load_rejects_non_kasa_or_foreign_adapters(tmp_path):
    original = tiny_llama()
    plain = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a PEFT KaSA adapter"):
        kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path / "missing")
    ours = kk.inject(copy.deepcopy(original), ["q_proj"], r=4)
    kk_peft.save_peft_adapter(ours, tmp_path / "kk")
    with pytest.raises(ValueError, match="already a KasaLinear"):
        kk_peft.load_peft_adapter(ours, tmp_path / "kk")


def test_save_refuses_non_peft_truncation(tmp_path):
    original = tiny_llama()
    ours = kk.inject(copy.deepcopy(original), ["q_proj"], r=4, truncation="none")
    with pytest.raises(ValueError, match="truncation"):
        kk_peft.save_peft_adapter(ours, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# The regularizer folded into patched PEFT layers (what KasaCallback uses)


def test_fold_into_patched_peft_layers_with_each_adapters_config():
    pm = get_peft_model(Tiny(), LoraConfig(r=5, lora_alpha=10, target_modules=["q"],
                                           kasa_config=KasaConfig(beta=0.05, gamma=0.02)))
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=6, target_modules=["v"], kasa_config=KasaConfig(beta=0.3,
                                                                                                        gamma=0.1)))
    randomize_peft_adapters(pm)
    pm.base_model.set_adapter(["default", "other"])  # one active adapter per layer, each with its own weights
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="call kasa_kernels.integrations.peft.patch_peft_model"):
        kk.fold_regularizer(pm)
    kk_peft.patch_peft_model(pm, backend="torch")
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert len(trainable) == 6

    pm(x).square().mean().add(kk.kasa_regularizer(pm)).backward()
    want = [p.grad.clone() for p in trainable]
    pm.zero_grad()
    handle = kk.fold_regularizer(pm)
    pm(x).square().mean().backward()
    for g, w in zip((p.grad for p in trainable), want):
        assert torch.equal(g, w)  # the same fp32 terms added in the same place
    # two handles (two configs) share one grad_scale: scaling the loss scales both folded terms
    pm.zero_grad()
    handle.set_grad_scale(4.0)
    (4.0 * pm(x).square().mean()).backward()
    for p, w in zip(trainable, want):
        torch.testing.assert_close(p.grad / 4.0, w, rtol=1e-6, atol=0)
    handle.set_grad_scale(1.0)

    # where the folded term would silently go missing, the layer refuses
    pm.add_adapter("third", LoraConfig(r=2, target_modules=["q"], kasa_config=KasaConfig()))
    pm.base_model.set_adapter(["third", "other"])  # q now runs "third", which was not folded
    with pytest.raises(RuntimeError, match="fold_regularizer\\(model\\) again after set_adapter"):
        pm(torch.randn(2, 48))
    pm.base_model.set_adapter(["default", "other"])
    pm.base_model.model.q.lora_dropout["default"] = type("MyDropout", (nn.Dropout,), {})(0.0)
    with pytest.raises(RuntimeError, match="runs PEFT's own forward \\(a dropout module other than"):
        pm(torch.randn(2, 48))
    with torch.no_grad():
        pm(torch.randn(2, 48))  # no gradient, nothing to miss
    kk.fold_regularizer(pm, enable=False)
    pm(torch.randn(2, 48)).sum().backward()
