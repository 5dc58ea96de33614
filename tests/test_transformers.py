"""KasaLinear inside transformers models: inject on five architectures, gradient checkpointing, torch.compile with
dynamic shapes, autocast and fp16 GradScaler training.

Whole-model checks compare against the same model with every KasaLinear replaced by python/kasa_reference's
formula run in fp64 (oracle) and in the test dtype (the reference's own error); the kernel may have at most twice
that error plus a floor (fp32 1e-4, fp16 1e-2, bf16 5e-2) relative to the oracle's magnitude.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import kasa_kernels as kk  # noqa: E402
from kasa_kernels.integrations.transformers import (  # noqa: E402
    enable_gradient_checkpointing,
    inject_kasa,
    mark_dynamic,
)
from kasa_reference import kasa_linear_ref, svd_truncate_ref  # noqa: E402
from helpers import assert_within_ref, randomize_kasa  # noqa: E402

VOCAB = 96


def build(arch, seed=0):
    """(model, target_modules) from a small config; eval mode so the models' own dropouts are off."""
    t = transformers
    torch.manual_seed(seed)
    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=80, hidden_size=48, vocab_size=VOCAB)
    if arch == "llama":
        m = t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, max_position_embeddings=64, **small))
        targets = ["q_proj", "v_proj", "o_proj", "down_proj"]
    elif arch == "mistral":
        m = t.MistralForCausalLM(t.MistralConfig(num_key_value_heads=2, max_position_embeddings=64, **small))
        targets = ["q_proj", "k_proj", "up_proj"]
    elif arch == "gpt2":
        m = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64))
        targets = ["c_attn", "c_proj", "c_fc"]  # Conv1D, including a square one (attn c_proj)
    elif arch == "roberta":
        m = t.RobertaModel(t.RobertaConfig(max_position_embeddings=70, **small))
        targets = ["query", "value", "intermediate.dense"]  # pooler.dense does not reach last_hidden_state
    elif arch == "deberta-v2":
        m = t.DebertaV2Model(t.DebertaV2Config(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                               max_relative_positions=32, **small))
        targets = ["query_proj", "value_proj"]
    else:
        raise ValueError(arch)
    return m.eval(), targets


def model_out(model, ids):
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


class RefKasa(nn.Module):
    """python/kasa_reference's formula on a copy of a KasaLinear's parameters."""

    def __init__(self, layer: kk.KasaLinear):
        super().__init__()
        self.weight = nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        self.lora_A = nn.Parameter(layer.lora_A.detach().clone())
        self.lora_diag = nn.Parameter(layer.lora_diag.detach().clone())
        self.lora_B = nn.Parameter(layer.lora_B.detach().clone())
        self.scaling = layer.scaling

    def forward(self, x):
        return kasa_linear_ref(x, self.weight, self.bias, self.lora_A, self.lora_diag, self.lora_B, self.scaling)


def reference_model(model):
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, kk.KasaLinear):
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, child, RefKasa(m))
    return ref


def randomize(model, seed=1):
    randomize_kasa(model, seed, b_scale=0.3)


def out_and_grads(model, ids, weight):
    model.zero_grad()
    y = model_out(model, ids)
    (y.float() * weight).sum().backward()
    grads = {n: tuple(p.grad.clone() for p in (m.lora_A, m.lora_diag, m.lora_B))
             for n, m in model.named_modules() if isinstance(m, (kk.KasaLinear, RefKasa))}
    return y.detach(), grads


ARCHS = ["llama", "mistral", "gpt2", "roberta", "deberta-v2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_inject_without_truncation_starts_at_the_base_model(arch):
    """B = 0 and no truncation: the injected model is the original model (this pins Conv1D's orientation)."""
    model, targets = build(arch)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        want = model_out(model, ids)
        kk.inject(model, targets, r=4, alpha=8, truncation="none", backend="torch")
        got = model_out(model, ids)
    n = sum(isinstance(m, kk.KasaLinear) for m in model.modules())
    assert n >= 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_injected_model_matches_reference(arch):
    model, targets = build(arch)
    original = copy.deepcopy(model)
    kk.inject(model, targets, r=4, alpha=8, backend="torch")
    randomize(model)
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "lora_diag"}
    # the base weight is the original's truncation, in nn.Linear layout (GPT-2 Conv1D stores it transposed)
    for name, m in model.named_modules():
        if isinstance(m, kk.KasaLinear):
            w = original.get_submodule(name).weight.double()
            if type(original.get_submodule(name)).__name__ == "Conv1D":
                w = w.t()
            torch.testing.assert_close(m.weight.double(), svd_truncate_ref(w, 4), rtol=0, atol=2e-5, msg=name)
    ids = torch.randint(0, VOCAB, (2, 9))
    ref32 = reference_model(model)
    ref64 = copy.deepcopy(ref32).double()
    weight = torch.randn(model_out(model, ids).shape)
    y, g = out_and_grads(model, ids, weight)
    y32, g32 = out_and_grads(ref32, ids, weight)
    y64, g64 = out_and_grads(ref64, ids, weight.double())
    assert_within_ref(f"{arch} output", y, y64, y32, torch.float32)
    assert g.keys() == g64.keys()
    for name in g:
        for what, a, b, c in zip(("dA", "dd", "dB"), g[name], g64[name], g32[name]):
            assert a.abs().max() > 0, f"{name} {what} is zero"
            assert_within_ref(f"{arch} {name} {what}", a, b, c, torch.float32)


def test_inject_kasa_defaults_and_trainable_head():
    model = transformers.RobertaForSequenceClassification(transformers.RobertaConfig(
        vocab_size=VOCAB, hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=80,
        max_position_embeddings=70, num_labels=3))
    inject_kasa(model, r=4, trainable=["classifier"])
    names = {n for n, m in model.named_modules() if isinstance(m, kk.KasaLinear)}
    assert names == {"roberta.encoder.layer.0.attention.self.query", "roberta.encoder.layer.0.attention.self.value"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "classifier" in n} == {n for n, _ in model.named_parameters() if "classifier" in n}
    assert all("lora_" in n or "classifier" in n for n in trainable)
    with pytest.raises(ValueError, match="no default target_modules"):
        inject_kasa(nn.Sequential(nn.Linear(8, 8)))


# ----------------------------------------------------------------------------------------------------------------
# Gradient checkpointing


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    model, targets = build("llama")
    kk.inject(model, targets, r=4, alpha=8, dropout=0.2, backend="torch")  # dropout: the mask must be recomputed
    randomize(model)
    model.train()
    ids = torch.randint(0, VOCAB, (2, 10))

    def grads(m):
        m.zero_grad()
        torch.manual_seed(5)
        m(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.requires_grad}

    want = grads(model)
    ckpt = enable_gradient_checkpointing(copy.deepcopy(model), use_reentrant=use_reentrant)
    assert getattr(ckpt, "is_activation_checkpointing", None) or ckpt.is_gradient_checkpointing
    got = grads(ckpt)
    assert want.keys() == got.keys()
    for n in want:
        assert got[n] is not None and want[n].abs().max() > 0, n
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile


def _compile_case(dynamic, backend="aot_eager"):
    torch._dynamo.reset()
    model, targets = build("llama")
    kk.inject(model, targets, r=4, alpha=8, backend="torch")
    randomize(model)
    eager = copy.deepcopy(model)
    # aot_eager traces forward and backward through dynamo + AOTAutograd like inductor does, without the C++ build
    # (inductor on CPU costs ~25 s per graph here); one test below runs inductor itself.
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic, backend=backend)
    return eager, model, compiled


def _step(m, ids):
    m.zero_grad()
    out = m(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n.removeprefix("_orig_mod."): p.grad.clone()
                                 for n, p in m.named_parameters() if p.requires_grad}


def _assert_same_step(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    for n in a[1]:
        torch.testing.assert_close(a[1][n], b[1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_compile_fullgraph_no_recompile_on_new_sequence_length():
    from torch._dynamo.utils import counters

    eager, model, compiled = _compile_case(dynamic=None)
    ids = mark_dynamic(torch.randint(0, VOCAB, (2, 8)))
    _assert_same_step(_step(compiled, ids), _step(eager, ids))
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seq in (13, 5):
            ids = torch.randint(0, VOCAB, (2, seq))
            _assert_same_step(_step(compiled, ids), _step(eager, ids))
    assert counters["stats"]["unique_graphs"] == graphs


def test_compile_dynamic_true_fullgraph():
    eager, model, compiled = _compile_case(dynamic=True)
    with torch.no_grad():
        for seq in (8, 11):
            ids = torch.randint(0, VOCAB, (2, seq))
            torch.testing.assert_close(compiled(input_ids=ids).logits, eager(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_compile_inductor_cpu_whole_model_no_recompile():
    # inductor's own code generation (C++ on CPU), forward and backward, then a new sequence length without a recompile
    eager, model, compiled = _compile_case(dynamic=None, backend="inductor")
    ids = mark_dynamic(torch.randint(0, VOCAB, (2, 8)))
    _assert_same_step(_step(compiled, ids), _step(eager, ids))
    with torch._dynamo.config.patch(error_on_recompile=True):
        ids = torch.randint(0, VOCAB, (2, 13))
        _assert_same_step(_step(compiled, ids), _step(eager, ids))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compile_inductor_cuda_bf16():
    torch._dynamo.reset()
    model, targets = build("llama")
    kk.inject(model, targets, r=4, alpha=8)
    randomize(model)
    model = model.cuda().to(torch.bfloat16)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seq in (16, 24):
            ids = mark_dynamic(torch.randint(0, VOCAB, (2, seq), device="cuda")) if seq == 16 else \
                torch.randint(0, VOCAB, (2, seq), device="cuda")
            a, b = _step(compiled, ids), _step(eager, ids)
            torch.testing.assert_close(a[0].float(), b[0].float(), rtol=5e-2, atol=5e-2)


# ----------------------------------------------------------------------------------------------------------------
# Autocast and GradScaler


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_layer_behaves_like_f_linear(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(72, 40)
    layer = kk.KasaLinear.from_linear(lin, r=6, alpha=12, truncation="none", backend="torch")
    x = torch.randn(3, 5, 72, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        want = F.linear(x, layer.weight, layer.bias)
        got = layer(x)  # B = 0: the adapter adds exact zeros
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    randomize(layer)
    g = torch.randn(3, 5, 40)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    y.backward(g.to(dtype))
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    ours = (y.detach(), x.grad, layer.lora_A.grad, layer.lora_diag.grad, layer.lora_B.grad)

    def ref(dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in (x, layer.lora_A, layer.lora_diag, layer.lora_B)]
        out = kasa_linear_ref(leaves[0], layer.weight.to(dt), layer.bias.to(dt), *leaves[1:], layer.scaling)
        out.backward(g.to(dtype).to(dt))
        return (out.detach(),) + tuple(t.grad for t in leaves)

    for name, o, r64, rlp in zip(("y", "dx", "dA", "dd", "dB"), ours, ref(torch.float64), ref(dtype)):
        assert_within_ref(f"{dtype} {name}", o, r64, rlp, dtype)


def test_autocast_whole_model_matches_base_model_at_init():
    model, targets = build("llama")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model_out(model, ids)
        kk.inject(model, targets, r=4, alpha=8, truncation="none", backend="torch")
        got = model_out(model, ids)
    assert got.dtype == want.dtype
    assert torch.equal(got, want)


def _fp16_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (4, 12), generator=g)


def test_fp16_gradscaler_training_reduces_loss():
    model, targets = build("llama")
    kk.inject(model, targets, r=4, alpha=8, backend="torch")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ids = _fp16_batch()
    losses = []
    for _ in range(8):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(input_ids=ids, labels=ids).loss + kk.kasa_regularizer(model)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        assert all(torch.isfinite(p.grad).all() for p in params)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    print("fp16 losses", losses)
    assert scaler.get_scale() == 2.0**12  # no step was skipped
    assert losses[-1] < losses[0] - 0.05


def test_fp16_gradscaler_skips_overflowing_step():
    model, targets = build("llama")
    kk.inject(model, targets, r=4, alpha=8, backend="torch")
    randomize(model)
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # the fp16 backward overflows at this scale
    ids = _fp16_batch()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=ids, labels=ids).loss
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**60
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def _regression_layer():
    torch.manual_seed(0)
    layer = kk.KasaLinear.from_linear(nn.Linear(64, 48), r=8, alpha=16, backend="torch")
    x = torch.randn(32, 64)
    target = torch.randn(32, 48)
    return layer, x, target


def test_fp16_gradscaler_layer_training():
    """fp32 master adapters, fp16 autocast compute, scaled fp16 backward, unscale, step: the loss goes down and the
    unscaled gradients equal the unscaled-run gradients to fp16 accuracy."""
    layer, x, target = _regression_layer()
    params = [layer.lora_A, layer.lora_diag, layer.lora_B]
    # first-step gradients without scaling, in fp32, as the reference
    with torch.autocast("cpu", dtype=torch.float16):
        F.mse_loss(layer(x).float(), target).backward()
    want = [p.grad.clone() for p in params]
    layer.zero_grad()
    opt = torch.optim.Adam(params, lr=3e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    losses = []
    for step in range(10):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.mse_loss(layer(x).float(), target)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        if step == 0:
            for p, w in zip(params, want):
                torch.testing.assert_close(p.grad, w, rtol=1e-2, atol=1e-4)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    print("fp16 layer losses", losses)
    assert scaler.get_scale() == 2.0**14
    assert losses[-1] < 0.9 * losses[0]


def test_fp16_gradscaler_layer_overflow_skips_step():
    layer, x, target = _regression_layer()
    with torch.no_grad():
        layer.lora_B.normal_()
    params = [layer.lora_A, layer.lora_diag, layer.lora_B]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.SGD(params, lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)  # the scaled fp16 gradient overflows
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.mse_loss(layer(x).float(), target)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**60
    assert all(torch.equal(a, b) for a, b in zip(before, params))
