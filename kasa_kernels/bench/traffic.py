"""`kasa-bench traffic`: the bytes every aten op of one forward + backward reads and writes, per provider, counted on
meta tensors: no compute, seconds at any shape, on any machine.

Counting rule, per op call: each tensor argument is read once and each tensor result written once, in bytes of the
elements it spans (a broadcast operand counts its distinct elements). Views, allocations and metadata ops move
nothing. An in-place op reads and writes its target; copy_, fill_ and out= targets are only written; addmm-type ops
with beta = 0 do not read their input. This is the traffic of a kernel that streams each operand once: what the
ops ask for, not what caches save them (on a GPU at shape P every operand is far larger than L2).

Units: one activation pass is M x K elements of x's dtype (x's bytes). At P in bf16 a frozen linear layer moves 5.0
(forward: read x, read W = 0.5, write y; backward: read G, read W, write dx).

Paths: a provider's ops depend on the device it runs on, and meta tensors take the path of the device named by
`path` (precision.meta_runs_as). The torch backend's dropout-mask kernels (ops/rng.py) run as one kernel each: on
CUDA inductor-compiled, on CPU ops/cpu_mask.c's (or, where no C compiler builds those, inductor's for large tensors);
the counter launches their eager form with counting off and counts the kernel by construction: every tensor it is
given read once, every tensor it returns written once (cpu_mask.c's loops do exactly that; inductor generates one
kernel for each, which tests/test_traffic.py checks on CPU, and the GPU suite on CUDA). Where a device runs them
eagerly (small CPU tensors without a C compiler), their eager ops are counted one by one.
On CPU the torch backend's backward also takes gH, dB and dd from one C pass over G (ops/cpu_rank.c: fp32 G of
2^14 elements or more, so fp32 layers, and 16-bit layers on CPUs without 16-bit GEMMs). The counter counts the torch
form it replaces (two GEMMs that read G twice, B diag(d), dB's product, dd's r x r product): on those paths the count
is one read of G (M x N fp32) and a few N x r passes above what runs.

Opaque: ops outside aten (the fused backends' kasa_kernels::* custom ops) cannot be looked into. They are listed by
name and the provider gets no total; no figure is invented for them. torch_compile runs inductor's generated kernels,
which are not aten ops either, and the GEMM-only providers run our GEMM kernels: both are listed as not counted.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..ops import defs, rng
from ..ops.precision import meta_runs_as
from ..ops.quant_weight import QuantizedWeight
from . import providers as prov
from .shapes import Case

SCHEMA_VERSION = 1
PATHS = ("cuda", "cpu")
META = torch.device("meta")

# Ops that move no bytes although their schema does not say they alias: allocations, and views in all but name.
_NO_TRAFFIC = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "_unsafe_view", "lift_fresh",
               "detach", "alias", "_reshape_alias", "set_", "resize_"}
# In-place ops that overwrite their target without reading it.
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "uniform_", "normal_", "bernoulli_", "random_", "exponential_"}
# Ops whose input is scaled by beta and not read when beta == 0.
_BETA_OPS = {"addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm", "addbmm_", "addmv", "addmv_"}


def span_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor spans: a broadcast (stride 0) dimension counts once."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclasses.dataclass
class OpCount:
    calls: int = 0
    read: int = 0
    written: int = 0


class ByteCounter(TorchDispatchMode):
    """Counts the bytes each op reads and writes (module docstring), per phase ("forward", "backward")."""

    def __init__(self):
        super().__init__()
        self.phase = "forward"
        self.ops: "OrderedDict[Tuple[str, str], OpCount]" = OrderedDict()
        self.opaque: "OrderedDict[str, int]" = OrderedDict()
        self._paused = 0

    @contextlib.contextmanager
    def paused(self):
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    def record(self, name: str, read: int, written: int) -> None:
        c = self.ops.setdefault((self.phase, name), OpCount())
        c.calls += 1
        c.read += read
        c.written += written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._paused:
            return out
        ns = func.namespace
        if ns not in ("aten", "prims"):
            self.opaque[str(func)] = self.opaque.get(str(func), 0) + 1
            return out
        base = func._schema.name.split("::")[-1]
        if func.is_view or base in _NO_TRAFFIC:
            return out
        skip_read = set()
        schema_args = func._schema.arguments
        if base in _WRITE_ONLY_SELF:
            skip_read.add(id(args[0]))
        if base in _BETA_OPS and kwargs.get("beta", 1) == 0:
            skip_read.add(id(args[0]))
        for a in schema_args:  # out= targets are written, not read
            if a.kwarg_only and a.alias_info is not None and a.alias_info.is_write and a.name in kwargs:
                skip_read.add(id(kwargs[a.name]))
        read = sum(span_bytes(t) for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor) and id(t) not in skip_read)
        written = sum(span_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.record(f"aten.{base}", read, written)
        return out

    def totals(self, phase: Optional[str] = None) -> int:
        return sum(c.read + c.written for (ph, _), c in self.ops.items() if phase is None or ph == phase)


def _fused_kernel_runner(counter: ByteCounter):
    """Launches a mask kernel of ops/rng.py as one kernel: its eager form with counting paused, then one record of
    every tensor argument read and every tensor result written."""

    def run(name, eager, args):
        with counter.paused():
            out = eager(*args)
        read = sum(span_bytes(a) for a in args if isinstance(a, torch.Tensor))
        written = sum(span_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        counter.record(f"fused rng.{name}", read, written)
        return out

    return run


# ----------------------------------------------------------------------------------------------------------------
# Providers on meta tensors


def meta_tensors(c: Case) -> prov.Tensors:
    """The case's tensors (prov.make_tensors' shapes and dtypes) on the meta device."""
    dt, adt = c.torch_dtype, prov.adapter_dtype(c.torch_dtype)

    def t(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device=META)

    return prov.Tensors(x=t(c.M, c.K, dtype=dt), weight=t(c.N, c.K, dtype=dt), lora_A=t(c.r, c.K, dtype=adt),
                        lora_diag=t(c.r, dtype=adt), lora_B=t(c.N, c.r, dtype=adt), dy=t(c.M, c.N, dtype=dt),
                        scaling=prov.ALPHA_OVER_R)


# Providers this counter does not run, and why (the fused backends are run: their custom ops show up as opaque).
NOT_COUNTED = {
    "torch_compile": "inductor's generated kernels are not aten ops: not counted",
    "triton_gemm": "our Triton GEMM kernel (forward only): opaque, not counted",
    "cuda_gemm": "our CUDA GEMM kernel (forward only): opaque, not counted",
    "nf4_peft_style": "bitsandbytes quantizes W from real values when it builds the layer, and its dequantize is a "
                      "bitsandbytes kernel, not an aten op: not counted",
}


def meta_nf4_weight(c: Case) -> QuantizedWeight:
    """The case's W in the nf4_kasa provider's format (NF4, prov.NF4_BLOCKSIZE, double quantization with
    prov.NF4_NESTED_BLOCKSIZE) as meta tensors of the shapes and dtypes bitsandbytes gives."""
    blocks, nested = -(-c.N * c.K // prov.NF4_BLOCKSIZE), prov.NF4_NESTED_BLOCKSIZE

    def t(*shape, dtype):
        return torch.empty(*shape, dtype=dtype, device=META)

    return QuantizedWeight(t((c.N * c.K + 1) // 2, 1, dtype=torch.uint8), t(blocks, dtype=torch.uint8),
                           t(16, dtype=torch.float32), t(-(-blocks // nested), dtype=torch.float32),
                           t(256, dtype=torch.float32), t((), dtype=torch.float32), "nf4", prov.NF4_BLOCKSIZE, nested,
                           (c.N, c.K))


def _fused_on_meta(tensors: prov.Tensors, weight, c: Case, backend: str, impl: str) -> prov.State:
    """A forward through the autograd layer on meta tensors. kk.kasa_linear would refuse meta tensors for a fused
    backend (none runs on them); the autograd layer calls the backend's custom ops, whose fake implementations give
    meta results and show the kernels as opaque. The torch backend's kernels run inline and are counted op by op."""
    from .. import _backend
    from ..autograd import kasa_linear_autograd

    if backend in defs.INLINE_BACKENDS:  # its kernels run here, so they must be registered
        _backend.load(backend)
    leaves = prov._adapters_trainable(tensors)
    seed = rng.make_seed(None, META) if c.dropout > 0 else None
    args = (tensors.x, weight, None, tensors.lora_A, tensors.lora_diag, tensors.lora_B, seed, tensors.scaling,
            c.dropout, backend)
    return prov.State(lambda: kasa_linear_autograd(*args), leaves, tensors.dy, "kasa", impl)


def _build_on_meta(name: str, c: Case, path: str) -> prov.State:
    spec = prov.provider(name)
    tensors = meta_tensors(c)
    if spec.category == prov.OURS_FUSED:
        return _fused_on_meta(tensors, tensors.weight, c, spec.backend,
                              f"kasa_kernels::linear_* custom ops of backend {spec.backend!r}")
    if name == "nf4_kasa":  # the provider's own choice of backend for the device (triton on CUDA, else torch)
        backend = "triton" if path == "cuda" else "torch"
        return _fused_on_meta(tensors, meta_nf4_weight(c), c, backend,
                              f"kasa_kernels QuantKasaLinear's op (backend {backend!r}), NF4 base")
    state = spec.builder(spec, tensors, c, META, None)
    if name == "peft":
        # PEFT defers KaSA's SVD truncation of W (init work, not per-step traffic) to the first forward when W is on
        # the meta device, and that forward then refuses meta tensors: mark it done
        getattr(prov.peft_kasa_layer(c.K, c.N, c.r, c.dropout, c.torch_dtype, META),
                "_lora_kasa_truncation_deferred", set()).clear()
    return state


def count_provider(name: str, c: Case, path: str) -> Dict:
    """One forward (+ backward unless forward-only) of provider `name` at case `c` on meta tensors, taking the code
    path of device type `path`. Returns its results entry (status counted | opaque | not counted)."""
    if name in NOT_COUNTED:
        return {"status": "not counted", "reason": NOT_COUNTED[name]}
    spec = prov.provider(name)
    counter = ByteCounter()
    try:
        state = _build_on_meta(name, c, path)
        with meta_runs_as(path), rng.kernels_run_by(_fused_kernel_runner(counter)), counter:
            if spec.forward_only:
                with torch.no_grad():
                    state.fwd()
            else:
                y = state.fwd()
                counter.phase = "backward"
                torch.autograd.backward(y, state.dy)
    except Exception as e:  # recorded, never dropped silently
        return {"status": "not counted", "reason": f"failed on meta tensors: {type(e).__name__}: {e}"}
    unit = c.M * c.K * prov._elt(c.torch_dtype)
    fwd, bwd = counter.totals("forward"), counter.totals("backward")
    entry = {
        "status": "opaque" if counter.opaque else "counted",
        "impl": state.impl,
        "mode": "forward" if spec.forward_only else "full",
        "opaque_ops": dict(counter.opaque),
        "ops": [{"phase": ph, "op": op, "calls": n.calls, "read": n.read, "written": n.written}
                for (ph, op), n in counter.ops.items()],
    }
    if counter.opaque:  # the aten ops around the opaque ones, but no total: the opaque part is unknown
        entry["aten_bytes_outside_opaque"] = fwd + bwd
        return entry
    entry.update({"forward_bytes": fwd, "backward_bytes": bwd, "bytes": fwd + bwd,
                  "passes": {"forward": fwd / unit, "backward": bwd / unit, "total": (fwd + bwd) / unit}})
    return entry


def count_case(c: Case, names: Sequence[str], path: str) -> Dict:
    """Every provider of `names` at case `c` on `path`: the results file's entry for one case."""
    return {"M": c.M, "K": c.K, "N": c.N, "r": c.r, "dropout": c.dropout, "dtype": c.dtype, "tag": c.tag,
            "path": path, "pass_bytes": c.M * c.K * prov._elt(c.torch_dtype),
            "providers": {n: count_provider(n, c, path) for n in names}}


def passes(entry: Dict, provider: str) -> Optional[float]:
    """Total activation passes of a counted provider in one case entry, else None."""
    p = entry["providers"].get(provider, {})
    return p["passes"]["total"] if p.get("status") == "counted" else None


# ----------------------------------------------------------------------------------------------------------------
# Whole runs, results file, report


def run(cases: Sequence[Case], names: Sequence[str], paths: Sequence[str], command: str, out: Optional[str]) -> str:
    entries = [count_case(c, names, path) for path in paths for c in cases]
    now = _dt.datetime.now()
    result = {"schema": SCHEMA_VERSION, "kind": "traffic", "command": command,
              "date": now.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
              "rule": __doc__.split("\n\n")[1].replace("\n", " "), "cases": entries}
    path = out if out and out.endswith(".json") else os.path.join(out or os.path.join("benchmarks", "results"),
                                                                  "traffic", f"{now.strftime('%Y-%m-%d')}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")
    return path


def _case_label(e: Dict) -> str:
    return f"M={e['M']} K={e['K']} N={e['N']} r={e['r']} p={e['dropout']:g} {e['dtype']}"


def _fmt(v: Optional[float], spec: str = "{:.2f}") -> str:
    return "-" if v is None or not math.isfinite(v) else spec.format(v)


def provider_rows(entry: Dict, ref: str = "unsloth_style") -> List[List[str]]:
    """[provider, forward, backward, total passes, MB, total / ref's, status] rows of one case entry."""
    rows = []
    ref_total = passes(entry, ref)
    for name, p in entry["providers"].items():
        if p["status"] == "counted":
            ps = p["passes"]
            rows.append([name, _fmt(ps["forward"]), _fmt(ps["backward"]), _fmt(ps["total"]),
                         _fmt(p["bytes"] / 2**20, "{:.1f}"),
                         _fmt(ps["total"] / ref_total if ref_total else None, "{:.3f}"), "counted"])
        elif p["status"] == "opaque":
            ops = ", ".join(f"{op} x{n}" for op, n in p["opaque_ops"].items())
            rows.append([name, "-", "-", "-", "-", "-", f"opaque: {ops}"])
        else:
            rows.append([name, "-", "-", "-", "-", "-", p["reason"]])
    return rows


def _breakdown(entry: Dict, provider: str) -> List[str]:
    p = entry["providers"].get(provider, {})
    if p.get("status") != "counted":
        return []
    unit = entry["pass_bytes"]
    rows = [[o["phase"], f"`{o['op']}`", str(o["calls"]), _fmt(o["read"] / unit, "{:.3f}"),
             _fmt(o["written"] / unit, "{:.3f}")] for o in p["ops"]]
    return [f"`{provider}`, op by op (passes):", "", *_md(["phase", "op", "calls", "read", "written"], rows)]


def _md(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows] + [""]


def render_markdown(data: Dict, breakdown: Sequence[str] = ("torch_eager", "unsloth_style")) -> str:
    lines = ["# kasa-bench traffic", "", __doc__.split("\n\n", 1)[1].strip(), "",
             f"- results: `{data.get('_path', '?')}`", f"- command: `{data['command']}`",
             f"- date {data['date']}, torch {data['torch']}", ""]
    for e in data["cases"]:
        lines += [f"## {_case_label(e)}, path {e['path']}", "",
                  f"One pass = {e['pass_bytes'] / 2**20:.1f} MiB.", ""]
        lines += _md(["provider", "forward", "backward", "total passes", "MiB", "total / unsloth_style", "status"],
                     provider_rows(e))
        for name in breakdown:
            lines += _breakdown(e, name)
    return "\n".join(lines).rstrip() + "\n"


def render(path: str, out_dir: Optional[str] = None, name: Optional[str] = None) -> str:
    with open(path) as f:
        data = json.load(f)
    data["_path"] = path
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    name = name or os.path.splitext(os.path.basename(path))[0]
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(render_markdown(data))
    return md_path
