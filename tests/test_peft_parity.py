"""The PEFT parity gaps of issue #16, each closed against PEFT 0.21's own behaviour:

- load_peft_adapter reads .bin adapters (save_pretrained(safe_serialization=False));
- it loads adapters with trained biases (bias="lora_only" / "all") and with modules_to_save;
- kasa_regularizer is 0 on a model without KaSA layers, takes beta/gamma from each adapter's KasaConfig, and has
  adapter_names, as LoraModel._get_kasa_loss;
- load_peft_adapter follows PeftModel.from_pretrained's autocast_adapter_dtype;
- several active adapters on one layer run as one fused kasa_linear call of rank sum(r_i).

Numbers are held to python/kasa_reference in fp64 with tests/helpers.py's whole-model rule (assert_within_ref).
"""
from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import KasaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

import kasa_kernels as kk  # noqa: E402
from kasa_kernels.integrations import peft as kk_peft  # noqa: E402
from kasa_reference import kasa_linear_ref, regularizer_ref  # noqa: E402
from helpers import assert_within_ref  # noqa: E402
from test_peft_integration import (  # noqa: E402
    NAMES,
    Tiny,
    assert_models_agree,
    count_fused,  # noqa: F401  (a fixture: the tests below take it as an argument)
    kk_params,
    logits_and_grads,
    peft_params,
    randomize_peft_adapters,
    run_layer,
    tiny_llama,
)

TARGETS = ["q_proj", "v_proj", "down_proj"]
TWO = ("default", "other")


def peft_llama(original, **cfg):
    kasa = cfg.pop("kasa_config", KasaConfig(beta=0.05, gamma=0.02))
    pm = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                            kasa_config=kasa, **cfg))
    randomize_peft_adapters(pm)
    return pm.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ----------------------------------------------------------------------------------------------------------------
# load_peft_adapter: .bin, trained biases, modules_to_save


def test_bin_adapter_loads_like_safetensors(tmp_path):
    original = tiny_llama()
    pm = peft_llama(original)
    pm.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists() and not (tmp_path / "adapter_model.safetensors").exists()
    ours = kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path, backend="torch").eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_models_agree(logits_and_grads(ours, ids, kk_params), logits_and_grads(pm, ids, peft_params),
                        logits_and_grads(copy.deepcopy(pm).double(), ids, peft_params), ".bin")
    # the kasa_config's weights travel: beta/gamma=None gives PEFT's _get_kasa_loss, and saving again keeps them
    torch.testing.assert_close(kk.kasa_regularizer(ours), pm.base_model._get_kasa_loss(), rtol=1e-5, atol=0)
    kk_peft.save_peft_adapter(ours, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["kasa_config"] == {"beta": 0.05,
                                                                                                  "gamma": 0.02}


def biased_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("case", ["lora_only", "all", "modules_to_save"])
def test_trained_biases_and_modules_to_save_load(case, tmp_path):
    original = biased_llama()
    cfg = {"modules_to_save": ["lm_head"]} if case == "modules_to_save" else {"bias": case}
    pm = peft_llama(original, **cfg)
    trained = [n for n, p in pm.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trained, f"{case}: PEFT trains nothing besides the adapters"
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # as if trained: every trainable non-adapter parameter moves away from the base model
        for n in trained:
            p = pm.get_parameter(n)
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(tmp_path)
    ours = kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path, backend="torch").eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    assert_within_ref(f"{case} logits", logits(ours, ids), logits(copy.deepcopy(pm).double(), ids),
                      logits(pm, ids), torch.float32)
    # without the trained tensors the logits would be far off: the check above sees them
    plain = kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path, backend="torch").eval()
    with torch.no_grad():
        for n in trained:
            name = n.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".modules_to_save.default.",
                                                                                           ".")
            plain.get_parameter(name).copy_(original.get_parameter(name))
    assert (logits(plain, ids) - logits(pm, ids)).abs().max() > 1e-2
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    if case == "modules_to_save":
        assert "lm_head.weight" in trainable  # trained in full, as PEFT trains it
    assert not any(n.endswith("bias") for n in trainable)  # KaSA's fused op keeps base layers frozen


def test_trainable_tokens_are_still_refused(tmp_path):
    original = tiny_llama()
    pm = peft_llama(original)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"] = torch.zeros(2, 48)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="neither KaSA adapter weights nor parameters of the model"):
        kk_peft.load_peft_adapter(copy.deepcopy(original), tmp_path)


@pytest.mark.parametrize("autocast_adapter_dtype", [True, False])
def test_autocast_adapter_dtype_follows_peft(autocast_adapter_dtype, tmp_path):
    original = tiny_llama()
    peft_llama(original).save_pretrained(tmp_path)
    base16 = copy.deepcopy(original).to(torch.bfloat16)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base16), tmp_path, autocast_adapter_dtype=autocast_adapter_dtype)
    ours = kk_peft.load_peft_adapter(copy.deepcopy(base16), tmp_path, backend="torch",
                                     autocast_adapter_dtype=autocast_adapter_dtype)
    want = torch.float32 if autocast_adapter_dtype else torch.bfloat16
    n_checked = 0
    for name, params in ((n, peft_params(m)) for n, m in theirs.named_modules()):
        if params is None:
            continue
        mine = ours.get_submodule(name.removeprefix("base_model.model."))
        for p_theirs, p_ours in zip(params, kk_params(mine)):
            assert p_theirs.dtype == p_ours.dtype == want
            torch.testing.assert_close(p_ours, p_theirs, rtol=0, atol=0)
        n_checked += 1
    assert n_checked == 6
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))
    ref64 = logits(PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).double(), ids)
    assert_within_ref(f"bf16 logits, autocast_adapter_dtype={autocast_adapter_dtype}", logits(ours.eval(), ids), ref64,
                      logits(theirs.eval(), ids), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# kasa_regularizer: 0 without KaSA layers, per-adapter KasaConfig, adapter_names


def test_regularizer_is_zero_without_kasa_layers():
    torch.manual_seed(0)
    plain_lora = get_peft_model(Tiny(), LoraConfig(r=4, target_modules=["q", "v"]))
    for model in (plain_lora, nn.Linear(4, 3), [], plain_lora.base_model.model):
        got = kk.kasa_regularizer(model)
        assert got.shape == () and got.dtype == torch.float32 and got.item() == 0.0 and not got.requires_grad
    assert plain_lora.base_model._get_kasa_loss() == 0.0  # what PEFT returns
    pm = peft_llama(tiny_llama())
    assert kk.kasa_regularizer(pm, adapter_names="nope").item() == pm.base_model._get_kasa_loss("nope") == 0.0


def two_adapter_llama():
    pm = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                 kasa_config=KasaConfig(beta=0.05, gamma=0.02)))
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["q_proj", "o_proj"],
                                       kasa_config=KasaConfig(beta=0.3, gamma=0.1)))
    randomize_peft_adapters(pm, seed=4)
    return pm


def reference_regularizer(pm, adapter_names, dtype=torch.float64):
    """PEFT's formula in `dtype` through python/kasa_reference, per adapter with its own KasaConfig: (value,
    {parameter name: gradient})."""
    leaves = {}
    total = torch.zeros((), dtype=dtype)
    for name, m in pm.named_modules():
        for a in adapter_names:
            if a in getattr(m, "lora_diag", {}):
                cfg = pm.peft_config[a].kasa_config
                keys = (f"{name}.lora_A.{a}.weight", f"{name}.lora_B.{a}.weight", f"{name}.lora_diag.{a}")
                layer = [t.detach().to(dtype).requires_grad_(True) for t in (m.lora_A[a].weight, m.lora_B[a].weight,
                                                                             m.lora_diag[a])]
                leaves.update(zip(keys, layer))
                total = total + regularizer_ref([tuple(layer)], cfg.beta, cfg.gamma, "paper")
    total.backward()
    return total.detach(), {k: t.grad for k, t in leaves.items()}


@pytest.mark.parametrize("adapter_names", [None, "other", ["default", "other"]])
def test_regularizer_takes_each_adapters_config_and_adapter_names(adapter_names):
    pm = two_adapter_llama()
    pm.base_model.set_adapter(["default", "other"])
    names = ["default", "other"] if adapter_names is None else ([adapter_names] if isinstance(adapter_names, str)
                                                                else adapter_names)
    ours = kk.kasa_regularizer(pm, adapter_names=adapter_names)
    theirs = pm.base_model._get_kasa_loss(adapter_names)
    ref64, grads64 = reference_regularizer(pm, names)
    assert_within_ref(f"regularizer {adapter_names}", ours, ref64, theirs, torch.float32)
    ours.backward()
    g_ours = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    pm.zero_grad()
    theirs.backward()
    g_theirs = {n: p.grad for n, p in pm.named_parameters() if p.grad is not None}
    assert sorted(g_ours) == sorted(g_theirs) == sorted(grads64) and g_ours
    # only the selected adapters get a gradient
    assert {re.search(r"lora_(?:A|B|diag)\.([^.]+)", n).group(1) for n in g_ours} == set(names)
    for n in g_ours:
        assert_within_ref(f"d/d{n}", g_ours[n], grads64[n], g_theirs[n], torch.float32)
    # one global beta/gamma, as before, still overrides the configs
    override = kk.kasa_regularizer(pm, beta=1e-4, gamma=1e-3, adapter_names=adapter_names)
    assert abs(override.item() - ours.item()) > 1e-3


def test_regularizer_official_form_averages_over_all_layers_across_configs():
    pm = two_adapter_llama()
    pm.base_model.set_adapter(["default", "other"])
    got = kk.kasa_regularizer(pm, form="official")
    groups = {"default": [], "other": []}
    for m in pm.modules():
        for a in groups:
            if a in getattr(m, "lora_diag", {}):
                groups[a].append((m.lora_A[a].weight.double(), m.lora_B[a].weight.double(), m.lora_diag[a].double()))
    n_layers = sum(len(v) for v in groups.values())
    want = sum(len(v) / n_layers * regularizer_ref(v, pm.peft_config[a].kasa_config.beta,
                                                   pm.peft_config[a].kasa_config.gamma, "official")
               for a, v in groups.items())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)


def test_regularizer_needs_the_config_it_was_told_to_read():
    pm = peft_llama(tiny_llama())
    # the wrapped transformers model carries PEFT's peft_config too
    torch.testing.assert_close(kk.kasa_regularizer(pm.base_model.model), pm.base_model._get_kasa_loss())
    layers = [m for m in pm.modules() if hasattr(m, "lora_diag")]  # bare layers: no config to read
    with pytest.raises(ValueError, match="none was found for adapter 'default'"):
        kk.kasa_regularizer(layers)
    torch.testing.assert_close(kk.kasa_regularizer(layers, beta=0.05, gamma=0.02), pm.base_model._get_kasa_loss())


# ----------------------------------------------------------------------------------------------------------------
# several active adapters on one layer: one fused call of rank sum(r_i)


def two_adapter_tiny(dtype=torch.float32, dropout=0.0):
    torch.manual_seed(0)
    pm = get_peft_model(Tiny().to(dtype), LoraConfig(r=5, lora_alpha=10, lora_dropout=dropout,
                                                     target_modules=["q", "v"], kasa_config=KasaConfig()))
    pm.add_adapter("other", LoraConfig(r=3, lora_alpha=7, lora_dropout=dropout, target_modules=["q", "v"],
                                       kasa_config=KasaConfig()))
    randomize_peft_adapters(pm, seed=7)
    pm.base_model.set_adapter(["default", "other"])
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n)
    return pm


def ref_two(layer, x, g, dtype):
    """sum over both adapters of s_i ((x A_i^T) * d_i) B_i^T plus the base layer, in `dtype`, with autograd."""
    base = layer.base_layer
    xr = x.detach().to(dtype).requires_grad_(True)
    leaves = []
    y = None
    for i, a in enumerate(TWO):
        ps = [t.detach().to(dtype).requires_grad_(True) for t in (layer.lora_A[a].weight, layer.lora_diag[a],
                                                                   layer.lora_B[a].weight)]
        leaves += ps
        w = base.weight.detach().to(dtype) if i == 0 else torch.zeros_like(base.weight, dtype=dtype)
        b = None if i or base.bias is None else base.bias.detach().to(dtype)
        term = kasa_linear_ref(xr, w, b, ps[0], ps[1], ps[2], layer.scaling[a])
        y = term if y is None else y + term
    y.backward(g.to(dtype))
    return [y.detach(), xr.grad] + [t.grad for t in leaves]


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("which", ["q", "v"])
def test_several_active_adapters_run_fused(which, autocast, count_fused):  # noqa: F811
    pm = two_adapter_tiny()
    layer = getattr(pm.base_model.model, which)
    dtype = torch.bfloat16 if autocast else torch.float32
    x = torch.randn(3, 7, 96)[..., ::2]
    g = torch.randn(3, 7, layer.base_layer.out_features, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        theirs = run_layer(layer, x, g, TWO)
        kk_peft.patch_peft_model(pm, backend="torch")
        ours = run_layer(layer, x, g, TWO)
    assert len(count_fused) == 1  # both adapters in one kasa_linear call
    ref64 = ref_two(layer, x, g, torch.float64)
    ref_lp = ref_two(layer, x, g, dtype)
    names = list(NAMES[:2]) + [f"{w} {a}" for a in TWO for w in ("dA", "dd", "dB")]
    assert ours[0].dtype == theirs[0].dtype == dtype
    for name, o, t, r64, rlp in zip(names, ours, theirs, ref64, ref_lp):
        assert o.dtype == t.dtype, name
        assert_within_ref(name, o, r64, rlp, dtype)
        if not autocast:  # PEFT's own result is held to the same bound
            assert_within_ref(name + " (PEFT)", t, r64, rlp, dtype)


def test_several_active_adapters_fused_in_a_whole_model(count_fused):  # noqa: F811
    pm = two_adapter_llama()
    pm.base_model.set_adapter(["default", "other"])
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    want64 = logits(copy.deepcopy(pm).double(), ids)
    want = logits(pm, ids)
    kk_peft.patch_peft_model(pm, backend="torch")
    got = logits(pm, ids)
    assert len(count_fused) == 2 * 4  # q_proj (both adapters, one call), v_proj, down_proj, o_proj per block
    assert_within_ref("two-adapter logits", got, want64, want, torch.float32)
