"""Backend registry and selection: auto | cuda | triton | torch (environment variable KASA_KERNELS_BACKEND).

BACKENDS is the one place that names the backends. A backend is a set of modules in kasa_kernels.ops that register
its kernels for the fused ops of ops/defs.py when imported, and a probe that says whether it can run on a device, in
words. A backend that cannot run is never picked silently, and asking for it by name raises BackendUnavailableError
naming the ones that can.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Callable, Dict, Optional, Tuple

import torch

ENV_VAR = "KASA_KERNELS_BACKEND"

# `auto` on a CUDA device picks, per compute capability, the first backend of this list that can run there. An
# entry is added only with a committed benchmark result (benchmarks/results/) showing that backend faster than the
# ones after it on that architecture; until then `auto` stays on the torch backend. tools/auto_preference.py derives
# (and with --write rewrites) this table from those results files.
AUTO_PREFERENCE: Dict[Tuple[int, int], Tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run for these tensors; the message says why and what can."""


@dataclasses.dataclass(frozen=True)
class BackendInfo:
    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {'usable' if self.available else 'not usable'} ({self.reason})"


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _probe_torch(device: torch.device) -> Tuple[bool, str]:
    return True, "pure PyTorch; runs on every device"


def _probe_triton(device: torch.device) -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not importable ({e}); pip install triton"
    if device.type == "cpu" and not _triton_interpreting():
        return False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)"
    if device.type not in ("cpu", "cuda"):
        return False, f"Triton kernels do not run on {device.type} tensors"
    try:
        load("triton")
    except ModuleNotFoundError as e:
        return False, f"this build of kasa_kernels has no Triton kernels ({e.name})"
    return True, "Triton fused kernels" + (" under the CPU interpreter" if device.type == "cpu" else "")


def _probe_cuda(device: torch.device) -> Tuple[bool, str]:
    if device.type != "cuda":
        return False, f"the CUDA extension runs on CUDA tensors only, not {device.type}"
    from .ops import cuda

    return cuda.probe(device)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    modules: Tuple[str, ...]  # kasa_kernels.ops modules that register this backend's kernels when imported
    probe: Callable[[torch.device], Tuple[bool, str]]  # (usable on this device, why or why not)


# In order of preference where nothing else decides (backends(), error messages).
BACKENDS: Dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cuda", ("cuda_linear", "cuda_reg"), _probe_cuda),
        Backend("triton", ("triton_linear", "triton_reg"), _probe_triton),
        Backend("torch", ("torch_linear", "torch_reg"), _probe_torch),
    )
}
NAMES = tuple(BACKENDS)

_LOADED: Dict[str, bool] = {}


def load(name: str) -> None:
    """Import a backend's modules, which registers its kernels with ops/defs.py (once; a plain dict hit after that,
    so torch.compile traces the call without a graph break)."""
    if not _LOADED.get(name):
        for module in BACKENDS[name].modules:
            importlib.import_module(f"kasa_kernels.ops.{module}")
        _LOADED[name] = True


def _probe(name: str, device: torch.device) -> Tuple[bool, str]:
    backend = BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"backend: expected one of {('auto',) + NAMES}, got {name!r}")
    return backend.probe(device)


def backends(device: Optional[torch.device | str] = None) -> Dict[str, BackendInfo]:
    """Which backends can run on `device` (default: the current CUDA device if there is one, else CPU), and why not
    the others."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    out = {}
    for name in NAMES:
        ok, why = _probe(name, device)
        out[name] = BackendInfo(name, ok, why)
    return out


_RESOLVED: Dict[Tuple[str, str, Optional[int]], str] = {}


def check_name(requested) -> None:
    """Refuse a backend name that can never be valid (whether it can run is decided per device, at call time)."""
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a string, got {type(requested).__name__}")
    if requested != "auto" and requested not in NAMES:
        raise ValueError(f"backend: expected one of {('auto',) + NAMES}, got {requested!r}")


def resolve(requested: str, device: torch.device) -> str:
    """The backend name to run on `device`, for a requested name ('auto' reads KASA_KERNELS_BACKEND first).

    Eager calls remember the answer per (requested name, device) until clear_cache(): after the first call a layer's
    resolution is one lookup (a small layer's call on a CPU is mostly Python, and each step shows)."""
    if type(requested) is str and not torch.compiler.is_compiling():  # (torch.compile traces _resolve, a constant)
        hit = _BY_DEVICE.get((requested, device))
        if hit is not None:
            return hit
        check_name(requested)
        name = _BY_DEVICE[(requested, device)] = _resolve(requested, device.type, device.index)
        return name
    check_name(requested)
    return _resolve(requested, device.type, device.index)


_BY_DEVICE: Dict[Tuple[str, torch.device], str] = {}


# torch.compile calls this once while tracing and treats the answer as a constant: no graph break for the probing,
# the imports or the environment read inside.
@torch.compiler.assume_constant_result
def _resolve(requested: str, device_type: str, device_index: Optional[int]) -> str:
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "auto") or "auto"
        if requested != "auto" and requested not in NAMES:
            raise ValueError(f"{ENV_VAR}: expected one of {('auto',) + NAMES}, got {requested!r}")
    key = (requested, device_type, device_index)
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    device = torch.device(device_type, device_index)
    if requested == "auto":
        name = "torch"
        if device.type == "cuda":
            cap = torch.cuda.get_device_capability(device)
            for cand in AUTO_PREFERENCE.get(cap, ()):
                if _probe(cand, device)[0]:
                    name = cand
                    break
    elif requested in NAMES:
        ok, why = _probe(requested, device)
        if not ok:
            usable = [n for n in NAMES if _probe(n, device)[0]]
            raise BackendUnavailableError(
                f"backend {requested!r} cannot run on {device.type} tensors: {why}. "
                f"Usable here: {', '.join(usable)}. Pass backend='auto' or one of those "
                f"(or set {ENV_VAR})."
            )
        name = requested
    else:
        raise ValueError(f"backend: expected one of {('auto',) + NAMES}, got {requested!r}")
    load(name)
    _RESOLVED[key] = name
    return name


def clear_cache() -> None:
    """Forget resolved choices (after changing KASA_KERNELS_BACKEND or TRITON_INTERPRET at run time)."""
    _RESOLVED.clear()
    _BY_DEVICE.clear()
