"""The torch backend's C kernels on CPU tensors, called through ctypes: the dropout-mask kernels (ops/cpu_mask.c),
the rank-r pass over the output gradient (ops/cpu_rank.c, dy_grads below) and the fp32 GEMM with the rank-r term
as extra k-steps (ops/cpu_gemm.c, gemm below), built into one library.

ops/rng.py runs its three mask kernels as one fused pass each. On CUDA inductor compiles them; on CPU its compiled
kernel is fast, but each call also goes through torch.compile's guards and wrappers: masked() of a 256 x 256 fp32
tensor took 130 us a call inductor-compiled and 52-60 us as this C kernel (the eager form 650-890 us; 1 thread,
2-core AMD EPYC, 2026-12-01), about what a small layer's whole rank-r path costs. So on CPU the kernels are this C
file instead: compiled once per machine with the system's C compiler (`cc -O3 -march=native`, OpenMP where
available; about a second), cached under $KASA_KERNELS_CACHE (default ~/.cache/kasa_kernels; the temp directory
where that cannot be written), and called with the tensors' pointers and strides. Written tensors must be
contiguous; read ones may have any strides.

If no C compiler works, the build fails once with a warning and rng.py keeps its torch forms (inductor-compiled
for large tensors, eager below), torch_linear.py its GEMMs. Unsupported inputs return None, and the caller runs
the torch form.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

from .rng_constants import MASK32, cxx_defines

SOURCES = tuple(Path(__file__).with_name(f) for f in ("cpu_mask.c", "cpu_rank.c", "cpu_gemm.c"))
CACHE_ENV = "KASA_KERNELS_CACHE"
_CODES = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
# (x's dtype, the operand dtype): the pairs cpu_mask.c instantiates, the ones the torch backend uses
PAIRS = frozenset({("f32", "f32"), ("f64", "f64"), ("bf16", "bf16"), ("bf16", "f32"), ("f16", "f32")})
# and dropout_backward_ with dx and t in fp32 beside an x in these (a 16-bit layer on a CPU without 16-bit GEMMs)
WIDE = ("bf16", "f16")

_P, _I64, _U32, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int
_SIGNATURES = {
    "masked": (_P, _P, _I64, _I64, _I64, _I64, _U32, _U32, _U32, _INT),
    "add_masked": (_P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _U32, _U32, _U32, _INT),
    "dropout_bwd": (_P, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _I64, _I64, _U32, _U32, _U32, _INT),
}

_lock = threading.Lock()
_lib: Optional[dict] = None  # (kernel, dtype codes of its tensors) -> ctypes function, once built
_error: Optional[str] = None  # why the build failed, once it did


def _cpuinfo(*keys) -> list:
    """The first /proc/cpuinfo line that starts with each of `keys` (a prefix, or a tuple of prefixes), whole; ""
    for a key no line has, and for every key where there is no /proc/cpuinfo."""
    found = [""] * len(keys)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                for i, key in enumerate(keys):
                    if not found[i] and line.startswith(key):
                        found[i] = line
                if all(found):
                    break
    except OSError:
        pass
    return found


def _cpu_signature() -> str:
    """What -march=native depends on: the machine and its CPU's model and flags."""
    model, flags = _cpuinfo("model name", ("flags", "Features"))
    return platform.machine() + model + flags


def _cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "kasa_kernels")
    return Path(root)


def _compile(out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
    base = [cc, "-O3", "-march=native", "-fPIC", "-shared", *cxx_defines(), *(str(p) for p in SOURCES)]
    errors = []
    for extra in (["-fopenmp"], []):  # OpenMP when the compiler has it, else one thread
        tmp = out.with_name(f"{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            proc = subprocess.run(base + extra + ["-o", str(tmp)], capture_output=True, text=True, timeout=300)
        except OSError as e:  # the compiler itself would not start
            raise RuntimeError(f"{cc} could not run: {e}") from e
        if proc.returncode == 0:
            os.replace(tmp, out)  # atomic: a concurrent process loads either nothing or a whole library
            return
        errors.append(proc.stderr.strip()[-2000:])
    raise RuntimeError(f"{cc} failed: {errors[-1]}")


def _spec_hash(i: int, s0: int, s1: int) -> int:
    """ops/rng.py's hash in Python integers, to check the loaded library against."""
    from .rng_constants import MIX_MUL1, MIX_MUL2

    def mix(h):
        h = ((h ^ (h >> 16)) * MIX_MUL1) & MASK32
        h = ((h ^ (h >> 15)) * MIX_MUL2) & MASK32
        return h ^ (h >> 15)

    return mix(mix((i & MASK32) ^ s0) ^ (i >> 32) ^ s1)


def _build() -> dict:
    source = b"".join(p.read_bytes() for p in SOURCES)
    key = hashlib.sha256(source + " ".join(cxx_defines()).encode() + _cpu_signature().encode()).hexdigest()[:16]
    path = _cache_dir() / f"cpu_mask-{key}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            writable = os.access(path.parent, os.W_OK)
        except OSError:
            writable = False
        if not writable:  # a read-only or missing home: this user's directory under the system's temp directory
            path = Path(tempfile.gettempdir()) / f"kasa_kernels-{os.getuid()}" / path.name
            path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _compile(path)
    lib = ctypes.CDLL(str(path))
    check = lib.kasa_mask_hash
    check.argtypes, check.restype = (ctypes.c_uint64, _U32, _U32), _U32
    for i, s0, s1 in ((0, 0, 0), (12345, 0xDEADBEEF, 7), (2**40 + 99, 3, 0xFFFFFFFF)):
        if check(i, s0, s1) != _spec_hash(i, s0, s1):
            raise RuntimeError(f"{path} computes another hash than ops/rng.py's spec (a stale build?)")
    fns = {}
    for kernel, argtypes in _SIGNATURES.items():
        names = {(x, d): f"{x}_{d}" for x, d in PAIRS}
        if kernel == "dropout_bwd":  # dx in fp32 beside a 16-bit x: keyed by (dx's code, t's code, x's code)
            names = {(x, d, x): n for (x, d), n in names.items()}
            names.update({("f32", "f32", x): f"wide_{x}" for x in WIDE})
        for key, name in names.items():
            fn = getattr(lib, f"kasa_{kernel}_{name}")
            fn.argtypes, fn.restype = argtypes, None
            fns[(kernel,) + key] = fn
    fn = lib.kasa_dy_grads_f32
    fn.argtypes, fn.restype = (_P, _I64, _I64, _I64, _P, _P, _P, _I64, ctypes.c_float, _P, _P, _P, _P, _INT), _INT
    fns[("dy_grads", "f32")] = fn
    if lib.kasa_gemm_f32_available():
        fn = lib.kasa_gemm_f32
        fn.argtypes = (_I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _I64, _P, _I64, _P, _I64, _I64, _P, _I64, _I64,
                       ctypes.c_float, _P, _I64, _INT)
        fn.restype = _INT
        fns[("gemm", "f32")] = fn
    return fns


def available() -> bool:
    """Whether the C kernels are built and loaded (building them on first call)."""
    global _lib, _error
    if _lib is not None:
        return True
    if _error is not None:
        return False
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as e:  # noqa: BLE001  (no compiler, a read-only cache, a failed check: torch forms)
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(f"kasa_kernels: building the CPU kernels (ops/cpu_mask.c, cpu_rank.c, cpu_gemm.c) "
                              f"failed ({_error}); using their torch forms, which give the same mask and products "
                              "more slowly")
    return _lib is not None


def build_error() -> Optional[str]:
    """Why the C kernels did not build (None when they did, or before the first available())."""
    return _error


def _words(seed: torch.Tensor, threshold: int):
    s0, s1 = seed.tolist()
    # threshold is rng.compare_threshold's signed form: back to the unsigned threshold the spec compares with
    return s0 & MASK32, s1 & MASK32, (threshold & MASK32) ^ 2**31


def _fn(kernel: str, *dtypes: torch.dtype):
    return _lib.get((kernel,) + tuple(_CODES.get(t) for t in dtypes)) if _lib is not None else None


def _usable(seed, *tensors) -> bool:
    return (isinstance(seed, torch.Tensor) and seed.shape == (2,) and seed.device.type == "cpu"
            and all(t.device.type == "cpu" and t.dim() == 2 for t in tensors))


def _apart(written, *others) -> bool:
    """Whether no written tensor shares storage with another one: the C loops take their pointers as restrict (and a
    written tensor read elsewhere in the same pass would be read half-updated). The torch backend's buffers always
    are apart; anything else goes to the torch form."""
    mine = [t.untyped_storage().data_ptr() for t in written]
    return len(set(mine)) == len(mine) and not set(mine) & {t.untyped_storage().data_ptr() for t in others}


def _bump(*written: torch.Tensor) -> None:
    # written through a raw pointer: tell autograd, as an in-place op would, so a tensor saved for backward and
    # changed here is caught
    for t in written:
        torch.autograd.graph.increment_version(t)


def masked(x2d: torch.Tensor, seed: torch.Tensor, threshold: int, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """rng._masked in one C pass; None where this module has no kernel for the inputs."""
    fn = _fn("masked", x2d.dtype, dtype)
    if fn is None or not _usable(seed, x2d):
        return None
    rows, cols = x2d.shape
    out = torch.empty((rows, cols), dtype=dtype)
    fn(out.data_ptr(), x2d.data_ptr(), rows, cols, *x2d.stride(), *_words(seed, threshold), torch.get_num_threads())
    return out


def add_masked_(out: torch.Tensor, t: torch.Tensor, seed: torch.Tensor, threshold: int) -> Optional[torch.Tensor]:
    """rng._add_masked_ in one C pass; None where this module has no kernel for the inputs."""
    fn = _fn("add_masked", out.dtype, t.dtype)
    if (fn is None or not _usable(seed, out, t) or out.shape != t.shape or not out.is_contiguous()
            or not _apart((out,), t)):
        return None
    rows, cols = t.shape
    fn(out.data_ptr(), *out.stride(), t.data_ptr(), *t.stride(), rows, cols, *_words(seed, threshold),
       torch.get_num_threads())
    _bump(out)
    return out


def dropout_backward_(dx: torch.Tensor, t: torch.Tensor, x2d: torch.Tensor, seed: torch.Tensor, threshold: int):
    """rng._dropout_backward_ in one C pass; None where this module has no kernel for the inputs."""
    fn = _fn("dropout_bwd", dx.dtype, t.dtype, x2d.dtype)
    if (fn is None or not _usable(seed, dx, t, x2d) or not dx.shape == t.shape == x2d.shape
            or not (dx.is_contiguous() and t.is_contiguous()) or not _apart((dx, t), x2d)):
        return None
    rows, cols = t.shape
    fn(dx.data_ptr(), *dx.stride(), t.data_ptr(), *t.stride(), x2d.data_ptr(), *x2d.stride(), rows, cols,
       *_words(seed, threshold), torch.get_num_threads())
    _bump(dx, t)
    return dx, t


KERNELS = {"masked": masked, "add_masked_": add_masked_, "dropout_backward_": dropout_backward_}


# rank-r widths ops/cpu_rank.c is instantiated for
DY_RANKS = (4, 8, 16, 32)
# rows of G per thread below which another thread is not worth starting
DY_ROWS_PER_THREAD = 64
# G's size below which the torch form runs instead: there the call's own cost (Python, three allocations, ctypes)
# matches what it saves. Whole fp32 layer steps (forward + backward, r = 16, 1 thread, caches flushed, pass on against
# off in a random order; 2-core AMD EPYC, 2026-12-02): 0.966 against 0.994 of unsloth_style's time at 256^2, level
# (631 against 637 us) at 128^2, level at 64^2 and 32^2.
DY_MIN_ELEMENTS = 1 << 14


def dy_grads(g: torch.Tensor, lora_B: torch.Tensor, lora_diag: torch.Tensor, h: torch.Tensor, scaling: float):
    """(gH, dB, dd) = (s (G B) diag(d), s G^T (H diag(d)), s colsum((G B) * H)) for fp32 G (M, N), B (N, r), d (r,),
    H (M, r), from one read of G (ops/cpu_rank.c); None where it does not run: under torch.compile or a dispatch
    mode (the traffic counter, fake tensors), off the CPU, for another dtype or rank, a G smaller than
    DY_MIN_ELEMENTS or whose rows are not contiguous, or when the library did not build."""
    if torch.compiler.is_compiling():  # first: dynamo must not trace into the build or the ctypes call
        return None
    f32 = torch.float32
    if not (g.is_cpu and g.dtype == f32 and g.numel() >= DY_MIN_ELEMENTS and lora_B.dtype == f32
            and lora_diag.dtype == f32 and h.dtype == f32 and g.dim() == 2
            and torch._C._len_torch_dispatch_stack() == 0 and available()):
        return None
    rows, cols = g.shape
    r = h.shape[-1]
    if (r not in DY_RANKS or g.stride(1) != 1 or lora_B.shape != (cols, r) or h.shape != (rows, r)
            or lora_diag.shape != (r,) or not (lora_B.is_cpu and lora_diag.is_cpu and h.is_cpu)
            or not (lora_B.is_contiguous() and lora_diag.is_contiguous() and h.is_contiguous())):
        return None
    threads = max(1, min(torch.get_num_threads(), rows // DY_ROWS_PER_THREAD))
    gh = torch.empty((rows, r), dtype=f32)
    db = torch.empty((cols, r), dtype=f32)
    dd = torch.empty((r,), dtype=f32)
    scratch = torch.empty(((threads - 1) * (cols + 1) * r,), dtype=f32) if threads > 1 else None
    _lib[("dy_grads", "f32")](g.data_ptr(), rows, cols, g.stride(0), lora_B.data_ptr(), lora_diag.data_ptr(),
                              h.data_ptr(), r, scaling, gh.data_ptr(), db.data_ptr(), dd.data_ptr(),
                              None if scratch is None else scratch.data_ptr(), threads)
    return gh, db, dd


# ops/cpu_gemm.c: the fp32 GEMM with the rank-r term as extra k-steps
GEMM_ENV = "KASA_KERNELS_CPU_GEMM"
# the widest rank-r term cpu_gemm.c packs (GM_MAX_R)
GEMM_MAX_RANK = 64
# M * N * K below which torch's GEMM runs instead: at 64^3 and 128^3 MKL's small-matrix path beats packing (and
# this call's Python and ctypes, about 12 us); at 256^3 the two are level warm and this is 8-12 % faster with the
# caches flushed (whole fp32 layer steps at 256^3, 1 thread, flushed, paired with it off: level at p = 0, 4 % faster
# at p = 0.1; 2-core AMD EPYC, 2026-12-02)
GEMM_MIN_MACS = 1 << 24
# torch threads above which torch's GEMM runs unless $KASA_KERNELS_CPU_GEMM=1: 1 and 2 threads are what was
# measured (a 2-core machine); with many threads MKL splits the product in two dimensions, this kernel in one
GEMM_MAX_THREADS = 2
_gemm_preferred: Optional[bool] = None
_gemm_forced = False


def gemm_preferred() -> bool:
    """Whether the torch backend's fp32 GEMMs on CPU run ops/cpu_gemm.c rather than torch's (MKL's) GEMM.

    $KASA_KERNELS_CPU_GEMM=1 or 0 says so; unset, it is the CPUs where it was measured faster: AMD x86 CPUs with AVX2
    and FMA (measured on a Zen 3 EPYC; MKL runs its AVX2 path there), at up to GEMM_MAX_THREADS torch threads
    (gemm_wanted checks those per call). On Intel CPUs MKL has AVX-512 and AMX paths that an AVX2 kernel does not
    reach, and elsewhere the kernel is not built."""
    global _gemm_preferred, _gemm_forced
    if _gemm_preferred is None:
        env = os.environ.get(GEMM_ENV, "").strip()
        if env in ("0", "1"):
            _gemm_preferred = _gemm_forced = env == "1"
        elif env:
            raise ValueError(f"${GEMM_ENV} must be 0 or 1, got {env!r}")
        else:
            vendor, flags = (line.partition(":")[2] for line in _cpuinfo("vendor_id", "flags"))
            _gemm_preferred = vendor.strip() == "AuthenticAMD" and {"avx2", "fma"} <= set(flags.split())
    return _gemm_preferred


def gemm_description() -> str:
    """Which fp32 GEMM the torch backend runs on this CPU, from what size, at how many threads, and how to change
    it (for `python -m kasa_kernels` and kasa-bench's results files). Builds the library if it is not yet built."""
    env = f"${GEMM_ENV}"
    if not available():
        return f"torch's (the CPU kernels did not build: {build_error()})"
    if ("gemm", "f32") not in _lib:
        return "torch's (ops/cpu_gemm.c needs AVX2 and FMA)"
    if not gemm_preferred():
        return f"torch's (ops/cpu_gemm.c is built but not preferred on this CPU; {env}=1 turns it on)"
    size = f"ops/cpu_gemm.c from 2^{GEMM_MIN_MACS.bit_length() - 1} multiply-adds"
    if _gemm_forced:
        return f"{size} ({env}=1)"
    return f"{size}, at up to {GEMM_MAX_THREADS} torch threads (this CPU; {env}=0 turns it off)"


def gemm_wanted(x: torch.Tensor, rows: int, cols: int, depth: int) -> bool:
    """Whether the torch backend runs its fp32 GEMM (rows x depth by depth x cols) as gemm(): on a CPU that prefers
    it (gemm_preferred) at up to GEMM_MAX_THREADS threads (any number where the environment asks for it), eagerly,
    large enough, with the library built."""
    return (x.is_cpu and rows * cols * depth >= GEMM_MIN_MACS and not torch.compiler.is_compiling()
            and gemm_preferred() and (_gemm_forced or torch.get_num_threads() <= GEMM_MAX_THREADS)
            and available() and ("gemm", "f32") in _lib)


def gemm(a: torch.Tensor, b: torch.Tensor, bias: Optional[torch.Tensor] = None, left: Optional[torch.Tensor] = None,
         right: Optional[torch.Tensor] = None, alpha: float = 1.0) -> Optional[torch.Tensor]:
    """a @ b (+ bias) (+ alpha * left @ right) for fp32 CPU tensors a (M, K), b (K, N), bias (N,), left (M, r), right
    (r, N), any strides, as one packed GEMM with the rank-r term as r more k-steps (ops/cpu_gemm.c). Returns a new
    contiguous (M, N) tensor, or None where it does not run: under torch.compile or a dispatch mode, off the CPU,
    another dtype, empty or mismatched shapes, r over GEMM_MAX_RANK, or no library (not built, or a CPU without AVX2
    and FMA)."""
    if torch.compiler.is_compiling():  # first: dynamo must not trace into the build or the ctypes call
        return None
    if not available() or torch._C._len_torch_dispatch_stack() != 0:
        return None
    fn = _lib.get(("gemm", "f32"))
    ext = left is not None
    tensors = (a, b) + ((bias,) if bias is not None else ()) + ((left, right) if ext else ())
    if fn is None or (right is not None) != ext or not all(
            t.is_cpu and t.dtype == torch.float32 for t in tensors):
        return None
    if a.dim() != 2 or b.dim() != 2:
        return None
    (rows, depth), cols = a.shape, b.shape[1]
    r = left.shape[-1] if ext else 0
    if (rows == 0 or cols == 0 or depth == 0 or b.shape[0] != depth
            or (bias is not None and (bias.shape != (cols,) or not bias.is_contiguous()))
            or (ext and (left.dim() != 2 or right.dim() != 2 or left.shape[0] != rows or right.shape != (r, cols)
                         or not 0 < r <= GEMM_MAX_RANK))):
        return None
    out = torch.empty((rows, cols), dtype=torch.float32)
    rc = fn(rows, cols, depth, a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(),
            None if bias is None else bias.data_ptr(), r, left.data_ptr() if ext else None,
            *(left.stride() if ext else (0, 0)), right.data_ptr() if ext else None,
            *(right.stride() if ext else (0, 0)), alpha, out.data_ptr(), cols, torch.get_num_threads())
    if rc == -2:
        raise MemoryError(f"ops/cpu_gemm.c could not allocate its packing buffers for a {rows} x {depth} x {cols} "
                          "GEMM")
    if rc != 0:  # arguments the checks above let through: a bug here, not the caller's
        raise RuntimeError(f"ops/cpu_gemm.c refused a {rows} x {depth} x {cols} GEMM (rank {r}): return code {rc}")
    return out
