"""The dropout mask every backend shares: a counter-based hash of (seed, element index), never stored.

Element (m, k) of the logical (M, K) input (row-major index i = m*K + k, whatever the strides) is kept iff

    h = mix32(mix32(lo32(i) ^ s0) ^ hi32(i) ^ s1)      (all arithmetic mod 2**32)
    keep = h >= threshold(p),    threshold(p) = min(round(p * 2**32), 2**32 - 1)

with mix32 the "lowbias32" integer finalizer (xor-shift 16, multiply by MIX_MUL1, xor-shift 15, multiply by
MIX_MUL2, xor-shift 15) and (s0, s1) the two 32-bit words of the seed. P(keep) = 1 - p up to 2**-32. Each backend implements
this spec in its own language (torch here, Triton in ops/triton_common.py, CUDA in csrc/kasa_common.cuh), with the
constants defined once, in ops/rng_constants.py: Triton reads them as constexpr globals, and the C++ builds
(setup.py, CMakeLists.txt, tests/cuda_emu/build.py) pass them as -D definitions read from that file;
dropout_threshold and keep_scale are computed here and handed to the kernels as arguments. The tests hold the backends bit-identical, so one seed gives
one mask on every backend, in forward and in backward.

The seed is an int64 tensor of shape (2,) on the input's device, so drawing it needs no host sync and traces under
torch.compile.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch

from .rng_constants import MASK32, MIX_MUL1, MIX_MUL2  # noqa: F401  (defined once, there)


def dropout_threshold(p: float) -> int:
    """Keep iff hash >= this: min(round(p * 2**32), 2**32 - 1)."""
    return min(int(round(p * 2.0**32)), MASK32)


def keep_scale(p: float) -> float:
    """Inverted dropout's scale of kept values, 1 / (1 - p)."""
    return 1.0 / (1.0 - p)


def make_seed(seed: Union[None, int, torch.Tensor], device: torch.device) -> torch.Tensor:
    """A (2,) int64 tensor of two 32-bit words. None draws one from torch's generator for `device`."""
    if seed is None:
        return torch.randint(0, 2**32, (2,), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.shape != (2,):
            raise ValueError(f"dropout_seed: expected an int64 tensor of shape (2,), got {seed.dtype} {tuple(seed.shape)}")
        return (seed.to(device) & MASK32)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"dropout_seed: expected None, an int or an int64 tensor of shape (2,), got {type(seed).__name__}")
    seed = seed % 2**64
    return torch.tensor([seed & MASK32, (seed >> 32) & MASK32], dtype=torch.int64, device=device)


def _signed32(c: int) -> int:
    # c and c - 2**32 are the same multiplier mod 2**32; the one in (-2**31, 2**31] keeps |h * c| < 2**63 for any
    # h < 2**32, so the int64 product never overflows (undefined in C++) and its low 32 bits are exact.
    return c - 2**32 if c >= 2**31 else c


_MUL1 = _signed32(MIX_MUL1)
_MUL2 = _signed32(MIX_MUL2)


def _mix32_(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on an int64 tensor of values < 2**32, in place (one multiply per step, no temporaries beyond
    the shifted copy: measured 2.5-3.5x faster than a 16-bit split multiply on CPU, 2026-11-22)."""
    h ^= h >> 16
    h *= _MUL1
    h &= MASK32
    h ^= h >> 15
    h *= _MUL2
    h &= MASK32
    h ^= h >> 15
    return h


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """The (rows, cols) bool keep-mask for seed (2,) int64 and drop probability p."""
    device = seed.device if device is None else device
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    h = _mix32_((idx & MASK32) ^ seed[0])
    h ^= (idx >> 32) ^ seed[1]
    return _mix32_(h) >= dropout_threshold(p)


def _apply_dropout_unfused(x2d: torch.Tensor, seed: torch.Tensor, p: float, dtype: torch.dtype,
                           out_dtype: torch.dtype) -> torch.Tensor:
    x = x2d.to(dtype)
    mask = keep_mask(seed, x.shape[0], x.shape[1], p, x.device)
    return torch.where(mask, x * keep_scale(p), torch.zeros((), dtype=dtype, device=x.device)).to(out_dtype)


# Eager, keep_mask is about twenty elementwise passes over an int64 (M, K) tensor, each a read and a write of
# 8 bytes per element: on a GPU that costs far more than the matmuls it feeds (PEFT's nn.Dropout is one pass).
# Compiled by inductor, the hash, the cast and the select become one kernel that reads x once and writes the
# result once. None: not tried yet; False: compiling failed here, so the unfused form is used from then on.
_fused_dropout = None


def _compiled_dropout():
    global _fused_dropout
    if _fused_dropout is None:
        _fused_dropout = torch.compile(_apply_dropout_unfused, dynamic=True, fullgraph=True)
    return _fused_dropout


def _use_compiled(x2d: torch.Tensor) -> bool:
    return x2d.device.type == "cuda" and _fused_dropout is not False and not torch.compiler.is_compiling()


def apply_dropout(x2d: torch.Tensor, seed: torch.Tensor, p: float, dtype: Optional[torch.dtype] = None,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Inverted dropout of x2d (M, K) with the shared mask: x2d is cast to `dtype` (default: its own), kept values
    are scaled by 1/(1-p) in that dtype, and the result is cast to `out_dtype` (default: `dtype`). On CUDA this runs
    as one inductor-compiled kernel (bit-identical: integer hashing, casts and one multiply); a caller that is
    itself being compiled traces the unfused form into its own graph."""
    global _fused_dropout
    dtype = x2d.dtype if dtype is None else dtype
    out_dtype = dtype if out_dtype is None else out_dtype
    if not _use_compiled(x2d):
        return _apply_dropout_unfused(x2d, seed, p, dtype, out_dtype)
    try:
        return _compiled_dropout()(x2d, seed, p, dtype, out_dtype)
    except Exception as compile_error:  # noqa: BLE001
        out = _apply_dropout_unfused(x2d, seed, p, dtype, out_dtype)  # an error of the inputs themselves raises here
        _fused_dropout = False
        warnings.warn(f"kasa_kernels: the compiled dropout mask failed ({type(compile_error).__name__}: "
                      f"{compile_error}); using the unfused torch form, which is slower but gives the same mask")
        return out
