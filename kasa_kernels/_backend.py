"""Backend registry and selection: auto | cuda | triton | torch (environment variable KASA_KERNELS_BACKEND).

A backend is a pair of modules in kasa_kernels.ops: `<name>_linear` (linear_forward, linear_backward) and
`<name>_reg` (regularizer), all with the signatures of ops/torch_linear.py and ops/torch_reg.py. Whether a backend
can run is decided per device and explained in words; a backend that cannot run is never picked silently, and asking
for it by name raises BackendUnavailableError naming the ones that can.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Dict, Optional, Tuple

import torch

NAMES = ("cuda", "triton", "torch")
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


_LOADED: Dict[str, tuple] = {}


def _import_ops(name: str):
    # A plain dict hit after the first call, so torch.compile traces the lookup without a graph break.
    ops = _LOADED.get(name)
    if ops is None:
        ops = (
            importlib.import_module(f"kasa_kernels.ops.{name}_linear"),
            importlib.import_module(f"kasa_kernels.ops.{name}_reg"),
        )
        _LOADED[name] = ops
    return ops


def _probe(name: str, device: torch.device) -> Tuple[bool, str]:
    if name == "torch":
        return True, "pure PyTorch; runs on every device"
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return False, f"triton is not importable ({e}); pip install triton"
        if device.type == "cpu" and not _triton_interpreting():
            return False, "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)"
        if device.type not in ("cpu", "cuda"):
            return False, f"Triton kernels do not run on {device.type} tensors"
        try:
            _import_ops("triton")
        except ModuleNotFoundError as e:
            return False, f"this build of kasa_kernels has no Triton kernels ({e.name})"
        return True, "Triton fused kernels" + (" under the CPU interpreter" if device.type == "cpu" else "")
    if name == "cuda":
        if device.type != "cuda":
            return False, f"the CUDA extension runs on CUDA tensors only, not {device.type}"
        try:
            _import_ops("cuda")
        except ModuleNotFoundError as e:
            return False, f"this build of kasa_kernels has no CUDA backend ({e.name})"
        from .ops import cuda_linear

        return cuda_linear.probe(device)
    raise ValueError(f"backend: expected one of {('auto',) + NAMES}, got {name!r}")


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
    """The backend name to run on `device`, for a requested name ('auto' reads KASA_KERNELS_BACKEND first)."""
    check_name(requested)
    return _resolve(requested, device.type, device.index)


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
    _import_ops(name)
    _RESOLVED[key] = name
    return name


def linear_ops(name: str):
    return _import_ops(name)[0]


def reg_ops(name: str):
    return _import_ops(name)[1]


def clear_cache() -> None:
    """Forget resolved choices (after changing KASA_KERNELS_BACKEND or TRITON_INTERPRET at run time)."""
    _RESOLVED.clear()
