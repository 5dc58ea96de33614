"""Backend "triton": what its kernels share. The dropout mask (the spec and its constants are ops/rng.py's, handed
in as Triton constexpr globals), tile-size helpers, the architecture key and the tl.dot precision rule."""
from __future__ import annotations

import contextlib
import functools
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
    """keep[i, j] for element (offs_row[i], offs_col[j]) of the logical row-major (rows, n_cols) input.

    The 64-bit index row * n_cols + col is formed as two 32-bit words: its per-row part in int64 once per row,
    then per element one 32-bit add, its carry into the high word, and 32-bit compares. The int64-per-element form
    cost a 128 x 256 dX tile 1.86 KB/thread of spills (AOT sm90, triton 3.8, tools/aot_compile_triton.py)."""
    s0 = tl.load(seed_ptr).to(tl.uint32)
    s1 = tl.load(seed_ptr + 1).to(tl.uint32)
    row_start = offs_row.to(tl.int64) * n_cols
    lo_row = row_start.to(tl.uint32)[:, None]
    lo = lo_row + offs_col.to(tl.uint32)[None, :]  # wraps mod 2**32
    hi = (row_start >> 32).to(tl.uint32)[:, None] + (lo < lo_row).to(tl.uint32)  # unsigned compare: the carry
    h = mix32(lo ^ s0)
    h = mix32(h ^ hi ^ s1)
    # threshold <= 2**32 - 1 (ops/rng.py): exact as uint32, and a uint32 compare is unsigned
    return h >= tl.cast(threshold, tl.uint32)


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


# Architectures with their own GEMM tile table (ops/triton_gemm.py); others map to the nearest.
ARCHS = ((8, 0), (8, 6), (9, 0))


def arch_key(capability: Tuple[int, int]) -> Tuple[int, int]:
    if capability in ARCHS:
        return capability
    if capability[0] >= 9:
        return (9, 0)
    if capability in ((8, 9), (8, 7)):
        return (8, 6)  # Ada/Orin: sm86-sized shared memory
    return (8, 0)


class Target(NamedTuple):
    """What the launchers plan a launch for: the tile table's architecture key, the SM count (grid sizes and
    splits) and the opt-in shared memory per block (the GEMM's prune)."""

    arch: Tuple[int, int]
    n_sms: int
    smem_limit: int


_AOT_TARGET: Optional[Target] = None


@contextlib.contextmanager
def aot_target(target: Target):
    """Inside this block every launcher plans for `target`, whatever device its tensors are on. This is how
    tools/aot_compile_triton.py runs the real launchers on CPU tensors to compile exactly what they would launch on
    that GPU; nothing else sets it."""
    global _AOT_TARGET
    prev, _AOT_TARGET = _AOT_TARGET, target
    try:
        yield target
    finally:
        _AOT_TARGET = prev


def target_of(device: torch.device) -> Optional[Target]:
    """The GPU a launch on `device` plans for; None off CUDA (the CPU interpreter)."""
    if _AOT_TARGET is not None:
        return _AOT_TARGET
    if device.type != "cuda":
        return None
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:
        limit = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return Target(arch_key((props.major, props.minor)), props.multi_processor_count, int(limit))


def sm_count(target: Optional[Target]) -> int:
    """SMs to fill; 2 under the interpreter, so the tests' small shapes still take the split paths."""
    return target.n_sms if target is not None else 2


def dot_precision(x_dtype: torch.dtype, rank_r: bool) -> str:
    """tl.dot's input_precision. The rank-r kernels upcast their tiles to fp32 and use TF32 when x is fp16/bf16 (exact
    for x's values, keeps fp32 range for H and gH); the big GEMMs feed x's dtype. fp32 x follows
    torch.backends.cuda.matmul's TF32 setting everywhere."""
    if x_dtype != torch.float32:
        return "tf32" if rank_r else "ieee"
    return "tf32" if allow_tf32() else "ieee"
