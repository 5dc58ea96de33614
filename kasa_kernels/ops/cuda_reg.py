"""Backend "cuda": the whole model's KaSA regularizer in one kernel launch (csrc/regularizer.cu).

Block l of the launch handles layer l through a device table of pointers: the r x r Grams A A^T and B^T B, their
Frobenius norms, the loss term and the closed-form gradients, in the paper or the official form; the last block adds
the layers' terms in order, so the loss is deterministic. Everything is fp32; float64 parameters run the torch
backend's math.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from . import torch_reg
from .cuda import ext

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("kasa_cuda::regularizer", mutates_args=(), device_types="cuda")
def regularizer_op(
    lora_As: List[Tensor], lora_Bs: List[Tensor], lora_diags: List[Tensor], beta: float, gamma: float, official: bool
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    loss, ga, gb, gd = ext().regularizer(lora_As, lora_Bs, lora_diags, beta, gamma, official)
    return loss, list(ga), list(gb), list(gd)


@regularizer_op.register_fake
def _regularizer_fake(lora_As, lora_Bs, lora_diags, beta, gamma, official):
    f32 = torch.float32
    return (
        lora_As[0].new_empty((), dtype=f32),
        [a.new_empty(a.shape, dtype=f32) for a in lora_As],
        [b.new_empty(b.shape, dtype=f32) for b in lora_Bs],
        [d.new_empty(d.shape, dtype=f32) for d in lora_diags],
    )


def regularizer(
    lora_As: Sequence[Tensor],
    lora_Bs: Sequence[Tensor],
    lora_diags: Sequence[Tensor],
    beta: float,
    gamma: float,
    form: str,
) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """Loss (0-dim, fp32) and the fp32 gradients w.r.t. every A, B and d, for layers l = 0..L-1."""
    if form not in ("paper", "official"):
        raise ValueError(f"form: expected 'paper' or 'official', got {form!r}")
    params = list(lora_As) + list(lora_Bs) + list(lora_diags)
    if not lora_As or any(t.dtype not in _SUPPORTED for t in params):
        return torch_reg.regularizer(lora_As, lora_Bs, lora_diags, beta, gamma, form)
    loss, ga, gb, gd = torch.ops.kasa_cuda.regularizer(
        list(lora_As), list(lora_Bs), list(lora_diags), float(beta), float(gamma), form == "official"
    )
    return loss, list(ga), list(gb), list(gd)
