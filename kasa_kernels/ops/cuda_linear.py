"""Backend "cuda": the fused KaSA linear op on the CUDA C++ kernels of csrc/ (extension kasa_kernels._C), registered
as this backend's kernels of ops/defs.py's ops.

Forward is two launches: lowrank_shrink (H = dropout(x) A^T in fp32, and S = H * (s d) in x's dtype) and
gemm_lowrank (Y = x W^T + S B^T + b, the rank-r term fused as extra k-steps of the tensor-core GEMM). Backward is
dy_pass (gH, dB, dd from one read of G), lowrank_da (dA = gH^T dropout(x)) and gemm_lowrank again for
dx = G W + dropout_backward(gH A). Nothing of size M x N or M x K is saved or materialized beyond the outputs. The
kernels take fp32, fp16 and bf16 (kasa_kernels.functional keeps fp64 on the torch backend); the dropout threshold
and keep scale come from ops/rng.py.
"""
from __future__ import annotations

from .cuda import ext
from .defs import register_kernel
from .precision import allow_tf32
from .quant_weight import dequantizing
from .rng import dropout_threshold, keep_scale


def _dropout_args(dropout_p: float):
    """(threshold, keep scale) of the shared mask; (0, 1.0) without dropout (the seed is then None)."""
    return (dropout_threshold(dropout_p), keep_scale(dropout_p)) if dropout_p > 0.0 else (0, 1.0)


@register_kernel("linear_forward", "cuda")
def linear_forward(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed):
    return ext().linear_forward(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, *_dropout_args(dropout_p), seed,
                                allow_tf32())


@register_kernel("base_gemm", "cuda")
def base_gemm(x2d, weight, bias):
    return ext().base_gemm(x2d, weight, bias, allow_tf32())


@register_kernel("linear_backward", "cuda")
def linear_backward(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed, needs):
    grads = ext().linear_backward(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling,
                                  *_dropout_args(dropout_p), seed, *needs, allow_tf32())
    return tuple(g if need else None for g, need in zip(grads, needs))



# A quantized base: no fused dequantizing path in the CUDA C++ kernels yet. W is dequantized into memory (x's dtype,
# bit for bit as bitsandbytes does) for this call only, then the kernels above run; backward dequantizes again, so
# nothing dequantized is kept, but each call holds one N x K temporary.
qlinear_forward, qlinear_backward = dequantizing(linear_forward, linear_backward)
register_kernel("qlinear_forward", "cuda")(qlinear_forward)
register_kernel("qlinear_backward", "cuda")(qlinear_backward)
