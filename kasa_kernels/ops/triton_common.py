"""Backend "triton": what its kernels share. The dropout mask (the spec and its constants are ops/rng.py's, handed
in as Triton constexpr globals), tile-size helpers, the architecture key and the tl.dot precision rule."""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import rng
from .precision import allow_tf32

# rng.py's constants, visible inside @triton.jit functions (Triton reads only constexpr globals there).
MIX_MUL1 = tl.constexpr(rng.MIX_MUL1)
MIX_MUL2 = tl.constexpr(rng.MIX_MUL2)


@triton.jit
def mix32(h):
    """rng.py's lowbias32 finalizer on uint32 (products wrap mod 2**32, as the spec's)."""
    h = h ^ (h >> 16)
    h = h * MIX_MUL1
    h = h ^ (h >> 15)
    h = h * MIX_MUL2
    return h ^ (h >> 15)


@triton.jit
def keep_mask(seed_ptr, offs_row, offs_col, n_cols, threshold):
    """keep[i, j] for element (offs_row[i], offs_col[j]) of the logical row-major (rows, n_cols) input."""
    s0 = tl.load(seed_ptr).to(tl.uint32)
    s1 = tl.load(seed_ptr + 1).to(tl.uint32)
    idx = offs_row[:, None].to(tl.int64) * n_cols + offs_col[None, :]
    h = mix32(idx.to(tl.uint32) ^ s0)
    h = mix32(h ^ (idx >> 32).to(tl.uint32) ^ s1)
    # threshold can be 2**32 - 1: compare in int64 so no signedness promotion rule is involved.
    return h.to(tl.int64) >= threshold


class Dropout(NamedTuple):
    """The shared mask (ops/rng.py) as the kernels take it: seed (2,) int64 on the device, keep iff hash >= threshold,
    kept values scaled by keep_scale."""

    seed: torch.Tensor
    threshold: int
    keep_scale: float

    @staticmethod
    def of(p: float, seed: Optional[torch.Tensor]) -> Optional["Dropout"]:
        return None if p <= 0.0 else Dropout(seed, rng.dropout_threshold(p), rng.keep_scale(p))


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def r_pad(r: int) -> int:
    """The rank padded for tl.dot, which needs every dimension >= 16."""
    return max(16, next_pow2(r))


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


# Architectures with their own GEMM tile table (ops/triton_gemm.py); others map to the nearest.
ARCHS = ((8, 0), (8, 6), (9, 0))


def arch_key(device: torch.device) -> Tuple[int, int]:
    cap = torch.cuda.get_device_capability(device)
    if cap in ARCHS:
        return cap
    if cap[0] >= 9:
        return (9, 0)
    if cap == (8, 9) or cap == (8, 7):
        return (8, 6)  # Ada/Orin: sm86-sized shared memory
    return (8, 0)


def dot_precision(x_dtype: torch.dtype, rank_r: bool) -> str:
    """tl.dot's input_precision. The rank-r kernels upcast their tiles to fp32 and use TF32 when x is fp16/bf16 (exact
    for x's values, keeps fp32 range for H and gH); the big GEMMs feed x's dtype. fp32 x follows
    torch.backends.cuda.matmul's TF32 setting everywhere."""
    if x_dtype != torch.float32:
        return "tf32" if rank_r else "ieee"
    return "tf32" if allow_tf32() else "ieee"
