"""Serving KaSA on the untouched base model: export_lora_adapter writes a plain PEFT LoRA adapter whose update per layer
is the KaSA update plus the truncation residual; kk.merge_and_unload gives a plain transformers model.

A small Llama with non-square layers (k/v 48 -> 24, gate/up 48 -> 80, down 80 -> 48) in both truncation modes, with
ranks chosen so that "official" truncates tall layers and, for down_proj's r = 36 > K - N, a wide one too. Logits are
held to the KaSA model in fp64 with tests/helpers.py's whole-model rule, and each layer's effective weight to
python/kasa_reference's fp64 truncation with reference_bound.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft import KasaConfig, LoraConfig, PeftModel, get_peft_model  # noqa: E402

import kasa_kernels as kk  # noqa: E402
from kasa_kernels.integrations import peft as kk_peft  # noqa: E402
from kasa_reference import svd_truncate_ref  # noqa: E402
from helpers import assert_close_to_reference, assert_within_ref, randomize_kasa  # noqa: E402
from test_peft_integration import randomize_peft_adapters, tiny_llama  # noqa: E402

R = {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 4, "up_proj": 4, "down_proj": 36}
SHAPES = {"q_proj": (48, 48), "k_proj": (24, 48), "v_proj": (24, 48), "o_proj": (48, 48), "gate_proj": (80, 48),
          "up_proj": (80, 48), "down_proj": (48, 80)}  # (N, K)


def residual_rank(n, k, r, mode):
    return r if mode == "peft" else max(0, min(n, k) - (k - r))


def kasa_llama(original, mode):
    # two ranks (rank_pattern must carry them)
    model = kk.inject(copy.deepcopy(original), ["down_proj"], r=R["down_proj"], alpha=8, truncation=mode,
                      backend="torch")
    kk.inject(model, [t for t in R if t != "down_proj"], r=4, alpha=8, truncation=mode, backend="torch")
    randomize_kasa(model)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("mode", ["peft", "official"])
def test_exported_lora_on_the_original_model_reproduces_kasa(mode, tmp_path):
    original = tiny_llama()
    ours = kasa_llama(original, mode)
    kk_peft.export_lora_adapter(ours, original, tmp_path, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and "kasa_config" not in cfg and cfg["lora_dropout"] == 0.0
    served = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    assert not any(hasattr(m, "lora_diag") for m in served.modules())  # plain LoRA, no KaSA layer
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    assert_within_ref(f"{mode}: LoRA-served logits", logits(served, ids), logits(copy.deepcopy(ours).double(), ids),
                      logits(ours, ids), torch.float32)

    residual_ranks = set()
    for name, layer in served.base_model.model.named_modules():
        if not hasattr(layer, "lora_A") or not len(getattr(layer, "lora_A", {})):
            continue
        leaf = name.rpartition(".")[2]
        n, k = SHAPES[leaf]
        q = residual_rank(n, k, R[leaf], mode)
        residual_ranks.add(q)
        assert layer.r["default"] == R[leaf] + q and layer.scaling["default"] == 1.0, name
        # the layer's served weight W0 + B'A' against the fp64 truncation of W0 plus the KaSA update: within what the
        # fp32 SVD truncation itself makes (the KaSA model's stored truncated weight)
        kasa_layer = ours.get_submodule(name)
        w0 = original.get_submodule(name).weight.double()
        delta = kasa_layer.delta_weight().double()
        served_w = w0 + layer.lora_B["default"].weight.double() @ layer.lora_A["default"].weight.double()
        ref64 = svd_truncate_ref(w0, R[leaf], mode) + delta
        ref32 = kasa_layer.weight.double() + delta
        assert_close_to_reference(f"{mode} {name} weight", served_w, ref64, ref32, torch.float32,
                                  magnitude=w0.abs() + (w0 - ref64 + delta).abs() + delta.abs())
    if mode == "peft":
        assert residual_ranks == {4, 36}
    else:  # square and tall layers lose r = 4 triplets, wide k/v none (K - r >= N), wide down_proj 48 - (80 - 36)
        assert residual_ranks == {0, 4}


def test_export_from_a_peft_kasa_model_and_several_tenants_in_one_batch(tmp_path):
    """A PEFT KaSA model exports too; two exported adapters serve one mixed batch on one untouched base."""
    original = tiny_llama()
    pm = get_peft_model(copy.deepcopy(original), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                                            kasa_config=KasaConfig()))
    randomize_peft_adapters(pm)
    pm.eval()
    ours = kasa_llama(original, "official")
    kk_peft.export_lora_adapter(pm, original, tmp_path / "a")
    kk_peft.export_lora_adapter(ours, original, tmp_path / "b")
    served = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path / "a", adapter_name="a").eval()
    served.load_adapter(tmp_path / "b", adapter_name="b")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixed = served(ids, adapter_names=["a", "b"]).logits
    for i, kasa_model in enumerate((pm, ours)):
        assert_within_ref(f"tenant {i}", mixed[i], logits(copy.deepcopy(kasa_model).double(), ids)[i],
                          logits(kasa_model, ids)[i], torch.float32)


def test_trained_head_is_exported_as_modules_to_save(tmp_path):
    original = tiny_llama()
    ours = kk.inject(copy.deepcopy(original), ["q_proj", "v_proj"], r=4, backend="torch")
    randomize_kasa(ours)
    with torch.no_grad():
        ours.lm_head.weight.add_(torch.randn(ours.lm_head.weight.shape, generator=torch.Generator().manual_seed(2)))
    kk_peft.export_lora_adapter(ours, original, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    served = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))
    ours.eval()
    assert_within_ref("with lm_head", logits(served, ids), logits(copy.deepcopy(ours).double(), ids),
                      logits(ours, ids), torch.float32)


def test_export_refuses_another_base_model_and_merged_layers(tmp_path):
    original = tiny_llama()
    ours = kasa_llama(original, "peft")
    with pytest.raises(ValueError, match="truncated weight is not this weight minus its discarded singular triplets"):
        kk_peft.export_lora_adapter(ours, tiny_llama(seed=5), tmp_path)
    ours.model.layers[0].self_attn.q_proj.merge()
    with pytest.raises(ValueError, match="is merged; unmerge"):
        kk_peft.export_lora_adapter(ours, original, tmp_path)


def test_merged_plain_transformers_model(tmp_path):
    original = tiny_llama()
    ours = kasa_llama(original, "official")
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    want64, want = logits(copy.deepcopy(ours).double(), ids), logits(ours, ids)
    kk.merge_and_unload(ours).save_pretrained(tmp_path)
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, kk.KasaLinear) for m in plain.modules())
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert_within_ref("merged logits", logits(plain, ids), want64, want, torch.float32)


def test_gpt2_conv1d_layers_export_with_fan_in_fan_out(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=48, n_layer=2, n_head=4, n_positions=32)
    torch.manual_seed(0)
    original = transformers.GPT2LMHeadModel(cfg).eval()
    ours = kk.inject(copy.deepcopy(original), ["c_attn", "c_fc"], r=4, backend="torch")
    randomize_kasa(ours)
    ours.eval()
    kk_peft.export_lora_adapter(ours, original, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    served = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path).eval()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    assert_within_ref("gpt2 logits", logits(served, ids), logits(copy.deepcopy(ours).double(), ids),
                      logits(ours, ids), torch.float32)
    merged = kk.merge_and_unload(copy.deepcopy(ours))
    assert type(merged.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert_within_ref("gpt2 merged", logits(merged, ids), logits(copy.deepcopy(ours).double(), ids),
                      logits(ours, ids), torch.float32)
