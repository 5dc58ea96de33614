"""Compile the "triton" backend's kernels ahead of time for real GPUs, without a GPU, and report their machine code.

The launchers themselves choose what is compiled: the forward, the backward, the adapter-off GEMM and the
regularizer run on CPU tensors inside `triton_common.aot_target(...)`, with every kernel swapped for a recorder, so
each launch is captured with exactly the arguments, grid splits, meta-parameters and autotune configs (after the
autotuner's own prune) that it would have on that GPU. Each capture is then specialized as Triton's runtime does it
(its own binder: 16-divisible ints and aligned pointers) and compiled for sm80 (A100), sm86 (RTX 3090) and sm90
(H100/H200); cuobjdump reads the cubin. Per kernel and config the report gives, from the SASS:

    MMA        the matrix instruction class and types (HGMMA = wgmma, HMMA = mma.sync; FFMA-only means no MMA)
    loads      global loads by kind and width: cp.async (LDGSTS), TMA (UTMALDG), plain loads into registers (LDG)
    regs, stack, spills (STL/LDL instructions), shared memory
    atomics    global atomics/reductions, and how many have a GPU-scope fence (MEMBAR.GPU, ERRBAR, CCTL.IVALL) beside
    loop       the hot loop (the innermost loop holding the most MMAs): BAR.SYNC, register loads, async copies
    lead       instructions and MMAs before the first async copy (cp.async/TMA): the work done before the
               pipeline's first load is in flight

    python tools/aot_compile_triton.py --out benchmarks/results/sass/triton-3.8.0.md   # the committed report
    python tools/aot_compile_triton.py --arch 90 --kernel gemm --case P-drop           # a subset, to the terminal
    python tools/aot_compile_triton.py --sweep                                          # + fp16/fp32, r = 128

Exit status 1 when a compile fails, a kept config needs more shared memory than its GPU has, or one of the checks
at the end fails (a fenced backward atomic, a spill in a config the autotuner keeps at P, narrow x loads in the sm90
shrink, unpipelined G loads in the dy pass).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import traceback
from typing import Dict, List, Optional, Tuple

os.environ.pop("TRITON_INTERPRET", None)  # compiled mode: this tool never runs a kernel
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from sass_report import FENCE_WINDOW, Sass, fmt_counts, mma_class, read_resources, read_sass  # noqa: E402
from kasa_kernels.ops import triton_common, triton_gemm, triton_linear, triton_lowrank, triton_reg  # noqa: E402
from kasa_kernels.ops.rng import make_seed  # noqa: E402

# The GPUs compiled for: SMs (grid splits) and opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
# sm90 is planned with an H100 SXM's 132 SMs, which an H200 has too.
GPUS = {
    80: ("A100", triton_common.Target((8, 0), 108, 163 * 1024)),
    86: ("RTX 3090", triton_common.Target((8, 6), 82, 99 * 1024)),
    90: ("H100/H200", triton_common.Target((9, 0), 132, 227 * 1024)),
}
P_SHAPE = dict(M=8192, K=4096, N=4096, r=16)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    M: int
    K: int
    N: int
    r: int
    p: float
    dtype: torch.dtype
    deterministic: bool = False


CASES = {
    "P": Case("P", **P_SHAPE, p=0.0, dtype=torch.bfloat16),
    "P-drop": Case("P-drop", **P_SHAPE, p=0.1, dtype=torch.bfloat16),
    "decode": Case("decode", 64, 4096, 4096, 16, p=0.0, dtype=torch.bfloat16),
    "decode-drop": Case("decode-drop", 64, 4096, 4096, 16, p=0.1, dtype=torch.bfloat16),
}
SWEEP = {
    "P-fp16-drop": Case("P-fp16-drop", **P_SHAPE, p=0.1, dtype=torch.float16),
    "P-fp32-drop": Case("P-fp32-drop", **P_SHAPE, p=0.1, dtype=torch.float32),
    "P-r128": Case("P-r128", **dict(P_SHAPE, r=128), p=0.0, dtype=torch.bfloat16),
    "P-r128-drop": Case("P-r128-drop", **dict(P_SHAPE, r=128), p=0.1, dtype=torch.bfloat16),
    "P-det": Case("P-det", **P_SHAPE, p=0.1, dtype=torch.bfloat16, deterministic=True),
}
TDT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------------------------------
# Capture: the launchers run on CPU tensors, every kernel replaced by a recorder


@dataclasses.dataclass
class Launch:
    stage: str  # forward | backward | base_gemm | regularizer
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict  # constexprs and launch options (num_warps, num_stages), the config's included


class _Recorder:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kwargs) records the launch."""

    def __init__(self, fn, sink, stage):
        self.fn, self.sink, self.stage = fn, sink, stage

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.stage[0], self.fn, args, dict(kwargs)))
        return launch


class _TunerRecorder(_Recorder):
    """Stands in for the GEMM's Autotuner: records one launch per config that its own prune keeps, after the
    config's pre-hook (which sets the TMA descriptors' block shapes)."""

    def __init__(self, tuner, sink, stage):
        super().__init__(tuner.fn, sink, stage)
        self.tuner = tuner

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.tuner.nargs = dict(zip(self.tuner.arg_names, args))
            for config in self.tuner.prune_configs(kwargs):
                merged = dict(kwargs, **config.all_kwargs())
                if config.pre_hook:
                    config.pre_hook(dict(self.tuner.nargs, **merged))
                # the descriptors' block shapes are part of the signature: bind now, before the next config's hook
                self.sink.append(Launch(self.stage[0], self.fn, _freeze_descriptors(args), merged))
        return launch


def _freeze_descriptors(args):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor(a.base, list(a.shape), list(a.strides), list(a.block_shape))
                 if isinstance(a, TensorDescriptor) else a for a in args)


@contextlib.contextmanager
def _recording(sink, stage, arch):
    kernels = {m: [n for n in dir(m) if isinstance(getattr(m, n), triton.runtime.jit.JITFunction)]
               for m in (triton_gemm, triton_lowrank, triton_reg)}
    saved = {(m, n): getattr(m, n) for m, names in kernels.items() for n in names}
    saved[(triton_gemm, "autotuned_kernel")] = triton_gemm.autotuned_kernel
    tuner = triton_gemm.autotuned_kernel(arch)  # the real Autotuner (configs and prune), built before the swap
    try:
        for (m, n), fn in saved.items():
            if n != "autotuned_kernel":
                setattr(m, n, _Recorder(fn, sink, stage))
        triton_gemm.autotuned_kernel = lambda a: _TunerRecorder(tuner, sink, stage)
        yield
    finally:
        for (m, n), fn in saved.items():
            setattr(m, n, fn)


def capture(target: triton_common.Target, case: Case) -> List[Launch]:
    """Every kernel launch of one training step of a KaSA layer (forward, backward with every gradient), the
    adapter-off GEMM and a 32-layer regularizer, as the launchers would issue them on `target`."""
    g = torch.Generator().manual_seed(0)
    M, K, N, r, dt = case.M, case.K, case.N, case.r, case.dtype
    x, gy = torch.empty(M, K, dtype=dt), torch.empty(M, N, dtype=dt)
    w = torch.empty(N, K, dtype=dt)
    a, d, bb = torch.randn(r, K, generator=g), torch.randn(r, generator=g), torch.randn(N, r, generator=g)
    seed = make_seed(1, torch.device("cpu"))
    launches: List[Launch] = []
    stage = ["forward"]
    prev = torch.are_deterministic_algorithms_enabled()
    with triton_common.aot_target(target), _recording(launches, stage, target.arch):
        torch.use_deterministic_algorithms(case.deterministic)
        try:
            _, h = triton_linear.linear_forward(x, w, None, a, d, bb, 2.0, case.p, seed)
            stage[0] = "backward"
            triton_linear.linear_backward(gy, x, w, a, d, bb, h, 2.0, case.p, seed, (True, True, True, True))
        finally:
            torch.use_deterministic_algorithms(prev)
        if case.p == 0.0 and not case.deterministic:
            stage[0] = "base_gemm"
            triton_linear.base_gemm(x, w, None)
            stage[0] = "regularizer"
            triton_reg.regularizer([a] * 32, [bb] * 32, [d] * 32, 1e-4, 1e-3, False)
    return launches


# ----------------------------------------------------------------------------------------------------------------
# Specialize (Triton's own binder) and compile


@dataclasses.dataclass
class Job:
    cc: int
    fn: object
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str  # kernel and the meta-parameters that tell its configs apart
    uses: List[str] = dataclasses.field(default_factory=list)  # "case/stage"


_BACKENDS: Dict[int, object] = {}


def specialize(cc: int, launch: Launch) -> Job:
    """What triton's JITFunction.run would compile for this launch on a cc GPU (its binder and _pack_args)."""
    backend = _BACKENDS.setdefault(cc, make_backend(GPUTarget("cuda", cc, 32)))
    fn = launch.fn
    kwargs = dict(launch.kwargs, debug=False)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return Job(cc, fn, signature, constexprs, attrs, dict(options.__dict__), _label(fn, kwargs, signature))


def _label(fn, kw, signature) -> str:
    """The kernel, its role and the meta-parameters that tell its configs apart."""
    name = fn.__name__.replace("_kernel", "")
    dtype = next(v[1:] for v in signature.values() if v.startswith("*"))  # the streamed operand's (first pointer)
    if name == "gemm_lowrank":
        kind = ("dX masked" if kw["LOWRANK_DROPOUT"] else "dX") if not kw["B_K_CONTIG"] else (
            "forward" if kw["LOWRANK"] else "base")
        variant = "+".join(v for v, on in (("persistent", kw["PERSISTENT"]), ("tma", kw["USE_TMA"])) if on) or "plain"
        tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        return f"gemm {kind} {dtype} {tile} s{kw['num_stages']} w{kw['num_warps']} {variant}"
    flags = [k.lower() for k in ("DROPOUT", "SPLIT_K", "SPLIT_N", "DETERMINISTIC") if kw.get(k)]
    tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_L", "R_PAD") if k in kw)
    return " ".join([name, dtype] + (["+".join(flags)] if flags else []) +
                    [f"{tile} s{kw.get('num_stages', 3)} w{kw.get('num_warps', 4)}"])


def _compile_key(job: Job):
    return (job.cc, job.fn.__name__, repr(sorted(job.signature.items())), repr(sorted(job.constexprs.items())),
            repr(sorted(job.attrs.items())), repr(sorted((k, str(v)) for k, v in job.options.items())))


def jobs_for(ccs, cases: List[Case], kernel_filter: Optional[str]) -> List[Job]:
    jobs: Dict[tuple, Job] = {}
    for cc in ccs:
        for case in cases:
            for launch in capture(GPUS[cc][1], case):
                job = specialize(cc, launch)
                if kernel_filter and kernel_filter not in job.label:
                    continue
                job = jobs.setdefault(_compile_key(job), job)
                use = f"{case.name}/{launch.stage}"
                if use not in job.uses:
                    job.uses.append(use)
    return list(jobs.values())


_CUDA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _cuobjdump(cubin: bytes, *flags) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(_CUDA_BIN, "cuobjdump"), *flags, f.name], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(flags)}: {out.stderr.strip()}")
    return out.stdout


def compile_job(job: Job, dump: Optional[str] = None):
    """(smem bytes, 'REG:n STACK:n ...' resource line, SASS text) of one job; dump: a folder for its TTGIR, PTX
    and SASS."""
    src = ASTSource(job.fn, job.signature, job.constexprs, job.attrs)
    k = triton.compile(src, target=GPUTarget("cuda", job.cc, 32), options=job.options)
    sass = _cuobjdump(k.asm["cubin"], "-sass")
    if dump:
        os.makedirs(dump, exist_ok=True)
        base = os.path.join(dump, re.sub(r"[^A-Za-z0-9_.+-]+", "_", f"{job.label}_sm{job.cc}"))
        for ext, text in (("ttgir", k.asm["ttgir"]), ("ptx", k.asm["ptx"]), ("sass", sass)):
            with open(f"{base}.{ext}", "w") as f:
                f.write(text)
    return k.metadata.shared, _cuobjdump(k.asm["cubin"], "--dump-resource-usage"), sass


# ----------------------------------------------------------------------------------------------------------------
# Report


@dataclasses.dataclass
class Row:
    job: Job
    smem: Optional[int] = None
    regs: Optional[int] = None
    stack: Optional[int] = None
    sass: Optional[Sass] = None
    error: Optional[str] = None


def _run(i, dump=None):
    job = _JOBS[i]
    try:
        smem, res, sass = compile_job(job, dump)
        regs, stack = read_resources(res)
        return i, smem, regs, stack, read_sass(sass), None
    except Exception as e:  # noqa: BLE001 -- reported per row
        return i, None, None, None, None, "".join(traceback.format_exception_only(type(e), e)).strip()[-400:]


_JOBS: List[Job] = []


def _at_p(row: Row) -> bool:
    return any(u.split("/")[0] in ("P", "P-drop") for u in row.job.uses)


def _where(rows: List[Row]) -> str:
    return ", ".join(f"{r.job.label} sm{r.job.cc}" for r in rows) or "none"


def checks(rows: List[Row]) -> List[Tuple[str, Optional[bool], str]]:
    """The facts the kernels are held to, each (what, holds, evidence); holds is None where this run compiled nothing
    the fact is about. main() fails when one does not hold."""
    ok = [r for r in rows if r.sass is not None]
    out = []

    def fact(what, subjects, bad, evidence):
        out.append((what, (not bad) if subjects else None, evidence if subjects else "nothing compiled for it"))

    atomic = [r for r in ok if r.sass.atomics]
    fenced = [r for r in atomic if r.sass.fenced_atomics or r.sass.gpu_fences]
    fact("no GPU-scope fence beside any atomic", atomic, fenced,
         f"{len(atomic)} compiles with atomics; fenced: {_where(fenced)}")
    at_p = [r for r in ok if _at_p(r)]
    spills = [r for r in at_p if r.stack or r.sass.stl or r.sass.ldl]
    fact("no spill (stack, STL/LDL) in any config the launchers keep at P", at_p, spills,
         f"{len(at_p)} compiles at P; spilling: "
         + (", ".join(f"{r.job.label} sm{r.job.cc} ({r.stack} B)" for r in spills) or "none"))
    gemm = [r for r in ok if r.job.fn.__name__ == "gemm_lowrank_kernel"]
    cold = [r for r in gemm if not r.sass.lead or r.sass.lead["mma"] or r.sass.lead["ldg"]]
    fact("a GEMM tile issues its first async copy before any MMA or load into registers", gemm, cold,
         f"{len(gemm)} GEMM compiles; otherwise: {_where(cold)}")
    wgmma = [r for r in gemm if r.sass.loop and r.sass.loop["mma_in_flight"] >= 0]  # loops that wait on wgmma
    serial = [r for r in wgmma if r.sass.loop["mma_in_flight"] == 0]
    fact("the GEMM main loops that use wgmma keep one in flight across each wait", wgmma, serial,
         f"{len(wgmma)} GEMM compiles with wgmma in their main loop (the 32-row decode tiles use mma.sync); "
         f"waiting to completion: {_where(serial)}")
    shrink90 = [r for r in ok if r.job.cc == 90 and r.job.fn.__name__ == "shrink_kernel"]
    narrow = [r for r in shrink90 if any(k.startswith("cp.async") and k != "cp.async 16B" for k in r.sass.loads)]
    fact("16-byte cp.async (or TMA) only in the sm90 shrink", shrink90, narrow,
         "; ".join(f"{r.job.label}: {fmt_counts(r.sass.loads)}" for r in shrink90))
    dy = [r for r in ok if r.job.fn.__name__ == "dy_pass_kernel"]
    sync = [r for r in dy if not r.sass.loop or r.sass.loop["ldg"] or not r.sass.loop["cp_async"] + r.sass.loop["tma"]]
    fact("the dy pass's loop reads G by async copies only (pipelined), no loads into registers", dy, sync,
         "; ".join(f"{r.job.label} sm{r.job.cc}: {r.sass.loop['cp_async']} cp.async, {r.sass.loop['ldg']} ldg, "
                   f"{r.sass.loop['bar_sync']} BAR.SYNC per loop body" for r in dy if r.sass.loop))
    return out


def render(rows: List[Row], argv: List[str], seconds: float) -> str:
    cuobjdump = _cuobjdump_version()
    lines = [
        "# SASS report: the triton backend's kernels, compiled ahead of time",
        "",
        f"triton {triton.__version__}, torch {torch.__version__}, {cuobjdump}; "
        f"{datetime.date.today().isoformat()}, {seconds:.0f} s on {os.cpu_count()} cores.",
        "",
        f"`python tools/aot_compile_triton.py {' '.join(argv)}`".replace("  ", " "),
        "",
        "Every launch was captured from the launchers at the case's shape (the autotuner's configs after its own "
        "prune), specialized by Triton's binder and compiled for the GPU named; nothing here ran on a GPU. Cases: "
        + "; ".join(f"{c.name} = M {c.M}, K {c.K}, N {c.N}, r {c.r}, p {c.p:g}, {TDT[c.dtype]}"
                    + (", deterministic" if c.deterministic else "") for c in _CASES_RUN) + ".",
        "",
        "Columns: MMA = matrix instructions (HGMMA is wgmma, HMMA mma.sync); loads = global loads by kind and bytes "
        "per thread (cp.async = LDGSTS, ldg = into registers, tma = UTMALDG); stack = bytes per thread of local "
        "memory, STL/LDL = spill instructions; atomics = global atomics, (fenced) = those with a GPU-scope fence "
        f"(MEMBAR.GPU, ERRBAR, CCTL.IVALL) within {FENCE_WINDOW} instructions; loop = the loop whose own body (nested "
        "loops left out) holds the most MMAs: its instructions, MMAs, BAR.SYNCs, register loads (ldg), async copies "
        "(cp/tma) and, on sm90, wgmma groups left in flight by its completion wait (0: each k-step waits for its "
        "wgmma); lead = instructions, register loads and MMAs before the first async copy is issued.",
        "",
        "## Checks",
        "",
    ]
    for what, holds, evidence in checks(rows):
        lines.append(f"- **{ {True: 'pass', False: 'FAIL', None: 'n/a'}[holds] }**: {what}. {evidence}")
    for cc in sorted({r.job.cc for r in rows}):
        lines += ["", f"## sm{cc} ({GPUS[cc][0]}: {GPUS[cc][1].n_sms} SMs, "
                      f"{GPUS[cc][1].smem_limit // 1024} KB shared memory per block)", "",
                  "| kernel, config | used at | MMA | loads | regs | stack | STL/LDL | smem | atomics (fenced) "
                  "| loop: instr, mma, bar, ldg, cp/tma, in flight | lead: instr, ldg, mma |",
                  "|---|---|---|---|---:|---:|---:|---:|---|---|---|"]
        for r in sorted((r for r in rows if r.job.cc == cc), key=lambda r: r.job.label):
            uses = ", ".join(r.job.uses)
            if r.error:
                lines.append(f"| {r.job.label} | {uses} | compile FAILED: {r.error.splitlines()[-1][:150]} "
                             "| | | | | | | | |")
                continue
            s = r.sass
            loop = "-" if not s.loop else (f"{s.loop['instr']}, {s.loop['mma']}, {s.loop['bar_sync']}, "
                                           f"{s.loop['ldg']}, {s.loop['cp_async'] + s.loop['tma']}"
                                           + (f", {s.loop['mma_in_flight']}" if s.loop["mma_in_flight"] >= 0 else ""))
            atom = "-" if not s.atomics else f"{fmt_counts(s.atomics)} ({s.fenced_atomics})"
            lead = "-" if not s.lead else f"{s.lead['instr']}, {s.lead['ldg']}, {s.lead['mma']}"
            over = " OVER" if r.smem > GPUS[cc][1].smem_limit else ""
            lines.append(f"| {r.job.label} | {uses} | {mma_class(s)} | {fmt_counts(s.loads)} | {r.regs} | {r.stack} "
                         f"| {s.stl}/{s.ldl} | {r.smem}{over} | {atom} | {loop} | {lead} |")
    return "\n".join(lines) + "\n"


def _cuobjdump_version() -> str:
    out = subprocess.run([os.path.join(_CUDA_BIN, "cuobjdump"), "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return f"cuobjdump {m.group(1) if m else '?'} (triton's)"


_CASES_RUN: List[Case] = []


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="*", default=sorted(GPUS), choices=sorted(GPUS))
    ap.add_argument("--case", nargs="*", default=list(CASES), choices=list(CASES) + list(SWEEP))
    ap.add_argument("--sweep", action="store_true", help="also fp16, fp32, r = 128 and the deterministic backward")
    ap.add_argument("--kernel", default=None, help="only jobs whose label contains this, e.g. 'gemm', 'dy_pass'")
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="write the markdown report here (else print it)")
    ap.add_argument("--dump", default=None, help="also write each compile's TTGIR, PTX and SASS into this folder")
    a = ap.parse_args(argv)
    import time

    t0 = time.time()
    _CASES_RUN[:] = [{**CASES, **SWEEP}[c] for c in a.case] + (list(SWEEP.values()) if a.sweep else [])
    _JOBS[:] = jobs_for(a.arch, _CASES_RUN, a.kernel)
    print(f"{len(_JOBS)} compiles", file=sys.stderr, flush=True)
    rows = [Row(j) for j in _JOBS]
    with cf.ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("fork")) as ex:  # workers inherit _JOBS
        results = ex.map(_run, range(len(_JOBS)), [a.dump] * len(_JOBS))
        for n, (i, smem, regs, stack, sass, err) in enumerate(results):
            rows[i].smem, rows[i].regs, rows[i].stack, rows[i].sass, rows[i].error = smem, regs, stack, sass, err
            print(f"[{n + 1}/{len(_JOBS)}] sm{_JOBS[i].cc} {_JOBS[i].label}: "
                  + (f"regs {regs} stack {stack}" if not err else "FAILED " + err.splitlines()[-1][:160]),
                  file=sys.stderr, flush=True)
    text = render(rows, argv, time.time() - t0)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)
    bad = any(r.error for r in rows) or any(r.smem > GPUS[r.job.cc][1].smem_limit for r in rows if r.smem)
    return 1 if bad or any(holds is False for _, holds, _ in checks(rows)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
