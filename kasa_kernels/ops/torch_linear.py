"""Backend "torch": the fused KaSA linear op in plain PyTorch, with the closed-form backward of docs/math.md.

Runs on every device and traces under torch.compile. It never forms diag(d) and never keeps an M x N or M x K
tensor for backward: forward returns H = dropout(x) A^T (M x r, fp32) and backward rebuilds everything else from
x, H and the dropout seed. The low-rank products accumulate in fp32 (fp64 when x is fp64, for gradcheck); the base
GEMM and the M x N output stay in x's dtype, and the rank-r term is added into the GEMM's output in place, so no
second M x N tensor is made.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .defs import register_kernel
from .precision import accumulation_dtype, fp16_rebalance
from .quant_weight import dequantizing
from .rng import apply_dropout


def _add_lowrank_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """out += left @ right for a rank-r left (M, r) and right (r, cols) in the accumulation dtype, with the operands
    cast to out's dtype so the add rides in the GEMM (fp16 after precision.fp16_rebalance)."""
    if out.dtype == torch.float16:
        left, right = fp16_rebalance(left, right)
    out.addmm_(left.to(out.dtype), right.to(out.dtype))


@register_kernel("linear_forward", "torch")
def linear_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Y = x W^T + b + s ((dropout(x) A^T) d) B^T for x2d (M, K). Returns (Y in x's dtype, H (M, r) fp32)."""
    acc = accumulation_dtype(x2d)
    x_acc = apply_dropout(x2d, seed, dropout_p, acc) if dropout_p > 0.0 else x2d.to(acc)
    h = x_acc @ lora_A.to(acc).t()
    s = h * (lora_diag.to(acc) * scaling)
    y = F.linear(x2d, weight, bias)
    _add_lowrank_(y, s, lora_B.to(acc).t())
    return y, h


@register_kernel("linear_backward", "torch")
def linear_backward(
    grad_y: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    needs: Tuple[bool, bool, bool, bool],
):
    """Gradients (dx, dA, dd, dB) of linear_forward; each None where `needs` says it is not wanted.

    dx is in x's dtype; dA, dd, dB are in the accumulation dtype (the autograd layer casts them)."""
    need_dx, need_da, need_dd, need_db = needs
    acc = h.dtype
    g_acc = grad_y.to(acc)
    d = lora_diag.to(acc)
    gz = (g_acc @ lora_B.to(acc)) * scaling
    gh = gz * d
    db = (g_acc.t() @ (h * d)) * scaling if need_db else None
    dd = (gz * h).sum(0) if need_dd else None
    da = None
    if need_da:
        x_acc = apply_dropout(x2d, seed, dropout_p, acc) if dropout_p > 0.0 else x2d.to(acc)
        da = gh.t() @ x_acc
    dx = None
    if need_dx:
        dx = grad_y @ weight
        if dropout_p > 0.0:
            dx += apply_dropout(gh @ lora_A.to(acc), seed, dropout_p, out_dtype=dx.dtype)
        else:
            _add_lowrank_(dx, gh, lora_A.to(acc))
    return dx, da, dd, db


# A quantized base (ops/quant_weight.py): W is dequantized at each call, in x's dtype and bit for bit as bitsandbytes
# dequantizes it, and dropped after its GEMM; the autograd layer saves the packed weight, never this matrix. Backward
# reads W only for dx.
qlinear_forward, qlinear_backward = dequantizing(linear_forward, linear_backward, weight_without_dx=False)
register_kernel("qlinear_forward", "torch")(qlinear_forward)
register_kernel("qlinear_backward", "torch")(qlinear_backward)
