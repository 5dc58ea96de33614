"""kasa_regularizer: value and closed-form gradients against python/kasa_reference, both forms."""
import pytest
import torch
import torch.nn as nn

import kasa_kernels as kk
import kasa_reference as ref
from helpers import assert_close_to_reference, regularizer_magnitudes

# (in, out, r): repeated shapes exercise the batching, odd ones the grouping
LAYER_SHAPES = [(40, 24, 4), (40, 24, 4), (24, 40, 4), (37, 13, 3), (40, 24, 4), (16, 16, 8)]


def make_layers(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layers = [kk.KasaLinear(k, n, r=r) for k, n, r in LAYER_SHAPES]
    with torch.no_grad():
        for m in layers:
            m.lora_B.normal_()
            m.to(dtype)
    return layers


def reference_value_and_grads(layers, beta, gamma, form, dtype=torch.float64):
    leaves = [tuple(t.detach().to(dtype).requires_grad_(True) for t in (m.lora_A, m.lora_B, m.lora_diag))
              for m in layers]
    r = ref.regularizer_ref(leaves, beta, gamma, form)
    r.backward()
    return r, leaves


@pytest.mark.parametrize("form", ["paper", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_value_and_gradients_match_reference(form, dtype):
    layers = make_layers(dtype)
    beta, gamma = 0.3, 0.7  # large, so every term matters
    loss = kk.kasa_regularizer(nn.ModuleList(layers), beta=beta, gamma=gamma, form=form)
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # what the regularizer computes in
    assert loss.dim() == 0 and loss.dtype == acc
    loss.backward()
    want, leaves = reference_value_and_grads(layers, beta, gamma, form)
    want_lp, leaves_lp = reference_value_and_grads(layers, beta, gamma, form, acc)
    mag_loss, mag_grads = regularizer_magnitudes([(m.lora_A, m.lora_B, m.lora_diag) for m in layers], beta, gamma,
                                                 form)
    assert_close_to_reference(f"{form} loss", loss, want, want_lp, acc, magnitude=mag_loss)
    for m, exact, lowp, mags in zip(layers, leaves, leaves_lp, mag_grads):
        for p, w, wlp, mag, name in zip((m.lora_A, m.lora_B, m.lora_diag), exact, lowp, mags, ("A", "B", "d")):
            assert p.grad.dtype == p.dtype
            # computed in `acc`, then rounded once to the parameter's dtype (eps(p.dtype) of the result)
            assert_close_to_reference(f"{form} d{name}", p.grad, w.grad, wlp.grad, p.dtype, magnitude=mag,
                                      accumulate=acc)


def test_official_form_equals_the_literal_full_gram_formula():
    layers = make_layers(torch.float64)
    got = kk.kasa_regularizer(layers, beta=0.2, gamma=0.5, form="official")
    triples = [(m.lora_A, m.lora_B, m.lora_diag) for m in layers]
    torch.testing.assert_close(got, ref.regularizer_official_literal_ref(triples, 0.2, 0.5), rtol=1e-12, atol=0)


def test_default_form_is_the_paper_form_with_peft_defaults():
    layers = make_layers()
    triples = [(m.lora_A.double(), m.lora_B.double(), m.lora_diag.double()) for m in layers]
    torch.testing.assert_close(kk.kasa_regularizer(layers).double(), ref.regularizer_ref(triples, 1e-4, 1e-3, "paper"))


@pytest.mark.parametrize("form", ["paper", "official"])
def test_finite_gradients_at_init_and_at_orthonormal_factors(form):
    layer = kk.KasaLinear(32, 16, r=4)  # B = 0 at init: f_B = sqrt(r), dR/dB = 0
    kk.kasa_regularizer(layer, form=form).backward()
    for p in (layer.lora_A, layer.lora_B, layer.lora_diag):
        assert torch.isfinite(p.grad).all()
    assert torch.count_nonzero(layer.lora_B.grad) == 0
    # exactly orthonormal rows of A: f_A = 0 is not differentiable; 0/0 is taken as 0 in the paper form
    layer.zero_grad()
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(32)[:4])
    kk.kasa_regularizer(layer, form=form).backward()
    assert torch.isfinite(layer.lora_A.grad).all()
    if form == "paper":
        assert torch.count_nonzero(layer.lora_A.grad) == 0


def test_accepts_a_list_of_modules_and_counts_each_layer_once():
    layers = make_layers()
    model = nn.Sequential(*layers)
    a = kk.kasa_regularizer(model, beta=0.1, gamma=0.1)
    b = kk.kasa_regularizer([model, layers[0]], beta=0.1, gamma=0.1)
    torch.testing.assert_close(a, b)


def test_errors():
    with pytest.raises(ValueError, match="form: expected one of"):
        kk.kasa_regularizer(make_layers()[0], form="squared")
    with pytest.raises(TypeError, match="model_or_modules"):
        kk.kasa_regularizer(3)
    with pytest.raises(TypeError, match="beta"):
        kk.kasa_regularizer(make_layers()[0], beta=float("nan"))


@pytest.mark.parametrize("form", ["paper", "official"])
def test_folded_regularizer_gives_the_same_gradients_as_a_separate_graph(form):
    layers = make_layers()
    model = nn.ModuleList(layers)
    beta, gamma = 0.3, 0.7

    def task_loss():
        return sum(m(torch.randn(5, m.in_features, generator=torch.Generator().manual_seed(i))).square().mean()
                   for i, m in enumerate(layers))

    (task_loss() + kk.kasa_regularizer(model, beta=beta, gamma=gamma, form=form)).backward()
    want = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    handle = kk.fold_regularizer(model, beta=beta, gamma=gamma, form=form)
    assert isinstance(handle, kk.FoldedRegularizer) and all(m.folded_regularizer is handle for m in layers)
    task_loss().backward()
    got = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)
    # a scaled loss (GradScaler, gradient accumulation): the folded term must carry the same factor as the task term
    model.zero_grad()
    handle.set_grad_scale(1024.0)
    (1024.0 * task_loss()).backward()
    for p, w in zip((p for p in model.parameters() if p.requires_grad), want):
        torch.testing.assert_close(p.grad / 1024.0, w, rtol=1e-5, atol=1e-7)
    handle.set_grad_scale(1.0)
    # and unfolding restores plain task gradients
    model.zero_grad()
    kk.fold_regularizer(model, enable=False)
    task_loss().backward()
    assert not torch.allclose(next(p.grad for p in model.parameters() if p.requires_grad), want[0])
