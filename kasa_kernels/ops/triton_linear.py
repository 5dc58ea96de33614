"""Backend "triton": the fused KaSA linear op, composed from the kernels of triton_lowrank.py and triton_gemm.py
(docs/design.md, "The fused kernel plan") and registered as this backend's kernels of ops/defs.py's ops.

Forward, two launches:
    shrink           H = dropout(x) A^T and S = H (s d) (M x r, both fp32)
    gemm_lowrank     Y = x W^T + S B^T + b: the rank-r term is the accumulator's first k-step, b the epilogue
Backward, three launches (+ a tiny fp32 sum over split partials):
    dy_pass          reads each tile of G once: gH = s (G B) d, dB = s G^T Z, dd = colsum(gZ H)
    lowrank_da       dA = gH^T dropout(x), the mask regenerated from the seed
    gemm_lowrank     dx = G W + dropout_backward(gH A), the rank-r term (masked per element when p > 0) as the
                     accumulator's first k-steps
Nothing of size M x N or M x K is allocated besides the outputs.

A quantized base (ops/quant_weight.py, the qlinear_* ops) takes the same launches: its GEMMs dequantize W in the
main loop (ops/triton_dequant.py), in the forward and in dX; W is never dequantized into memory.
"""
from __future__ import annotations

import torch

from .defs import register_kernel
from .quant_weight import QuantizedWeight
from .triton_common import Dropout, dot_precision
from .triton_dequant import QuantOperand
from .triton_gemm import KNView, LowRank, gemm_lowrank
from .triton_lowrank import dy_pass, lowrank_da, shrink


def _weight_operand(weight, transposed: bool):
    """(b, quant) of a GEMM: W^T (K, N) in the forward (transposed) or W in dX, as a view without a copy; for a
    QuantizedWeight, its packed data read through the strides of the row-major (N, K) weight's elements."""
    if isinstance(weight, QuantizedWeight):
        data = weight.data if weight.kind == "int8" else weight.data.reshape(-1).view(torch.uint8)
        k = weight.shape[1]
        return (KNView(data, 1, k) if transposed else KNView(data, k, 1)), QuantOperand.of(weight)
    if transposed:
        return KNView(weight, weight.stride(1), weight.stride(0)), None
    return KNView(weight, weight.stride(0), weight.stride(1)), None


@register_kernel("qlinear_forward", "triton")
@register_kernel("linear_forward", "triton")
def linear_forward(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed):
    M = x2d.shape[0]
    y = torch.empty((M, weight.shape[0]), dtype=x2d.dtype, device=x2d.device)
    h, s = shrink(x2d, lora_A, lora_diag, scaling=scaling, dropout=Dropout.of(dropout_p, seed))
    if M == 0:
        return y, h
    lowrank = LowRank(s, KNView(lora_B, lora_B.stride(1), lora_B.stride(0)))
    b, quant = _weight_operand(weight, transposed=True)
    gemm_lowrank(x2d, b, y, bias=bias, lowrank=lowrank, quant=quant,
                 precision=dot_precision(x2d.dtype, False), lowrank_precision=dot_precision(x2d.dtype, True))
    return y, h


@register_kernel("base_gemm", "triton")
def base_gemm(x2d, weight, bias=None):
    """The forward GEMM with the rank-r term switched off (benchmarks compare it with cuBLAS)."""
    y = torch.empty((x2d.shape[0], weight.shape[0]), dtype=x2d.dtype, device=x2d.device)
    if x2d.shape[0] == 0:
        return y
    b, quant = _weight_operand(weight, transposed=True)
    return gemm_lowrank(x2d, b, y, bias=bias, quant=quant, precision=dot_precision(x2d.dtype, False),
                        lowrank_precision=dot_precision(x2d.dtype, True))


@register_kernel("qlinear_backward", "triton")
@register_kernel("linear_backward", "triton")
def linear_backward(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed, needs):
    need_dx, need_da, need_dd, need_db = needs
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    dev = x2d.device
    if M == 0:
        zero = lambda *shape: torch.zeros(shape, dtype=torch.float32, device=dev)  # noqa: E731
        return (torch.empty((0, K), dtype=x2d.dtype, device=dev) if need_dx else None,
                zero(R, K) if need_da else None, zero(R) if need_dd else None, zero(N, R) if need_db else None)
    dropout = Dropout.of(dropout_p, seed)
    small = dot_precision(x2d.dtype, True)
    gh, db, dd = dy_pass(grad_y, lora_B, h, lora_diag, scaling=scaling, need_db=need_db, need_dd=need_dd,
                         deterministic=torch.are_deterministic_algorithms_enabled(), precision=small)
    da = lowrank_da(x2d, gh, dropout=dropout, precision=small) if need_da else None
    dx = None
    if need_dx:
        dx = torch.empty((M, K), dtype=x2d.dtype, device=dev)
        b, quant = _weight_operand(weight, transposed=False)
        gemm_lowrank(grad_y, b, dx, lowrank=LowRank(gh, KNView(lora_A, lora_A.stride(0), lora_A.stride(1))),
                     dropout=dropout, quant=quant, precision=dot_precision(x2d.dtype, False), lowrank_precision=small)
    return dx, da, dd, db
