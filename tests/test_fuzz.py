"""Property tests: every usable backend computes python/kasa_reference's function on any valid input.

Hypothesis draws shapes (including 1 and primes), the number of leading dims (1..3), the layout of x (contiguous,
strided slices, transposed storage, sliced rows), dtypes (fp32 / fp16 / bf16, adapters in x's dtype or fp32),
bias, scaling and dropout on or off. The forward output and every gradient (dx, dA, dd, dB) must satisfy

    |got - ref64|_max <= 2 |ref_lowp - ref64|_max + eps(dtype) (|ref64|_max + |sum of |terms||_max)

where ref64 is the reference in float64 and ref_lowp the same formula computed in x's dtype (tests/helpers.py's
rule, with one ulp of x's dtype on the summed terms: the backends round the base and adapter products to x's dtype
before adding them, as the reference does). The regularizer is held to the same rule in fp32. Dropout is
compared with the reference given the mask of kasa_kernels.ops.rng.keep_mask for the same dropout_seed.

Backends come from kasa_kernels.backends(device), so triton and cuda are fuzzed as soon as they are usable. On a
CPU-only machine triton can run only under its interpreter, and TRITON_INTERPRET=1 must be set before its kernels
are defined: test_triton_backend_under_the_interpreter reruns this file in a subprocess with that variable set and
KASA_FUZZ_ONLY=triton, with a smaller example budget and without bf16 (the interpreter computes bf16 through numpy,
which has no bf16).
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kasa_kernels as kk
import kasa_reference as ref
from helpers import assert_close_to_reference, regularizer_magnitudes
from kasa_kernels.ops.rng import keep_mask, make_seed

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ONLY = os.environ.get("KASA_FUZZ_ONLY")  # set by the interpreter subprocess below
INTERPRETED = DEVICE.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _usable_backends():
    names = [n for n, info in kk.backends(DEVICE).items() if info.available]
    if ONLY is not None:
        names = [n for n in names if n == ONLY]
    elif DEVICE.type == "cpu":
        # triton on CPU means the interpreter; that case runs in its own process (test at the bottom).
        names = [n for n in names if n != "triton"]
    return names


BACKENDS = _usable_backends()
SLOW = {"triton"} if DEVICE.type == "cpu" else set()

PRIMES_AND_SMALL = [1, 2, 3, 5, 7, 8, 11, 13, 16, 17, 31, 32, 37]
LEAD_SIZES = [1, 2, 3, 5, 7]
LAYOUTS = ["contiguous", "strided_last", "transposed", "sliced_rows"]


def _dtypes(backend):
    if backend == "triton" and DEVICE.type == "cpu":
        return [torch.float32, torch.float16]  # no bf16 under the interpreter (docs/design.md, environment facts)
    return [torch.float32, torch.float16, torch.bfloat16]


def _settings(backend):
    # KASA_FUZZ_EXAMPLES raises the budget for a long local or nightly run.
    n = int(os.environ.get("KASA_FUZZ_EXAMPLES", 0)) or (10 if backend in SLOW else 40)
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)


@st.composite
def linear_cases(draw, backend):
    slow = backend in SLOW
    dims = PRIMES_AND_SMALL[:9] if slow else PRIMES_AND_SMALL
    k = draw(st.sampled_from(dims))
    n = draw(st.sampled_from(dims))
    r = draw(st.integers(1, 5 if slow else 9))
    lead = tuple(draw(st.lists(st.sampled_from(LEAD_SIZES), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from(_dtypes(backend)))
    adapter_dtype = draw(st.sampled_from([dtype, torch.float32]))
    return dict(
        k=k, n=n, r=r, lead=lead, dtype=dtype, adapter_dtype=adapter_dtype,
        layout=draw(st.sampled_from(LAYOUTS)),
        bias=draw(st.booleans()),
        scaling=draw(st.sampled_from([0.5, 2.0, 4.0])),
        dropout_p=draw(st.sampled_from([0.0, 0.0, 0.25, 0.6])),
        dropout_seed=draw(st.integers(0, 2**63 - 1)),
        data_seed=draw(st.integers(0, 2**31 - 1)),
    )


def _make_x(lead, k, layout, g):
    """x of shape (*lead, k) laid out as asked; values drawn in fp32 from g."""
    if layout == "contiguous":
        x = torch.randn(*lead, k, generator=g)
    elif layout == "strided_last":  # every other column of a wider tensor, with an offset
        x = torch.randn(*lead, 2 * k + 1, generator=g)[..., 1::2]
    elif layout == "transposed":  # storage has the feature dim first: x.stride(-1) is the largest stride
        x = torch.randn(k, *lead, generator=g).movedim(0, -1)
    else:  # "sliced_rows": every other row of the first leading dim
        x = torch.randn(2 * lead[0], *lead[1:], k, generator=g)[::2]
    assert x.shape == (*lead, k)
    return x


def _run_case(backend, c):
    g = torch.Generator().manual_seed(c["data_seed"])
    lead, k, n, r, dtype, adt = c["lead"], c["k"], c["n"], c["r"], c["dtype"], c["adapter_dtype"]
    x = _make_x(lead, k, c["layout"], g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if c["bias"] else None
    a = (torch.randn(r, k, generator=g) / k**0.5).to(adt)
    d = torch.randn(r, generator=g).to(adt)
    bb = (torch.randn(n, r, generator=g) / r**0.5).to(adt)  # B != 0 so dA and dd are not trivially zero
    gy = torch.randn(*lead, n, generator=g).to(dtype)
    p, s = c["dropout_p"], c["scaling"]

    mask = None
    if p > 0:
        m = x.numel() // k
        mask = keep_mask(make_seed(c["dropout_seed"], torch.device("cpu")), m, k, p).view(x.shape)

    # the backend, on DEVICE, with x a non-leaf view exactly as laid out above
    dev = DEVICE
    x_dev = (x.to(dev) if dev.type != "cpu" else x).detach()
    x_leaf = x_dev.requires_grad_(True)
    params = [t.to(dev).detach().clone().requires_grad_(True) for t in (a, d, bb)]
    y = kk.kasa_linear(x_leaf, w.to(dev), None if b is None else b.to(dev), *params, s, dropout_p=p,
                       training=True, backend=backend, dropout_seed=c["dropout_seed"])
    got = [y] + list(torch.autograd.grad(y, [x_leaf] + params, gy.to(dev)))

    def reference(dt, f=lambda t: t):
        leaves = [f(t.detach().to(dt)).requires_grad_(True) for t in (x, a, d, bb)]
        out = ref.kasa_linear_ref(leaves[0], f(w.to(dt)), None if b is None else f(b.to(dt)), *leaves[1:], s,
                                  dropout_mask=mask, dropout_p=p)
        return [out] + list(torch.autograd.grad(out, leaves, f(gy.to(dt))))

    want64, wantlp = reference(torch.float64), reference(dtype)
    # The formula is multilinear, so on |inputs| it gives, for every output and gradient, the sum of the absolute
    # values of the terms summed into it: one ulp of that is the rounding scale when the terms cancel.
    magnitude = reference(torch.float64, torch.abs)
    assert got[0].dtype == dtype and got[0].shape == (*lead, n)
    assert got[1].dtype == dtype and got[1].shape == x.shape
    for t, param in zip(got[2:], (a, d, bb)):
        assert t.dtype == param.dtype and t.shape == param.shape
    for name, g_, w64, wlp, mag in zip(("y", "dx", "dA", "dd", "dB"), got, want64, wantlp, magnitude):
        # one ulp of x's dtype on the summed terms, not only on the result: where the base and adapter terms cancel
        # the result is small (seen: K = 7, N = 1, fp32, 0.5 ulp of the terms = 3x one ulp of the result)
        assert_close_to_reference(f"{backend} {name}", g_, w64, wlp, dtype, magnitude=mag, accumulate=dtype, ulps=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_linear_against_reference(backend):
    @_settings(backend)
    @given(c=linear_cases(backend))
    def check(c):
        _run_case(backend, c)

    check()


@st.composite
def regularizer_cases(draw, backend):
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        k = draw(st.sampled_from(PRIMES_AND_SMALL[1:]))
        n = draw(st.sampled_from(PRIMES_AND_SMALL[1:]))
        r = draw(st.integers(1, min(k, n, 8)))
        layers.append((r, k, n, draw(st.sampled_from(["random", "zero_B", "orthonormal_A"]))))
    return dict(
        layers=layers,
        dtype=draw(st.sampled_from([torch.float32, torch.float64] if backend == "torch" else [torch.float32])),
        form=draw(st.sampled_from(["paper", "official"])),
        beta=draw(st.sampled_from([0.0, 1e-4, 0.5])),
        gamma=draw(st.sampled_from([0.0, 1e-3, 2.0])),
        data_seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_regularizer_against_reference(backend):
    """Value and gradients of kasa_regularizer over random models (mixed shapes, B = 0 layers, exactly orthonormal
    A) against regularizer_ref in float64; the regularizer computes in fp32, so the tolerance is fp32's."""

    @_settings(backend)
    @given(c=regularizer_cases(backend))
    def check(c):
        g = torch.Generator().manual_seed(c["data_seed"])
        mods, triples = [], []
        for r, k, n, kind in c["layers"]:
            a = torch.randn(r, k, generator=g) / k**0.5
            if kind == "orthonormal_A":
                a = torch.linalg.qr(torch.randn(k, r, generator=g, dtype=torch.float64))[0].t().float()
            b = torch.zeros(n, r) if kind == "zero_B" else torch.randn(n, r, generator=g)
            d = torch.randn(r, generator=g)
            triples.append(tuple(t.to(c["dtype"]) for t in (a, b, d)))
        # plain modules holding the adapters (r may equal min(N, K) here, which the regularizer allows)
        for a, b, d in triples:
            holder = torch.nn.Module()
            holder.lora_A = torch.nn.Parameter(a.to(DEVICE).clone())
            holder.lora_B = torch.nn.Parameter(b.to(DEVICE).clone())
            holder.lora_diag = torch.nn.Parameter(d.to(DEVICE).clone())
            mods.append(holder)
        loss = kk.kasa_regularizer(mods, beta=c["beta"], gamma=c["gamma"], form=c["form"], backend=backend)
        assert loss.dim() == 0 and loss.dtype in (torch.float32, torch.float64)
        params = [p for m in mods for p in (m.lora_A, m.lora_B, m.lora_diag)]
        grads = torch.autograd.grad(loss, params)
        def reference(dt):
            leaves = [tuple(t.detach().to(dt).requires_grad_(True) for t in tr) for tr in triples]
            value = ref.regularizer_ref(leaves, beta=c["beta"], gamma=c["gamma"], form=c["form"])
            flat = [t for tr in leaves for t in tr]
            return value.detach(), list(torch.autograd.grad(value, flat, allow_unused=True))

        # the backends compute in fp32 (fp64 for fp64 parameters): the reference in that dtype is the one to beat
        acc = torch.float64 if c["dtype"] == torch.float64 else torch.float32
        (want, want_g), (want_lp, want_lp_g) = reference(torch.float64), reference(acc)
        orthonormal = [kind == "orthonormal_A" for *_, kind in c["layers"]]
        mag_loss, mag_grads = regularizer_magnitudes(triples, c["beta"], c["gamma"], c["form"])
        assert_close_to_reference("loss", loss, want, want_lp, acc, magnitude=mag_loss)
        n_layers = len(triples)
        for i, (gt, wt, wlp) in enumerate(zip(grads, want_g, want_lp_g)):
            assert torch.isfinite(gt).all(), f"param {i}: non-finite gradient"
            if i % 3 == 0 and orthonormal[i // 3]:
                # f_A is a rounding residual there (~1e-7 in fp32): the gradient 2 gamma E A / f_A has a direction
                # set by rounding, so only its bound ||E A||_F / ||E||_F <= ||A||_2 = 1 is a property.
                bound = 2.0 * c["gamma"] * (1.0 / n_layers if c["form"] == "official" else 1.0) * (1 + 1e-3)
                assert torch.linalg.matrix_norm(gt.double()) <= bound + 1e-12, f"param {i}: |dR/dA| > 2 gamma"
                continue
            assert_close_to_reference(f"param {i}", gt, wt, wlp, acc, magnitude=mag_grads[i // 3][i % 3])

    check()


def test_every_usable_backend_is_fuzzed():
    usable = [n for n, info in kk.backends(DEVICE).items() if info.available]
    assert "torch" in usable
    if ONLY is None:
        assert set(usable) - {"triton"} <= set(BACKENDS) or DEVICE.type != "cpu"
    else:
        assert BACKENDS == [ONLY], f"KASA_FUZZ_ONLY={ONLY} but usable backends are {usable}"


def test_triton_backend_under_the_interpreter():
    if ONLY is not None or DEVICE.type != "cpu":
        pytest.skip("runs only as the CPU parent (on a GPU triton is fuzzed in-process)")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if importlib.util.find_spec("kasa_kernels.ops.triton_linear") is None:
        pytest.skip("kasa_kernels has no Triton backend yet (kasa_kernels/ops/triton_linear.py)")
    here = Path(__file__).resolve()
    env = dict(os.environ, TRITON_INTERPRET="1", KASA_FUZZ_ONLY="triton")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
           "-k", "fuzz_linear or fuzz_regularizer or every_usable"]
    try:
        proc = subprocess.run(cmd, env=env, cwd=here.parent.parent, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"triton fuzz under the interpreter did not finish in 240 s:\n{(e.stdout or '')[-3000:]}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"triton fuzz under TRITON_INTERPRET=1 failed:\n{out[-6000:]}"
    assert "3 passed" in out, f"expected the three triton fuzz tests to run and pass:\n{out[-3000:]}"
