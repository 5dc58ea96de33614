"""The tolerance rule itself (tests/helpers.py): for every case it is given the bound is finite and positive, it is
never below what a different summation order moves, and it refuses references that are not finite or magnitudes that
are not sums of |terms|. A rule that could be NaN or 0 would let a test pass or fail for reasons that are not the
kernel's."""
import math

import pytest
import torch

from helpers import (assert_close_to_reference, kasa_linear_magnitudes, reference_bound,
                     regularizer_magnitudes)

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def _operands(m, k, n, seed, scale=1.0, cancel=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g, dtype=torch.float64) * scale
    b = torch.randn(k, n, generator=g, dtype=torch.float64)
    if cancel:  # every other column of a is nearly the negation of the one before: each row of a @ b nearly cancels
        b[1::2] = b[0::2][: b[1::2].shape[0]]
        a[:, 1::2] = -a[:, 0::2][:, : a[:, 1::2].shape[1]] * (1 + 2.0 ** -20)
    return a, b


def _matmul_case(m, k, n, dtype, seed, scale=1.0, cancel=False):
    a, b = _operands(m, k, n, seed, scale, cancel)
    ref_lp = (a.to(dtype) @ b.to(dtype)) if dtype != torch.bfloat16 else (a.float() @ b.float()).to(dtype)
    return a @ b, ref_lp, a.abs() @ b.abs()


CASES = [  # (m, k, n, scale, cancel)
    (1, 1, 1, 1.0, False),
    (7, 41, 9, 1.0, False),
    (37, 130, 13, 1e-6, False),
    (3, 64, 5, 1e2, False),
    (16, 256, 16, 1.0, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_bound_is_finite_positive_and_covers_a_reordered_sum(dtype, case):
    m, k, n, scale, cancel = case
    ref64, ref_lp, mag = _matmul_case(m, k, n, dtype, m * k + n, scale, cancel)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    bound, err_ref = reference_bound(ref64, ref_lp, dtype, magnitude=mag)
    assert math.isfinite(bound) and bound > 0
    assert bound >= 2 * err_ref
    # a different summation order in the accumulation dtype (k reversed; blocks of 16) stays inside it
    x, w = (t.to(acc) for t in _operands(m, k, n, m * k + n, scale, cancel))
    reversed_sum = torch.zeros(m, n, dtype=acc)
    for j in reversed(range(k)):
        reversed_sum += x[:, j:j + 1] * w[j:j + 1, :]
    blocked = sum(x[:, j:j + 16] @ w[j:j + 16] for j in range(0, k, 16))
    for other in (reversed_sum, blocked):
        assert (other.double().to(dtype).double() - ref64).abs().max().item() <= bound


def test_bound_is_positive_where_everything_is_exactly_zero():
    zero = torch.zeros(4, 3, dtype=torch.float64)
    for dtype in DTYPES:
        bound, _ = reference_bound(zero, zero, dtype, magnitude=zero)
        assert math.isfinite(bound) and 0 < bound < 1e-30
    assert_close_to_reference("exact zeros", zero.float(), zero, zero, torch.float32, magnitude=zero)
    with pytest.raises(AssertionError, match="max error"):
        assert_close_to_reference("not zero", zero.float() + 1e-20, zero, zero, torch.float32, magnitude=zero)


def test_a_reference_that_is_not_finite_is_refused_by_name():
    ref64 = torch.ones(5, dtype=torch.float64)
    poisoned = ref64.clone()
    poisoned[3] = float("nan")
    with pytest.raises(AssertionError, match=r"gemm bf16: the torch.bfloat16 reference is not finite \(1 elements\)"):
        reference_bound(ref64, poisoned.to(torch.bfloat16), torch.bfloat16, magnitude=ref64, name="gemm bf16")
    with pytest.raises(AssertionError, match="the fp64 reference is not finite"):
        reference_bound(poisoned, ref64, torch.float32, magnitude=ref64)
    with pytest.raises(AssertionError, match="magnitude of the summed terms is not finite"):
        reference_bound(ref64, ref64, torch.float32, magnitude=poisoned)


def test_a_magnitude_below_the_result_is_refused():
    ref64 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="magnitude is below"):
        reference_bound(ref64, ref64, torch.float32, magnitude=ref64.abs() * 0.5)


def test_a_scaled_result_or_a_dropped_term_exceeds_the_bound():
    # the mutations the suite relies on catching, at a size the suite uses: y = a @ b + extra (a small second term,
    # e.g. the adapter's), computed with 1% too much scale or without `extra`
    ref64, ref_lp, mag = _matmul_case(37, 130, 13, torch.float16, 1)
    extra = torch.randn(37, 13, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05
    want64, want_lp, want_mag = ref64 + extra, (ref_lp.double() + extra).half(), mag + extra.abs()
    assert_close_to_reference("right", want64.half(), want64, want_lp, torch.float16, magnitude=want_mag)
    for wrong in (want64 * 1.01, ref64):
        with pytest.raises(AssertionError, match="max error"):
            assert_close_to_reference("mutated", wrong.half(), want64, want_lp, torch.float16, magnitude=want_mag)


def test_kasa_linear_magnitudes_bound_every_output_and_gradient():
    import kasa_reference as ref

    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(9, 13, generator=g), torch.randn(7, 13, generator=g), torch.randn(7, generator=g)
    a, d, bb, gy = torch.randn(3, 13, generator=g), torch.randn(3, generator=g), torch.randn(7, 3, generator=g), \
        torch.randn(9, 7, generator=g)
    mask = torch.rand(9, 13, generator=g) > 0.3
    leaves = [t.double().requires_grad_(True) for t in (x, a, d, bb)]
    y = ref.kasa_linear_ref(leaves[0], w.double(), b.double(), *leaves[1:], -1.5, dropout_mask=mask, dropout_p=0.3)
    exact = [y] + list(torch.autograd.grad(y, leaves, gy.double()))
    mags = kasa_linear_magnitudes(x, w, b, a, d, bb, gy, -1.5, mask, 0.3)
    for e, m in zip(exact, mags):
        assert e.shape == m.shape and (m >= e.detach().abs() * (1 - 1e-12)).all()


@pytest.mark.parametrize("form", ["paper", "official"])
def test_regularizer_magnitudes_bound_the_gradients_even_where_gram_cancels(form):
    import kasa_reference as ref

    g = torch.Generator().manual_seed(3)
    a = torch.randn(1, 130, generator=g, dtype=torch.float64)
    a = a / a.norm() * (1 + 1e-4)  # ||a||^2 - 1 ~ 2e-4: E cancels, the gradient's direction is ill-conditioned
    layers = [(a, torch.randn(9, 1, generator=g, dtype=torch.float64), torch.randn(1, generator=g, dtype=torch.float64)),
              (torch.randn(4, 13, generator=g, dtype=torch.float64), torch.zeros(40, 4, dtype=torch.float64),
               torch.randn(4, generator=g, dtype=torch.float64))]
    leaves = [tuple(t.clone().requires_grad_(True) for t in lay) for lay in layers]
    value = ref.regularizer_ref(leaves, 0.01, 0.1, form)
    grads = torch.autograd.grad(value, [t for lay in leaves for t in lay])
    mag_loss, mags = regularizer_magnitudes(layers, 0.01, 0.1, form)
    assert mag_loss >= value.abs()
    flat = [m for per in mags for m in per]
    for gr, m in zip(grads, flat):
        assert torch.isfinite(m).all() and (m >= gr.abs() * (1 - 1e-12)).all()
    assert torch.equal(flat[4], torch.zeros_like(flat[4]))  # B = 0: its gradient is exactly 0, and so is its scale
    # the cancelling layer's scale is far above one ulp of its gradient: the honest floor there
    assert flat[0].max() > 100 * grads[0].abs().max()
