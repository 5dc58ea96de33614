"""Backend "torch": the KaSA regularizer and its closed-form gradients for a whole model.

Layers are batched by shape: every group of equal (r, K) A factors is one batched r x r Gram, likewise B by (N, r)
and d by r, so a 32-layer model with 5 targets per layer costs a handful of bmm calls rather than ~500 tiny ops.
Everything is computed in fp32 (fp64 for fp64 parameters).
"""
from __future__ import annotations

from collections import defaultdict
from typing import List, Sequence, Tuple

import torch

from .defs import register_kernel
from .precision import accumulation_dtype


def _groups(tensors: Sequence[torch.Tensor]):
    by_key = defaultdict(list)
    for i, t in enumerate(tensors):
        by_key[(tuple(t.shape), t.device)].append(i)
    return by_key.values()


def _gram_term(factors: Sequence[torch.Tensor], left: bool, extra, official: bool, gamma: float):
    """For each group of equal-shape factors F: E = F F^T - I (left) or F^T F - I, f = ||E||_F,
    g = f (paper) or sqrt(f^2 + extra(F)) (official); returns (sum of g, per-factor gradient gamma * 2 E F / g)."""
    total = None
    grads: List[torch.Tensor] = [None] * len(factors)  # type: ignore[list-item]
    for idx in _groups(factors):
        f = torch.stack([factors[i].to(accumulation_dtype(factors[i])) for i in idx])
        if left:  # A: (L, r, K), Gram A A^T
            gram = f @ f.transpose(1, 2)
        else:  # B: (L, N, r), Gram B^T B
            gram = f.transpose(1, 2) @ f
        r = gram.shape[-1]
        e = gram - torch.eye(r, dtype=gram.dtype, device=gram.device)
        fro = torch.linalg.vector_norm(e, dim=(1, 2))
        n_extra = extra(factors[idx[0]]) if official else 0
        g = torch.sqrt(fro * fro + n_extra) if n_extra else fro
        # f = 0 (exactly orthonormal factor) is not differentiable: take 0/0 as 0.
        inv = torch.where(g > 0, 1.0 / torch.where(g > 0, g, torch.ones_like(g)), torch.zeros_like(g))
        scale = (2.0 * gamma) * inv
        grad = (e @ f) if left else (f @ e)
        grad = grad * scale[:, None, None]
        for j, i in enumerate(idx):
            grads[i] = grad[j]
        s = g.sum()
        total = s if total is None else total + s
    return total, grads


@register_kernel("regularizer", "torch")
def regularizer(
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    lora_diags: Sequence[torch.Tensor],
    beta: float,
    gamma: float,
    official: bool,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Loss (0-dim, fp32) and the gradients w.r.t. every A, B and d (fp32; fp64 for fp64 parameters)."""
    n_layers = len(lora_As)
    sum_a, grad_a = _gram_term(lora_As, True, lambda a: a.shape[1] - a.shape[0], official, gamma)
    sum_b, grad_b = _gram_term(lora_Bs, False, lambda b: b.shape[0] - b.shape[1], official, gamma)
    sum_d = None
    grad_d: List[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
    for idx in _groups(lora_diags):
        d = torch.stack([lora_diags[i].to(accumulation_dtype(lora_diags[i])) for i in idx])
        s = (d * d).sum()
        sum_d = s if sum_d is None else sum_d + s
        g = (2.0 * beta) * d
        for j, i in enumerate(idx):
            grad_d[i] = g[j]
    loss = beta * sum_d + gamma * (sum_a + sum_b)
    if official:
        inv_l = 1.0 / n_layers
        loss = loss * inv_l
        grad_a = [t * inv_l for t in grad_a]
        grad_b = [t * inv_l for t in grad_b]
        grad_d = [t * inv_l for t in grad_d]
    return loss, grad_a, grad_b, grad_d
