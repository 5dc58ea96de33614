"""Backend "cuda": the fused KaSA linear op on the CUDA C++ kernels of csrc/ (extension kasa_kernels._C).

Forward is two launches: lowrank_shrink (H = dropout(x) A^T in fp32, and S = H * (s d) in x's dtype) and
gemm_lowrank (Y = x W^T + S B^T + b, the rank-r term fused as extra k-steps of the tensor-core GEMM). Backward is
dy_pass (gH, dB, dd from one read of G), lowrank_da (dA = gH^T dropout(x)) and gemm_lowrank again for
dx = G W + dropout_backward(gH A). Nothing of size M x N or M x K is saved or materialized beyond the outputs.

Both halves are torch.library custom ops with fake implementations, so torch.compile(fullgraph=True) traces a
KasaLinear without graph breaks. float64 inputs (gradcheck) run the torch backend's math: the kernels are written
for fp32, fp16 and bf16.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import torch_linear
from .cuda import allow_tf32, ext, probe  # noqa: F401  (probe is this backend's entry point for _backend)

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@torch.library.custom_op("kasa_cuda::linear_forward", mutates_args=(), device_types="cuda")
def linear_forward_op(
    x2d: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_diag: Tensor,
    lora_B: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    y, h = ext().linear_forward(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed, allow_tf32())
    return y, h


@linear_forward_op.register_fake
def _linear_forward_fake(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed):
    m, n, r = x2d.shape[0], weight.shape[0], lora_A.shape[0]
    return x2d.new_empty((m, n)), x2d.new_empty((m, r), dtype=torch.float32)


@torch.library.custom_op("kasa_cuda::linear_backward", mutates_args=(), device_types="cuda")
def linear_backward_op(
    grad_y: Tensor,
    x2d: Tensor,
    weight: Tensor,
    lora_A: Tensor,
    lora_diag: Tensor,
    lora_B: Tensor,
    h: Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[Tensor],
    need_dx: bool,
    need_da: bool,
    need_dd: bool,
    need_db: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    dx, da, dd, db = ext().linear_backward(
        grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed,
        need_dx, need_da, need_dd, need_db, allow_tf32(),
    )
    return dx, da, dd, db


@linear_backward_op.register_fake
def _linear_backward_fake(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed,
                          need_dx, need_da, need_dd, need_db):
    # Gradients that are not needed come back as empty (0,) tensors: a custom op cannot return None.
    m, k = x2d.shape
    n, r = weight.shape[0], lora_A.shape[0]
    f32 = torch.float32
    return (
        x2d.new_empty((m, k)) if need_dx else x2d.new_empty((0,)),
        x2d.new_empty((r, k), dtype=f32) if need_da else x2d.new_empty((0,), dtype=f32),
        x2d.new_empty((r,), dtype=f32) if need_dd else x2d.new_empty((0,), dtype=f32),
        x2d.new_empty((n, r), dtype=f32) if need_db else x2d.new_empty((0,), dtype=f32),
    )


@torch.library.custom_op("kasa_cuda::base_gemm", mutates_args=(), device_types="cuda")
def base_gemm_op(x2d: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return ext().base_gemm(x2d, weight, bias, allow_tf32())


@base_gemm_op.register_fake
def _base_gemm_fake(x2d, weight, bias):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]))


def _kernels_apply(*tensors: Optional[Tensor]) -> bool:
    return all(t is None or t.dtype in _SUPPORTED for t in tensors)


def linear_forward(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed):
    """Y = x W^T + b + s ((dropout(x) A^T) d) B^T for x2d (M, K). Returns (Y in x's dtype, H (M, r) fp32)."""
    if not _kernels_apply(x2d, weight, bias, lora_A, lora_diag, lora_B):
        return torch_linear.linear_forward(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed)
    p = float(dropout_p)
    return torch.ops.kasa_cuda.linear_forward(
        x2d, weight, bias, lora_A, lora_diag, lora_B, float(scaling), p, seed if p > 0.0 else None
    )


def base_gemm(x2d, weight, bias=None):
    """x W^T + b through the same GEMM kernel with the adapter switched off (benchmarks compare it with cuBLAS)."""
    return torch.ops.kasa_cuda.base_gemm(x2d, weight, bias)


def linear_backward(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed, needs):
    """Gradients (dx, dA, dd, dB) of linear_forward; each None where `needs` says it is not wanted.

    dx is in x's dtype; dA, dd, dB are fp32 (the autograd layer casts them)."""
    if not _kernels_apply(grad_y, x2d, weight, lora_A, lora_diag, lora_B) or h.dtype != torch.float32:
        return torch_linear.linear_backward(
            grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed, needs
        )
    need_dx, need_da, need_dd, need_db = (bool(n) for n in needs)
    p = float(dropout_p)
    dx, da, dd, db = torch.ops.kasa_cuda.linear_backward(
        grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, float(scaling), p, seed if p > 0.0 else None,
        need_dx, need_da, need_dd, need_db,
    )
    return (dx if need_dx else None, da if need_da else None, dd if need_dd else None, db if need_db else None)
