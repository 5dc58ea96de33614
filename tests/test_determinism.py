"""Determinism: with a fixed dropout_seed the torch backend gives bit-identical outputs and gradients across runs
(docs/determinism.md says which modes cannot). Fused backends are held to the same on a GPU under
torch.use_deterministic_algorithms(True)."""
from __future__ import annotations

import pytest
import torch

import kasa_kernels as kk

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run(backend, dtype, p, seed, device=DEVICE, m=(4, 33), k=48, n=40, r=8, data_seed=0):
    g = torch.Generator().manual_seed(data_seed)
    x = torch.randn(*m, k, generator=g).to(device, dtype).requires_grad_(True)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    params = [t.to(device).requires_grad_(True) for t in
              (torch.randn(r, k, generator=g) / k**0.5, torch.randn(r, generator=g), torch.randn(n, r, generator=g))]
    y = kk.kasa_linear(x, w, b, *params, 2.0, dropout_p=p, training=True, backend=backend, dropout_seed=seed)
    gy = torch.randn(y.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(y, [x] + params, gy)
    holder = _holder(*params)
    reg = kk.kasa_regularizer([holder], backend=backend)
    reg_grads = torch.autograd.grad(reg, [holder.lora_A, holder.lora_diag, holder.lora_B])
    return [y.detach()] + list(grads) + [reg.detach()] + list(reg_grads)


def _holder(a, d, b):
    m = torch.nn.Module()
    m.lora_A, m.lora_diag, m.lora_B = (torch.nn.Parameter(t.detach().clone()) for t in (a, d, b))
    return m


def _bit_identical(first, second):
    return all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_backend_is_bit_identical_across_runs(dtype, p):
    runs = [_run("torch", dtype, p, 1234) for _ in range(3)]
    assert _bit_identical(runs[0], runs[1]) and _bit_identical(runs[0], runs[2])
    with _deterministic():
        again = _run("torch", dtype, p, 1234)
    assert _bit_identical(runs[0], again)


def test_the_check_is_sensitive():
    # different dropout seeds, or a different data seed, give different bits
    base = _run("torch", torch.float32, 0.3, 1234)
    assert not _bit_identical(base, _run("torch", torch.float32, 0.3, 1235))
    assert not _bit_identical(base, _run("torch", torch.float32, 0.0, None, data_seed=1))


def test_seed_none_draws_from_torchs_generator():
    # dropout_seed=None is reproducible through torch.manual_seed, and differs between draws
    torch.manual_seed(7)
    a = _run("torch", torch.float32, 0.3, None)
    b = _run("torch", torch.float32, 0.3, None)
    torch.manual_seed(7)
    c = _run("torch", torch.float32, 0.3, None)
    assert _bit_identical(a, c) and not _bit_identical(a, b)


class _deterministic:
    def __enter__(self):
        self.prev = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.prev)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [n for n, i in kk.backends(DEVICE).items() if i.available])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_gpu_backends_bit_identical_in_deterministic_mode(backend, p):
    # many M-blocks, so a backend reducing dB / dd / dA with atomics would show run-to-run differences
    with _deterministic():
        runs = [_run(backend, torch.bfloat16, p, 99, m=(8, 1031), k=512, n=768, r=16) for _ in range(3)]
    assert _bit_identical(runs[0], runs[1]) and _bit_identical(runs[0], runs[2])
