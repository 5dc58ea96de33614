"""Precision rules every backend shares: torch's fp32 matmul setting, the accumulation dtype, and the fp16
rebalancing of the rank-r operands (used by the torch backend and, through pybind11, by the CUDA extension's host
code in csrc/bindings.cpp, so the rule is written once)."""
from typing import Tuple

import torch


def allow_tf32() -> bool:
    """Whether fp32 matmuls may use TF32, read the way F.linear's cuBLAS call reads it."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9: reading the legacy `allow_tf32` RAISES once the new fp32_precision API was used (e.g.
    # torch.backends.fp32_precision = "tf32"), so read fp32_precision, which resolves the inheritance and reflects
    # the legacy setter too ("none" = not set = IEEE). Older torch has no fp32_precision: fall back.
    precision = getattr(matmul, "fp32_precision", None)
    if precision is not None:
        return precision == "tf32"
    return bool(matmul.allow_tf32)


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """Rank-r products and reductions accumulate in fp32 (fp64 for fp64 inputs, which gradcheck uses)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fp16_rebalance(left: torch.Tensor, right: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(left, right) of a rank-r product left (M, r) @ right (r, n), cast to fp16 after an exact rebalancing.

    fp16's range (65504) is smaller than H-sized values can be (S = H s d, or gH) while the product stays small. So
    rank-1 component j is rebalanced first: column j of left times 2^-e_j and row j of right times 2^e_j, e_j
    equalizing their largest magnitudes. Powers of two are exact in binary floating point and leave the product
    unchanged, so a cast overflows only where the product itself would. bf16 has fp32's range and needs none of it."""
    tiny = torch.finfo(torch.float32).tiny
    big_left = left.abs().amax(0).clamp_min(tiny)
    big_right = right.abs().amax(1).clamp_min(tiny)
    # log domain: the ratio itself can overflow fp32 when a factor is all zeros (B = 0 at init)
    e = torch.round(0.5 * (torch.log2(big_left) - torch.log2(big_right))).clamp(-60, 60)
    scale = torch.exp2(e)
    return (left / scale).to(torch.float16), (right * scale[:, None]).to(torch.float16)
