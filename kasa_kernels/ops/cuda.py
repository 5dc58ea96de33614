"""Loading the CUDA extension kasa_kernels._C (csrc/) and deciding whether it can run on a device.

Importing this module never fails: a missing or broken extension is remembered and reported, with how to build it,
only when the cuda backend is actually asked for (probe() says why it is unusable; ext() raises).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

BUILD_HINT = (
    "build it with `KASA_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e .` from the kasa_kernels source "
    "tree (needs a CUDA build of torch and nvcc; KASA_KERNELS_CUDA_ARCHS picks the GPU architectures, default "
    "80;86;90)"
)

try:
    from .. import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch/CUDA
    _C = None
    IMPORT_ERROR = e


def ext():
    """The extension module, or an actionable error."""
    if _C is None:
        raise RuntimeError(
            f"kasa_kernels: the cuda backend needs the CUDA extension kasa_kernels._C, which is not available "
            f"({IMPORT_ERROR}); {BUILD_HINT}. Or pick another backend: backend='torch' or 'triton'."
        )
    return _C


def compiled_archs() -> Tuple[str, ...]:
    """The sm_XY architectures the extension was built for (empty when it is not built)."""
    if _C is None:
        return ()
    return tuple(a for a in str(getattr(_C, "compiled_archs", "")).split("_") if a)


def probe(device) -> Tuple[bool, str]:
    """(usable, reason) for running the CUDA kernels on `device`."""
    device = torch.device(device)
    if _C is None:
        return False, f"the CUDA extension kasa_kernels._C is not available ({IMPORT_ERROR}); {BUILD_HINT}"
    built = ", ".join(f"sm_{a}" for a in compiled_archs()) or "unknown architectures"
    if device.type != "cuda":
        return False, f"the CUDA extension (built for {built}) runs on CUDA tensors only, not {device.type}"
    if not torch.cuda.is_available():
        return False, f"torch sees no CUDA device (the extension is built, for {built})"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    if (major, minor) < (8, 0):
        return False, (
            f"the kernels need compute capability 8.0 or newer (cp.async and bf16 tensor cores); {name} is "
            f"sm_{major}{minor}"
        )
    ok, what = _C.kernel_image_status(index)
    if not ok:
        return False, (
            f"this build of kasa_kernels._C (for {built}) has no kernel image that {name} (sm_{major}{minor}) can "
            f"run: {what}. Rebuild with KASA_KERNELS_CUDA_ARCHS=\"{major}{minor}\" and {BUILD_HINT}"
        )
    return True, f"CUDA C++ kernels (kasa_kernels._C built for {built}; {name} runs the {what})"
