"""The dropout mask every backend shares: a counter-based hash of (seed, element index), never stored.

Element (m, k) of the logical (M, K) input (row-major index i = m*K + k, whatever the strides) is kept iff

    h = mix32(mix32(lo32(i) ^ s0) ^ hi32(i) ^ s1)      (all arithmetic mod 2**32)
    keep = h >= threshold(p),    threshold(p) = min(round(p * 2**32), 2**32 - 1)

with mix32 the "lowbias32" integer finalizer (xor-shift 16, multiply by MIX_MUL1, xor-shift 15, multiply by
MIX_MUL2, xor-shift 15) and (s0, s1) the two 32-bit words of the seed. P(keep) = 1 - p up to 2**-32. Each backend
implements this spec in its own language (torch here, Triton in ops/triton_common.py, CUDA in csrc/kasa_common.cuh),
with the constants defined once, in ops/rng_constants.py: Triton reads them as constexpr globals, and the C++ builds
(setup.py, CMakeLists.txt, tests/cuda_emu/build.py) pass them as -D definitions read from that file;
dropout_threshold and keep_scale are computed here and handed to the kernels as arguments. The tests hold the
backends bit-identical, so one seed gives one mask on every backend, in forward and in backward.

The seed is an int64 tensor of shape (2,) on the input's device, so drawing it needs no host sync and traces under
torch.compile.

The torch backend uses the mask through three kernels, each written once in torch below and run as ONE fused kernel
where inductor can compile it (kernel_path says where):

    masked(x, seed, p, dtype)          where(keep, x, 0) in `dtype`       read x, write the result
    add_masked_(out, t, seed, p)        out += where(keep, t, 0)            read out and t, write out
    dropout_backward_(dx, t, x, seed, p) dx += where(keep, t, 0); t = where(keep, x, 0)
                                                                            read dx, t and x, write dx and t

None of them scales by 1/(1-p): the callers fold the scale into the rank-r factor (exact in fp32 and fp64; one
rounding of A * scale in bf16, the same count as rounding A), so a masked copy of x is exact in x's dtype.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional, Set, Union

import torch

from . import cpu_mask
from .precision import Setting, device_kind
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


# ----------------------------------------------------------------------------------------------------------------
# The hash in int32 arithmetic
#
# A 32-bit word is held in an int32 tensor as its two's-complement bit pattern. Then a multiply keeps exactly the low
# 32 bits (torch's kernels, inductor's C++ and Triton all emit the 32-bit multiply, vector mullo or mul.lo); a logical
# shift right is the arithmetic shift with the sign-extended bits masked off; and the unsigned compare h >= t is the
# signed compare of h ^ 2**31 and t ^ 2**31. Half the bytes of an int64 form per eager pass, and native 32-bit lanes
# when compiled: inductor's CPU kernel of masked() ran in 6.0 ms against 10.4 ms for the int64 form it replaced
# (1024 x 768 fp32, 1 thread, 2-core AMD EPYC, 2026-12-01).


def _signed32(c: int) -> int:
    """The int32 holding the bit pattern of the 32-bit word c."""
    return c - 2**32 if c >= 2**31 else c


_MUL1 = _signed32(MIX_MUL1)
_MUL2 = _signed32(MIX_MUL2)
_SIGN = -(2**31)


def _xorshift(h: torch.Tensor, s: int) -> torch.Tensor:
    return h ^ ((h >> s) & ((1 << (32 - s)) - 1))


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """lowbias32 on 32-bit words held in an int32 tensor."""
    h = _xorshift(h, 16) * _MUL1
    h = _xorshift(h, 15) * _MUL2
    return _xorshift(h, 15)


def compare_threshold(p: float) -> int:
    """threshold(p) in the signed form _keep compares against (an int, so a compiled kernel takes it as an argument
    and one compile serves every p)."""
    return _signed32(dropout_threshold(p) ^ 2**31)


def _hash(idx: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """hash(i) of the spec for element indices i (int32 when every i < 2**31, else int64) and the seed's words s
    (int32)."""
    if idx.dtype == torch.int32:  # hi32(i) = 0
        return _mix32(_mix32(idx ^ s[0]) ^ s[1])
    return _mix32(_mix32(idx.to(torch.int32) ^ s[0]) ^ (idx >> 32).to(torch.int32) ^ s[1])


def _keep(seed: torch.Tensor, rows: int, cols: int, threshold: int, device: torch.device) -> torch.Tensor:
    """The (rows, cols) bool keep-mask; threshold from compare_threshold."""
    n = rows * cols
    idx = torch.arange(n, dtype=torch.int32 if n <= 2**31 else torch.int64, device=device)
    s = seed.to(torch.int32)  # the words are < 2**32: the cast keeps their bit patterns
    return ((_hash(idx, s) ^ _SIGN) >= threshold).view(rows, cols)


def keep_mask(seed: torch.Tensor, rows: int, cols: int, p: float, device: Optional[torch.device] = None) -> torch.Tensor:
    """The (rows, cols) bool keep-mask for seed (2,) int64 and drop probability p."""
    device = seed.device if device is None else device
    return _keep(seed.to(device), rows, cols, compare_threshold(p), device)


# ----------------------------------------------------------------------------------------------------------------
# The kernels, in torch (their eager form; inductor fuses each into one kernel)


def _zero(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=t.dtype, device=t.device)


def _masked(x2d: torch.Tensor, seed: torch.Tensor, threshold: int, dtype: torch.dtype) -> torch.Tensor:
    keep = _keep(seed, x2d.shape[0], x2d.shape[1], threshold, x2d.device)
    x = x2d.to(dtype)
    return torch.where(keep, x, _zero(x))


def _add_masked_(out: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, threshold: int) -> torch.Tensor:
    keep = _keep(seed, t.shape[0], t.shape[1], threshold, t.device)
    return out.add_(torch.where(keep, t, _zero(t)))


def _dropout_backward_(dx: torch.Tensor, t: torch.Tensor, x2d: torch.Tensor, seed: torch.Tensor, threshold: int):
    keep = _keep(seed, t.shape[0], t.shape[1], threshold, t.device)
    dx.add_(torch.where(keep, t, _zero(t)))
    t.copy_(torch.where(keep, x2d.to(t.dtype), _zero(t)))
    return dx, t


# ----------------------------------------------------------------------------------------------------------------
# Where the kernels run fused
#
# Eager, _keep is about 30 elementwise passes over an int32 (M, K) tensor: on a GPU that costs far more than the
# matmuls it feeds, and on CPU it took 69 ms at 1024 x 768 where torch.rand + compare took 8 (1 thread, 2-core AMD
# EPYC, 2026-12-01). Compiled by inductor (dynamic shapes, the threshold an argument), the hash, the casts and the
# select become one kernel per call that reads its inputs once and writes its outputs once; tests/test_traffic.py
# checks that on CPU (and on CUDA in the GPU suite) by counting the kernels inductor generates.
#
# CUDA compiles every call's kernel. A CPU runs ops/cpu_mask.c's kernels instead, at every size: the same one pass
# each, written in C and built once per machine in about a second, without the per-call cost of torch.compile's
# guards and wrappers (cpu_mask.py says how much). Where no C compiler builds them, inductor's kernel runs from
# CPU_FUSED_MIN_ELEMENTS elements up: compiling one takes 2-25 s on 2 cores, and below that size the eager form costs
# under about a millisecond a call, which a short run (a test, a toy model) never wins back. Where compiling fails
# (no C++ compiler, no Triton) the kernels warn once and run eagerly from then on, giving the same mask. A caller
# that is itself being compiled, or that runs under a TorchDispatchMode (which neither torch.compile nor a raw data
# pointer can serve), traces or runs the eager form.

CPU_FUSED_MIN_ELEMENTS = 2**16

_EAGER: Dict[str, Callable] = {"masked": _masked, "add_masked_": _add_masked_,
                               "dropout_backward_": _dropout_backward_}
_compiled: Dict[str, Callable] = {}  # name -> its compiled kernel
_failed: Set[str] = set()  # device types where compiling a kernel failed: eager from then on

# A runner sees every kernel launch on a fused path instead: runner(name, eager form, args) -> what the kernel
# returns. kasa_kernels.bench installs one to count each kernel's bytes on meta tensors (bench/traffic.py), and one
# to run the compiled kernels outside its CPU memory-tracking dispatch mode (bench/timing.py).
_RUNNER = Setting()


def kernels_run_by(runner: Callable):
    """Within this `with` block, every mask kernel on a fused path is launched as runner(name, eager form, args)."""
    return _RUNNER.within(runner)


def kernel_path(t: torch.Tensor) -> str:
    """'fused' where a mask kernel on `t` (its largest operand) runs as one compiled kernel, else 'eager'."""
    if torch.compiler.is_compiling():  # first: dynamo must not trace into cpu_mask.available()'s build
        return "eager"
    kind = device_kind(t)
    fused = kind == "cuda" or (kind == "cpu" and (t.numel() >= CPU_FUSED_MIN_ELEMENTS or cpu_mask.available()))
    if not fused:
        return "eager"
    if _RUNNER.value is not None:
        return "fused"
    if t.device.type == "meta" or t.device.type in _failed or torch._C._len_torch_dispatch_stack() > 0:
        return "eager"
    return "fused"


def run_fused(name: str, args) -> object:
    """Kernel `name` as one fused kernel: ops/cpu_mask.c's on CPU tensors where it is built, else inductor-compiled
    (compiled on first use); its eager form if compiling fails."""
    if args[0].device.type == "cpu" and cpu_mask.available():
        out = cpu_mask.KERNELS[name](*args)
        if out is not None:
            return out
    fn = _compiled.get(name)
    if fn is None:
        fn = _compiled[name] = torch.compile(_EAGER[name], dynamic=True, fullgraph=True)
    try:
        return fn(*args)
    except Exception as compile_error:  # noqa: BLE001
        device = args[0].device.type
        out = _EAGER[name](*args)  # an error of the inputs themselves raises here
        _failed.add(device)
        warnings.warn(f"kasa_kernels: compiling the dropout-mask kernel {name} on {device} failed "
                      f"({type(compile_error).__name__}: {compile_error}); using its eager torch form from now on, "
                      "which is slower but gives the same mask")
        return out


def _launch(name: str, largest: torch.Tensor, *args):
    if kernel_path(largest) == "eager":
        return _EAGER[name](*args)
    if _RUNNER.value is not None:
        return _RUNNER.value(name, _EAGER[name], args)
    return run_fused(name, args)


def masked(x2d: torch.Tensor, seed: torch.Tensor, p: float, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """where(keep, x2d, 0) for x2d (M, K), cast to `dtype` (default x2d's): exact, no 1/(1-p) scale."""
    return _launch("masked", x2d, x2d, seed, compare_threshold(p), x2d.dtype if dtype is None else dtype)


def add_masked_(out: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, p: float) -> torch.Tensor:
    """out += where(keep, t, 0) in place, for (M, K) tensors, summed in the wider of their dtypes; returns out."""
    return _launch("add_masked_", t, out, t, seed, compare_threshold(p))


def dropout_backward_(dx: torch.Tensor, t: torch.Tensor, x2d: torch.Tensor, seed: torch.Tensor, p: float):
    """dx += where(keep, t, 0), then t = where(keep, x2d, 0) in t's dtype, both in place (one mask for the two): the
    dropout mask of dx's rank-r term and the masked input of dA in one pass. Returns (dx, t)."""
    return _launch("dropout_backward_", t, dx, t, x2d, seed, compare_threshold(p))
