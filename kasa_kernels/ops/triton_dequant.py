"""Backend "triton": dequantization of a quantized base weight inside the GEMM's main loop (ops/quant_weight.py has
the formats and the torch form, which this matches bit for bit).

The GEMM reads its b operand (K_gemm, N_gemm) as elements e = k * stride_k + n * stride_n of the row-major (N, K)
weight: stride_k = 1, stride_n = K in the forward (b = W^T), stride_k = K, stride_n = 1 in dX (b = W). Each k-step
gathers the tile's packed bytes, its 4-bit codes' values (a 16-entry table) and its scales by index arithmetic and
hands dot() the weight in the activation dtype; nothing of size N x K is ever written.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .quant_weight import INT8_UNIT, QuantizedWeight

# QUANT constexpr values of the GEMM kernel.
NONE, FOUR_BIT, INT8 = 0, 4, 8
_INT8_UNIT = tl.constexpr(INT8_UNIT)


class QuantOperand(NamedTuple):
    """What the kernel needs besides the packed data: the fp32 scale per block (per row for int8, nested scales
    already decoded), the 16-value table (4-bit), the format as the QUANT constexpr, and the 4-bit block size."""

    scale: torch.Tensor
    code: torch.Tensor
    quant: int
    blocksize: int

    @staticmethod
    def of(w: QuantizedWeight) -> "QuantOperand":
        if w.nested:
            raise ValueError("QuantOperand: decode nested scales first (quant_weight.block_scales)")
        if w.kind == "int8":
            return QuantOperand(w.scale, w.scale, INT8, 1)
        return QuantOperand(w.scale, w.code, FOUR_BIT, w.blocksize)


@triton.jit
def dequant_tile(q_ptr, scale_ptr, code_ptr, offs_k, offs_n, k_ok, stride_k, stride_n,
                 QUANT: tl.constexpr, QBLOCK: tl.constexpr, B_K_CONTIG: tl.constexpr):
    """The (len(offs_k), len(offs_n)) fp32 tile of b = W^T (B_K_CONTIG) or W, zero where k_ok is false.

    4-bit: byte e // 2 holds element e in its high nibble when e is even; value = code[nibble] * scale[e // QBLOCK].
    int8:  value = (q * scale[row]) * INT8_UNIT, row = W's row: n in the forward, k in dX."""
    e = offs_k[:, None].to(tl.int64) * stride_k + offs_n[None, :].to(tl.int64) * stride_n
    ok = k_ok[:, None] & (offs_n[None, :] >= 0)
    if QUANT == 4:
        byte = tl.load(q_ptr + (e >> 1), mask=ok, other=0).to(tl.int32)
        nibble = tl.where((e & 1) == 0, byte >> 4, byte & 15)
        value = tl.load(code_ptr + nibble) * tl.load(scale_ptr + e // QBLOCK, mask=ok, other=0.0)
    else:
        if B_K_CONTIG:
            row = offs_n[None, :] + 0 * offs_k[:, None]
        else:
            row = offs_k[:, None] + 0 * offs_n[None, :]
        q = tl.load(q_ptr + e, mask=ok, other=0).to(tl.float32)
        value = (q * tl.load(scale_ptr + row, mask=ok, other=0.0)) * _INT8_UNIT
    return tl.where(ok, value, 0.0)
