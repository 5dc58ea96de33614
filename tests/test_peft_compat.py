"""Against PEFT's own KaSA (LoraConfig(kasa_config=KasaConfig(...))) on a small transformers model with non-square
layers: truncated weights, outputs, adapter gradients and the regularizer value all match."""
import copy

import pytest
import torch

import kasa_kernels as kk

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 4
ALPHA = 8


def tiny_llama():
    # k_proj/v_proj are 48 -> 24 (GQA), gate/up 48 -> 80, down 80 -> 48: wide and tall layers.
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models():
    base = tiny_llama()
    beta, gamma = 0.05, 0.02
    lcfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0,
                           kasa_config=peft.KasaConfig(beta=beta, gamma=gamma))
    theirs = peft.get_peft_model(copy.deepcopy(base), lcfg)
    ours = kk.inject(copy.deepcopy(base), target_modules=TARGETS, r=R, alpha=ALPHA, truncation="peft")
    # PEFT starts at B = 0 like us; give both the same non-trivial adapter values
    torch.manual_seed(1)
    ours_layers = {n: m for n, m in ours.named_modules() if isinstance(m, kk.KasaLinear)}
    n_layers = 0
    for name, mod in theirs.named_modules():
        if hasattr(mod, "lora_diag") and isinstance(mod.lora_diag, torch.nn.ParameterDict):
            key = name.split("base_model.model.", 1)[1]
            mine = ours_layers[key]
            with torch.no_grad():
                mod.lora_B["default"].weight.normal_()
                mod.lora_diag["default"].normal_()
                mine.lora_A.copy_(mod.lora_A["default"].weight)
                mine.lora_B.copy_(mod.lora_B["default"].weight)
                mine.lora_diag.copy_(mod.lora_diag["default"])
            n_layers += 1
    assert n_layers == len(ours_layers) == 2 * len(TARGETS)
    return theirs, ours, beta, gamma


def _pairs(theirs, ours):
    ours_layers = {n: m for n, m in ours.named_modules() if isinstance(m, kk.KasaLinear)}
    for name, mod in theirs.named_modules():
        if hasattr(mod, "lora_diag") and isinstance(mod.lora_diag, torch.nn.ParameterDict):
            yield mod, ours_layers[name.split("base_model.model.", 1)[1]]


def test_truncated_base_weights_match(models):
    theirs, ours, _, _ = models
    for mod, mine in _pairs(theirs, ours):
        w_theirs = mod.get_base_layer().weight
        # both SVDs run in fp32 on the same weight
        torch.testing.assert_close(mine.weight, w_theirs, rtol=1e-5, atol=1e-5)
        n, k = w_theirs.shape
        s = torch.linalg.svdvals(w_theirs.double())
        assert (s[min(n, k) - R:] < 1e-4).all(), "PEFT dropped a different number of triplets"


def test_outputs_and_adapter_gradients_match(models):
    theirs, ours, _, _ = models
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    out_theirs = theirs(input_ids=ids).logits
    out_ours = ours(input_ids=ids).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=1e-4, atol=1e-4)
    g = torch.randn(out_ours.shape, generator=torch.Generator().manual_seed(4))
    (out_theirs * g).sum().backward()
    (out_ours * g).sum().backward()
    for mod, mine in _pairs(theirs, ours):
        for p_theirs, p_ours in (
            (mod.lora_A["default"].weight, mine.lora_A),
            (mod.lora_B["default"].weight, mine.lora_B),
            (mod.lora_diag["default"], mine.lora_diag),
        ):
            scale = p_theirs.grad.abs().max()
            assert (p_ours.grad - p_theirs.grad).abs().max() <= 1e-4 * scale + 1e-7
    theirs.zero_grad()
    ours.zero_grad()


def test_regularizer_value_matches_peft(models):
    theirs, ours, beta, gamma = models
    want = theirs.base_model._get_kasa_loss()
    torch.testing.assert_close(kk.kasa_regularizer(ours, beta=beta, gamma=gamma), want, rtol=1e-5, atol=0)
    # kasa_regularizer also walks PEFT's own layers, and its gradients equal PEFT's autograd ones
    got = kk.kasa_regularizer(theirs, beta=beta, gamma=gamma)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    got.backward()
    mine = {id(p): p.grad.clone() for p in theirs.parameters() if p.grad is not None}
    theirs.zero_grad()
    want.backward()
    checked = 0
    for p in theirs.parameters():
        if p.grad is not None:
            torch.testing.assert_close(mine[id(p)], p.grad, rtol=1e-4, atol=1e-8)
            checked += 1
    assert checked == 3 * 2 * len(TARGETS)
    theirs.zero_grad()
