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
#
# The torch backend's path depends on what the device's kernels are good at:
#   cuda              low-precision GEMMs are native, torch.mm returns fp32 sums of bf16 operands (out_dtype), and the
#                     dropout-mask kernels are compiled to Triton.
#   cpu-bf16-gemm     a CPU whose oneDNN has bf16 (and fp16) GEMM kernels (AVX-512, AMX): low-precision operands as on
#                     cuda, without out_dtype; the mask kernels compiled to C++ for large tensors.
#   cpu-no-bf16-gemm  a CPU without them (AVX2): torch's fallback bf16 GEMM is slow enough that the rank-r work runs in
#                     fp32 instead (copies of x and the output gradient, fp32 products added into the output).
#                     Measured on a 2-core AMD EPYC (AVX2, 1 thread, min of 15, 2026-12-01): at 1024 x 768 x 768, r 16,
#                     x @ A^T took 3.2 ms in bf16 against 1.1 ms for fp32 copy + product, G @ B 18.5 ms against 1.2, and
#                     adding the rank-r term into a bf16 output 53 ms by a bf16 addmm_ against 12.6 ms in fp32.
# Meta tensors have no kernels of their own. kasa_kernels.bench.traffic runs layers on them to count the bytes each
# op moves and has them take the path it names (meta_runs_as); otherwise they take the cuda path, without compiled
# kernels.
PATHS = ("cuda", "cpu-bf16-gemm", "cpu-no-bf16-gemm")


def _cpu_has(check: str) -> bool:
    fn = getattr(torch.ops.mkldnn, check, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


# read once at import: a constant for torch.compile, which then never traces the query
_CPU_LOWP_GEMM = {torch.bfloat16: _cpu_has("_is_mkldnn_bf16_supported"),
                  torch.float16: _cpu_has("_is_mkldnn_fp16_supported")}
class Setting:
    """A process-wide value that a `with setting.within(value):` block changes for its length."""

    def __init__(self, value=None):
        self.value = value

    @contextlib.contextmanager
    def within(self, value):
        before, self.value = self.value, value
        try:
            yield
        finally:
            self.value = before


_META_PATH = Setting()


def meta_runs_as(path: str):
    """Within this `with` block, meta tensors take device path `path` (one of PATHS)."""
    if path not in PATHS:
        raise ValueError(f"path: expected one of {PATHS}, got {path!r}")
    return _META_PATH.within(path)


def device_path(device: torch.device) -> str:
    """The path (PATHS) tensors on `device` take; other device types are named as they are."""
    if device.type == "meta" and _META_PATH.value is not None:
        return _META_PATH.value
    if device.type == "cpu":
        return "cpu-bf16-gemm" if _CPU_LOWP_GEMM[torch.bfloat16] else "cpu-no-bf16-gemm"
    return device.type


def device_kind(t: torch.Tensor) -> str:
    """The device type whose code path `t` takes: its own, or for a meta tensor that of the path meta_runs_as names."""
    kind = t.device.type
    if kind == "meta" and _META_PATH.value is not None:
        return _META_PATH.value.split("-")[0]
    return kind


def lowp_gemm_native(t: torch.Tensor) -> bool:
    """Whether t's device has fast GEMM kernels in t's dtype when that is bf16 or fp16 (see PATHS)."""
    if t.device.type == "cpu":
        return _CPU_LOWP_GEMM.get(t.dtype, True)
    if t.device.type == "meta" and _META_PATH.value is not None:
        return _META_PATH.value != "cpu-no-bf16-gemm"
    return True


# ----------------------------------------------------------------------------------------------------------------
# The rank-r products


def operand_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype in which the rank-r products take x (and the output gradient): x's own, so no M x K or M x N copy is
    made; the small rank-r factor is cast to it instead. Except fp16, whose range (65504) H and gH routinely exceed
    while the layer's output does not, and bf16 or fp16 where the device has no fast GEMM in them (PATHS): those are
    taken in fp32."""
    if x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not lowp_gemm_native(x)):
        return torch.float32
    return x.dtype


_HAS_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()  # torch >= 2.8: torch.mm(a, b, out_dtype=...)


def mm_sums_to_fp32(t: torch.Tensor) -> bool:
    """Whether torch.mm can return the unrounded fp32 sum of bf16 operands like `t` (out_dtype=torch.float32): on
    CUDA; CPU has no such kernel, so there a bf16 product is rounded to bf16 once (every BLAS here sums in fp32)."""
    return t.dtype == torch.bfloat16 and _HAS_MM_OUT_DTYPE and device_kind(t) == "cuda"


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`; t itself when it already is (Tensor.to costs a dispatch even then, which small layers feel)."""
    return t if t.dtype == dtype else t.to(dtype)


def rank_r_mm(left: torch.Tensor, right: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """left @ right (one side of rank r), returned in `acc` (fp32 or fp64), summed in fp32 or wider."""
    if acc == torch.float32 and mm_sums_to_fp32(left):
        return torch.mm(left, right, out_dtype=acc)
    return cast(torch.mm(left, right), acc)


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
