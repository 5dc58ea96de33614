"""`kasa-bench run`: time every provider x mode x case, print progress, write benchmarks/results/<device>/<date>.json."""
from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from . import providers as prov
from .shapes import Case
from ..ops.precision import allow_tf32
from .timing import Timer, quantiles

SCHEMA_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# Environment


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def environment(device: torch.device) -> Dict:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(str(v) for v in torch.cuda.get_device_capability(device))
        dev_slug = slug(name)
    else:
        cores = os.cpu_count() or 1
        name = f"CPU: {_cpu_model()} ({cores} logical cores, {torch.get_num_threads()} torch threads)"
        cap = None
        dev_slug = f"cpu-{slug(_cpu_model())}-{cores}c"
    return {
        "device": name,
        "device_slug": dev_slug,
        "device_type": device.type,
        "capability": cap,
        "driver": _driver_version() if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.platform(),
    }


# ----------------------------------------------------------------------------------------------------------------
# One case


def _zero_grads(leaves: Sequence[torch.Tensor]):
    def reset():
        for t in leaves:
            t.grad = None

    return reset


def _mode_callable(state: prov.State, mode: str):
    """(fn, prepare, keepalive) for a mode; keepalive holds the retained graph of the backward mode."""
    reset = _zero_grads(state.leaves)
    if mode == "forward":
        if state.dy is None:  # T_mm: plain inference GEMM
            def fwd_nograd():
                with torch.no_grad():
                    return state.fwd()

            return fwd_nograd, None, None
        return state.fwd, None, None
    if mode == "backward":
        y = state.fwd()
        dy = state.dy

        def bwd():
            torch.autograd.backward(y, dy, retain_graph=True)

        return bwd, reset, y
    if mode == "full":
        dy = state.dy

        def full():
            torch.autograd.backward(state.fwd(), dy)

        return full, reset, None
    raise ValueError(mode)


def _supports(name: str, mode: str) -> bool:
    return not (name in prov.FORWARD_ONLY and mode != "forward")


def _own_preexisting_bytes(name: str) -> int:
    if name != "peft":
        return 0
    return sum(p.numel() * p.element_size() for layer in prov._PEFT_LAYERS.values() for p in layer.parameters())


def bench_case(
    case: Case,
    names: Sequence[str],
    modes: Sequence[str],
    device: torch.device,
    timer: Timer,
    args,
    log,
    skipped: List[Dict],
) -> List[Dict]:
    rows: List[Dict] = []
    states: Dict[str, prov.State] = {}
    if "torch_compile" in names:
        prov.prepare_compile(device)
    for name in names:
        try:
            states[name] = prov.build(name, case, device, compile_mode=args.compile_mode)
        except Exception as e:  # a provider that cannot build this case is recorded, never silently dropped
            skipped.append({"provider": name, "case": str(case), "reason": f"build failed: {type(e).__name__}: {e}"})
            log(f"    {name}: skipped ({type(e).__name__}: {e})")
    for mode in modes:
        active = [n for n in states if _supports(n, mode)]
        fns, preps, keep, live = [], [], [], []
        for n in active:
            try:
                fn, prep, k = _mode_callable(states[n], mode)
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    if prep is not None:
                        prep()
                    fn()
                timer.sync()
                warm_s = time.perf_counter() - t0
            except Exception as e:
                skipped.append({"provider": n, "case": str(case), "mode": mode,
                                "reason": f"run failed: {type(e).__name__}: {e}"})
                log(f"    {n} {mode}: skipped ({type(e).__name__}: {e})")
                continue
            if warm_s > 5:
                log(f"    {n} {mode}: warm-up {warm_s:.1f} s (compilation)")
            fns.append(fn)
            preps.append(prep)
            keep.append(k)
            live.append(n)
        if not live:
            continue
        est = max(timer.estimate_ms(f, p) for f, p in zip(fns, preps))
        reps = int(max(args.min_reps, min(args.max_reps, args.rep_ms / max(est, 1e-3))))
        samples = timer.run_interleaved(fns, preps, reps)
        for n, s in zip(live, samples):
            st = states[n]
            q = quantiles(s)
            secs = q["ms_median"] / 1e3
            rows.append({
                "provider": n, "mode": mode, "M": case.M, "K": case.K, "N": case.N, "r": case.r,
                "dropout": case.dropout, "dtype": case.dtype, "tag": case.tag,
                **q,
                "tflops": prov.flops(st.kind, mode, case) / secs / 1e12 if secs > 0 else 0.0,
                "gbps": prov.bytes_moved(st.kind, mode, case) / secs / 1e9 if secs > 0 else 0.0,
                "peak_mem_mb": math.nan,
                "reps": len(s),
                "impl": st.impl,
            })
        del fns, preps, keep
        line = "  ".join(f"{r['provider']} {r['ms_median']:.3f}" for r in rows if r["mode"] == mode)
        log(f"    {mode:8s} ms: {line}  ({reps} reps)")
    # Peak memory: one provider alive at a time, measured from before its tensors were made.
    for st in states.values():
        for t in st.leaves:
            t.grad = None
    states.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for name in names:
        if not any(r["provider"] == name for r in rows):
            continue
        try:
            timer.sync()
            before = (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0) - _own_preexisting_bytes(name)
            st = prov.build(name, case, device, compile_mode=args.compile_mode)
            for mode in modes:
                if not any(r["provider"] == name and r["mode"] == mode for r in rows):
                    continue
                fn, prep, k = _mode_callable(st, mode)
                peak = timer.peak_memory_mb(fn, prep)
                if device.type == "cuda":
                    flush = timer.flush_buf.numel() * 4 if timer.flush_buf is not None else 0
                    peak -= (before - flush) / 2**20
                for r in rows:
                    if r["provider"] == name and r["mode"] == mode:
                        r["peak_mem_mb"] = peak
                del fn, prep, k
            for t in st.leaves:
                t.grad = None
            del st
        except Exception as e:
            log(f"    {name}: peak memory not measured ({type(e).__name__}: {e})")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for r in rows:
        if isinstance(r["peak_mem_mb"], float) and math.isnan(r["peak_mem_mb"]):
            r["peak_mem_mb"] = None
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Whole run


def default_out_path(out: Optional[str], env: Dict, date: str) -> str:
    if out and out.endswith(".json"):
        return out
    root = out or os.path.join("benchmarks", "results")
    folder = os.path.join(root, env["device_slug"])
    path = os.path.join(folder, f"{date}.json")
    i = 2
    while os.path.exists(path):
        path = os.path.join(folder, f"{date}-{i}.json")
        i += 1
    return path


def run(args, cases: Sequence[Case], names: Sequence[str], modes: Sequence[str], device: torch.device,
        command: str) -> str:
    t_start = time.perf_counter()
    quiet = args.quiet

    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    env = environment(device)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    skipped: List[Dict] = []
    runnable = []
    for n in names:
        ok, why = prov.usable(n, device)
        if ok and n == "torch_compile" and device.type == "cpu" and not args.explicit_providers:
            ok, why = False, ("left out of the CPU default: inductor compiles each shape for 20-60 s on 2 cores; "
                              "ask for it with --providers ...,torch_compile")
        if ok:
            runnable.append(n)
        else:
            skipped.append({"provider": n, "reason": why})
            log(f"skipping provider {n}: {why}")
    log(f"kasa-bench on {env['device']}: {len(cases)} cases x {len(modes)} modes x {len(runnable)} providers")
    timer = Timer(device, flush=not args.no_flush)
    rows: List[Dict] = []
    budget = getattr(args, "time_budget_s", None)

    def over_budget() -> bool:
        return budget is not None and time.perf_counter() - t_start > budget

    for i, case in enumerate(cases):
        if over_budget():
            for left in cases[i:]:
                skipped.append({"case": str(left), "reason": f"--time-budget-s {budget:g} spent"})
            log(f"time budget spent: {len(cases) - i} cases left out")
            break
        log(f"[{i + 1}/{len(cases)}] {case}  ({time.perf_counter() - t_start:.0f} s elapsed)")
        rows += bench_case(case, runnable, modes, device, timer, args, log, skipped)
    whole: List[Dict] = []
    if args.whole_model and over_budget():
        skipped.append({"case": "whole-model runs", "reason": f"--time-budget-s {budget:g} spent"})
    elif args.whole_model:
        from . import wholemodel

        log("whole-model runs")
        whole = wholemodel.run_all(device, small=(device.type != "cuda" or args.whole_model_small), timer=timer,
                                   log=log, args=args)
    backends = {k: {"usable": v.available, "reason": v.reason} for k, v in __import__("kasa_kernels").backends(device).items()}
    now = _dt.datetime.now()
    result = {
        "schema": SCHEMA_VERSION,
        **{k: env[k] for k in ("device", "capability", "driver", "torch", "triton", "cuda")},
        "command": command,
        "date": now.strftime("%Y-%m-%d %H:%M:%S"),
        "device_slug": env["device_slug"],
        "device_type": env["device_type"],
        "python": env["python"],
        "host": env["host"],
        "kasa_kernels": __import__("kasa_kernels").__version__,
        "backends": backends,
        "timing": {"method": timer.method, "warmup": args.warmup, "rep_ms": args.rep_ms, "min_reps": args.min_reps,
                   "max_reps": args.max_reps, "compile_mode": args.compile_mode,
                   "allow_tf32_matmul": allow_tf32(),
                   "peak_mem": ("torch.cuda.max_memory_allocated during one call, minus what was allocated before "
                                "the provider's tensors were made (inputs, parameters and saved tensors count)"
                                if device.type == "cuda" else
                                "CPU estimate: peak live tensor storage seen by a dispatch mode during one call "
                                "(inputs, parameters and saved tensors count; scratch inside kernels does not)")},
        "formulas": {
            "tflops": "base 2MNK (+2MNK for dW of dense_linear in backward); adapter 2Mr(K+N) forward, 4Mr(K+N) "
                      "backward; full = forward + backward",
            "gbps": "compulsory bytes (each operand read once, each result written once) / median time",
        },
        "providers": {n: prov.usable(n, device)[1] for n in runnable},
        "skipped": skipped,
        "rows": rows,
        "whole_model": whole,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        # other work on the machine inflates and spreads CPU timings; the 1-minute load average says how much
        "load_avg_1m": {"start": load_start and round(load_start[0], 2),
                        "end": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None},
    }
    path = default_out_path(args.out, env, now.strftime("%Y-%m-%d"))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")
    log(f"wrote {path} ({len(rows)} rows, {len(whole)} whole-model rows, {result['elapsed_s']} s)")
    return path
