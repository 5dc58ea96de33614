"""Precision rules every backend shares: torch's fp32 matmul setting, the accumulation dtype, the dtype of the
rank-r products' operands, and the fp16 rebalancing of rank-r operands (used by the torch backend and, through
pybind11, by the CUDA extension's host code in csrc/bindings.cpp, so the rule is written once). Also which code path
a device takes (device_kind), which the benchmark's traffic counter sets for meta tensors."""
import contextlib
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


# ----------------------------------------------------------------------------------------------------------------
# Which path a device takes

# Meta tensors have no kernels of their own. kasa_kernels.bench.traffic runs layers on them to count the bytes each
# op moves, and has them take the code path of the device it names (meta_runs_as); otherwise they take the plain
# eager path.
_meta_kind = "meta"


@contextlib.contextmanager
def meta_runs_as(device_type: str):
    """Within this block, code that picks a path by device_kind treats meta tensors as `device_type` tensors."""
    global _meta_kind
    before, _meta_kind = _meta_kind, device_type
    try:
        yield
    finally:
        _meta_kind = before


def device_kind(t: torch.Tensor) -> str:
    """The device type whose code path `t` takes: its own, or for a meta tensor the one meta_runs_as names."""
    kind = t.device.type
    return _meta_kind if kind == "meta" else kind


# ----------------------------------------------------------------------------------------------------------------
# The rank-r products


def operand_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype in which the rank-r products take x (and the output gradient): x's own, so no M x K or M x N copy is
    made; the small rank-r factor is cast to it instead. Except fp16: H and gH routinely exceed its range (65504) while
    the layer's output does not, so fp16 operands are taken in fp32."""
    return torch.float32 if x.dtype == torch.float16 else x.dtype


_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch >= 2.8: torch.mm(a, b, out_dtype=...)


def mm_sums_to_fp32(t: torch.Tensor) -> bool:
    """Whether torch.mm can return the unrounded fp32 sum of bf16 operands like `t` (out_dtype=torch.float32): on
    CUDA; CPU has no such kernel, so there a bf16 product is rounded to bf16 once (every BLAS here sums in fp32)."""
    return t.dtype == torch.bfloat16 and _HAS_MM_OUT_DTYPE and device_kind(t) == "cuda"


def rank_r_mm(left: torch.Tensor, right: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """left @ right (one side of rank r), returned in `acc` (fp32 or fp64), summed in fp32 or wider."""
    if acc == torch.float32 and mm_sums_to_fp32(left):
        return torch.mm(left, right, out_dtype=acc)
    return torch.mm(left, right).to(acc)


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
