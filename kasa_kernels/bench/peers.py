"""Peer implementations that exist only as benchmark baselines (the PEFT-style eager one lives in kasa_reference).

unsloth_style_linear is the strongest composition of stock cuBLAS calls we know for a KaSA layer, in the manner of
Unsloth's LoRA MLP kernels: the base GEMM, then the rank-r term added into its output in place by one addmm with the
scale s folded into addmm's alpha and the diagonal d folded into B (an N x r product, not M x r), and a hand-written
backward whose GEMMs also carry the scale in alpha. Everything runs in the activation dtype (adapters are cast to
it, as Unsloth does), so it does fewer, cheaper passes than PEFT's fp32-adapter path; it is the unfused bar the fused
kernels must beat. Written for this harness from docs/math.md; it shares no code with any library.

    forward:  H = X~ A^T (M x r),  Bd = B * d (N x r),  Y = x W^T (+ b);  Y += s * H Bd^T        (addmm_, alpha=s)
    backward: gH = s * G Bd (M x r),  dBd = s * G^T H (N x r),  dB = dBd * d,  dd = colsum(dBd * B),
              dA = gH^T X~,  dx = G W + dropout_backward(gH A)
X~ = dropout(x) is saved (with its mask) when p > 0, as nn.Dropout followed by nn.Linear would save them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


class UnslothStyleKasaFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, keep_mask):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        dt = x.dtype
        a = lora_A.to(dt)
        b = lora_B.to(dt)
        d = lora_diag.to(dt)
        if dropout_p > 0.0:
            mask = keep_mask.reshape(x2d.shape)
            x_drop = x2d * mask.to(dt) * (1.0 / (1.0 - dropout_p))
        else:
            mask = None
            x_drop = x2d
        h = x_drop @ a.t()
        bd = b * d
        y = F.linear(x2d, weight, bias)
        y.addmm_(h, bd.t(), alpha=scaling)
        ctx.save_for_backward(x2d if dropout_p == 0.0 else x_drop, mask, weight, a, b, d, bd, h)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.shape = shape
        ctx.param_dtypes = (lora_A.dtype, lora_diag.dtype, lora_B.dtype)
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x_drop, mask, weight, a, b, d, bd, h = ctx.saved_tensors
        s, p = ctx.scaling, ctx.dropout_p
        g = grad_y.reshape(-1, weight.shape[0])
        if g.dtype != x_drop.dtype:
            g = g.to(x_drop.dtype)
        gh = torch.mm(g, bd).mul_(s)
        dbd = torch.addmm(bd, g.t(), h, beta=0.0, alpha=s)
        db = dbd * d
        dd = (dbd * b).sum(0)
        da = gh.t() @ x_drop
        dx = None
        if ctx.needs_input_grad[0]:
            dx = g @ weight
            if p > 0.0:
                dx.add_((gh @ a) * mask.to(dx.dtype), alpha=1.0 / (1.0 - p))
            else:
                dx.addmm_(gh, a)
            dx = dx.view(ctx.shape)
        a_dt, d_dt, b_dt = ctx.param_dtypes
        return dx, None, None, da.to(a_dt), dd.to(d_dt), db.to(b_dt), None, None, None


def unsloth_style_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    keep_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = x W^T + b + s ((dropout(x) A^T) * d) B^T through UnslothStyleKasaFunction.

    keep_mask: a bool tensor of x's shape (True = kept) for the dropout; drawn with torch's generator when None.
    The activation dtype is x's; adapter gradients come back in each adapter's own dtype."""
    p = float(dropout_p) if training else 0.0
    if p > 0.0 and keep_mask is None:
        keep_mask = torch.rand(x.shape, device=x.device) >= p
    return UnslothStyleKasaFunction.apply(x, weight, bias, lora_A, lora_diag, lora_B, float(scaling), p, keep_mask)
