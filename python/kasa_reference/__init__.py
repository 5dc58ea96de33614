"""kasa_reference: the test oracle for kasa_kernels.

The literal math of docs/math.md, written for clarity and not for speed. Every function computes in the
dtype of the tensors it is given (pass float64 tensors for an exact oracle, or low-precision tensors to measure how
much error the plain formula itself makes in that dtype). Gradients come from autograd: nothing here has a
hand-written backward. This package imports nothing from kasa_kernels, so a bug cannot hide in both.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "kasa_linear_ref",
    "svd_truncate_ref",
    "regularizer_ref",
    "regularizer_official_literal_ref",
    "merge_ref",
    "init_adapters_ref",
    "peft_style_eager",
]


def kasa_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """y = x W^T + b + s * ((dropout(x) A^T) * d) B^T.

    dropout_mask: a {0,1} tensor broadcastable to x, or None for no dropout. Kept values are scaled by 1/(1-p).
    dtype: if given, every operand is cast to it first (the whole formula then runs in that dtype); the result is
    returned in that dtype.
    """
    if dtype is not None:
        x, weight, lora_A, lora_diag, lora_B = (t.to(dtype) for t in (x, weight, lora_A, lora_diag, lora_B))
        bias = None if bias is None else bias.to(dtype)
    if dropout_mask is None:
        x_drop = x
    else:
        x_drop = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    base = x @ weight.transpose(0, 1)
    if bias is not None:
        base = base + bias
    h = x_drop @ lora_A.transpose(0, 1)
    z = h * lora_diag
    return base + scaling * (z @ lora_B.transpose(0, 1))


def svd_truncate_ref(weight: torch.Tensor, r: int, mode: str = "peft") -> torch.Tensor:
    """Drop the r smallest singular triplets of W (N, K), computed in float64.

    mode "peft" keeps min(N, K) - r triplets, "official" keeps K - r (all of them when K - r >= min(N, K)),
    "none" returns W unchanged. Returned in W's dtype.
    """
    n, k_in = weight.shape
    k = min(n, k_in)
    if mode == "none":
        return weight.clone()
    if r >= k or r <= 0:
        raise ValueError(f"r must be in [1, min(N, K) - 1] = [1, {k - 1}], got {r}")
    keep = {"peft": k - r, "official": min(k, k_in - r)}[mode]
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :keep] @ torch.diag(s[:keep]) @ vh[:keep, :]).to(weight.dtype)


def _fro(m: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((m * m).sum())


def regularizer_ref(
    layers: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    beta: float = 1e-4,
    gamma: float = 1e-3,
    form: str = "paper",
) -> torch.Tensor:
    """R over layers given as (A (r,K), B (N,r), d (r,)) triples, computed in the tensors' dtype.

    paper:    sum_l beta ||d||^2 + gamma (||B^T B - I_r||_F + ||A A^T - I_r||_F)
    official: (1/L) sum_l beta ||d||^2 + gamma (sqrt(f_A^2 + K - r) + sqrt(f_B^2 + N - r))
    """
    total = None
    for a, b, d in layers:
        r, k = a.shape
        n = b.shape[0]
        eye = torch.eye(r, dtype=a.dtype, device=a.device)
        f_a = _fro(a @ a.transpose(0, 1) - eye)
        f_b = _fro(b.transpose(0, 1) @ b - eye)
        if form == "official":
            f_a = torch.sqrt(f_a * f_a + (k - r))
            f_b = torch.sqrt(f_b * f_b + (n - r))
        elif form != "paper":
            raise ValueError(f"form must be 'paper' or 'official', got {form!r}")
        term = beta * (d * d).sum() + gamma * (f_a + f_b)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no layers")
    if form == "official":
        total = total / len(layers)
    return total


def regularizer_official_literal_ref(
    layers: Sequence[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], beta: float = 1e-4, gamma: float = 1e-3
) -> torch.Tensor:
    """The official trainer's form with the full K x K and N x N Grams (small shapes only): it checks the r x r
    identity that every fast implementation relies on."""
    total = 0.0
    for a, b, d in layers:
        k = a.shape[1]
        n = b.shape[0]
        ga = a.transpose(0, 1) @ a - torch.eye(k, dtype=a.dtype, device=a.device)
        gb = b @ b.transpose(0, 1) - torch.eye(n, dtype=b.dtype, device=b.device)
        total = total + beta * (d * d).sum() + gamma * (_fro(ga) + _fro(gb))
    return total / len(layers)


def merge_ref(weight, lora_A, lora_diag, lora_B, scaling):
    """W + s (B diag(d)) A, in float64, cast to W's dtype."""
    delta = lora_B.double() @ torch.diag(lora_diag.double()) @ lora_A.double()
    return (weight.double() + scaling * delta).to(weight.dtype)


def init_adapters_ref(r: int, k: int, n: int, generator: Optional[torch.Generator] = None, dtype=torch.float32):
    """PEFT's KaSA initialization: A ~ U(-1/sqrt(K), 1/sqrt(K)), B = 0, d ~ N(0, 1)."""
    bound = 1.0 / math.sqrt(k)
    a = (torch.rand(r, k, generator=generator, dtype=dtype) * 2 - 1) * bound
    b = torch.zeros(n, r, dtype=dtype)
    d = torch.randn(r, generator=generator, dtype=dtype)
    return a, b, d


def peft_style_eager(x, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout: Optional[torch.nn.Module] = None):
    """The unfused eager composition PEFT runs (base F.linear, then the adapter with x cast to the adapter dtype and
    the result added to the base output). A baseline for benchmarks, differentiable by autograd."""
    result = torch.nn.functional.linear(x, weight, bias)
    xa = x.to(lora_A.dtype)
    if dropout is not None:
        xa = dropout(xa)
    after_a = torch.nn.functional.linear(xa, lora_A)
    out = torch.nn.functional.linear(after_a * lora_diag, lora_B) * scaling
    return result + out.to(result.dtype)

