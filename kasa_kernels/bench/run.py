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
from ..ops import cpu_mask
from ..ops.precision import allow_tf32, device_path
from .timing import Timer, paired_ratio, quantiles

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


def _clear_grads(leaves: Sequence[torch.Tensor]) -> None:
    for t in leaves:
        t.grad = None


def _zero_grads(leaves: Sequence[torch.Tensor]):
    def reset():
        _clear_grads(leaves)

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


def _record_skip(skipped: List[Dict], log, message: str, **entry) -> None:
    """List what was left out (a provider, a case, or one provider's case or mode) under the results' "skipped",
    with the reason, and say so: nothing is dropped silently."""
    skipped.append(entry)
    log(message)


def _record_failure(skipped: List[Dict], log, stage: str, name: str, case: Case, e: Exception,
                    mode: Optional[str] = None) -> None:
    """Provider `name` failed to build (stage "build") or to run (stage "run") this case (in `mode`)."""
    err = f"{type(e).__name__}: {e}"
    in_mode = {"mode": mode} if mode else {}
    _record_skip(skipped, log, f"    {name}{' ' + mode if mode else ''}: skipped ({err})",
                 provider=name, case=str(case), **in_mode, reason=f"{stage} failed: {err}")


def _collect(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _build_states(case: Case, names: Sequence[str], device: torch.device, args, log,
                  skipped: List[Dict]) -> Dict[str, prov.State]:
    """Each provider's tensors and forward for this case; one that cannot build it is recorded as skipped."""
    states: Dict[str, prov.State] = {}
    if "torch_compile" in names:
        prov.prepare_compile(device)
    for name in names:
        try:
            states[name] = prov.build(name, case, device, compile_mode=args.compile_mode)
        except Exception as e:  # a provider that cannot build this case is recorded, never silently dropped
            _record_failure(skipped, log, "build", name, case, e)
    return states


def _warm_up(fn, prepare, calls: int, timer: Timer) -> float:
    """`calls` untimed calls; their wall time in seconds (long where they compile)."""
    t0 = time.perf_counter()
    for _ in range(calls):
        if prepare is not None:
            prepare()
        fn()
    timer.sync()
    return time.perf_counter() - t0


def _reps(timer: Timer, fns, preps, args) -> int:
    """Timed calls per provider: args.rep_ms worth of the slowest one, within [min_reps, max_reps]. On CPU one call
    estimates it (a 2048-wide bf16 layer takes seconds a call on a CPU without bf16 GEMM kernels)."""
    est = max(timer.estimate_ms(f, p, n=3 if timer.is_cuda else 1) for f, p in zip(fns, preps))
    return int(max(args.min_reps, min(args.max_reps, args.rep_ms / max(est, 1e-3))))


def _row(case: Case, mode: str, name: str, state: prov.State, samples: List[float]) -> Dict:
    """One results row (the schema the report and tools read); peak_mem_mb is filled in later."""
    q = quantiles(samples)
    secs = q["ms_median"] / 1e3
    return {
        "provider": name, "mode": mode, "M": case.M, "K": case.K, "N": case.N, "r": case.r,
        "dropout": case.dropout, "dtype": case.dtype, "tag": case.tag,
        **q,
        "tflops": prov.flops(state.kind, mode, case) / secs / 1e12 if secs > 0 else 0.0,
        "gbps": prov.bytes_moved(state.kind, mode, case) / secs / 1e9 if secs > 0 else 0.0,
        "peak_mem_mb": math.nan,
        "reps": len(samples),
        "impl": state.impl,
    }


def _time_mode(case: Case, mode: str, states: Dict[str, prov.State], timer: Timer, args, log,
               skipped: List[Dict]) -> List[Dict]:
    """Warm up every provider that has `mode`, time them interleaved call by call, and return their rows."""
    live, fns, preps, keep = [], [], [], []
    for n, state in states.items():
        if not _supports(n, mode):
            continue
        try:
            fn, prep, k = _mode_callable(state, mode)
            warm_s = _warm_up(fn, prep, args.warmup, timer)
        except Exception as e:
            _record_failure(skipped, log, "run", n, case, e, mode)
            continue
        if warm_s > 5:
            log(f"    {n} {mode}: warm-up {warm_s:.1f} s (compilation)")
        live.append(n)
        fns.append(fn)
        preps.append(prep)
        keep.append(k)
    if not live:
        return []
    reps = _reps(timer, fns, preps, args)
    samples = timer.run_interleaved(fns, preps, reps)
    rows = [_row(case, mode, n, states[n], s) for n, s in zip(live, samples)]
    for j, row in enumerate(rows):  # every pair's per-round ratio (timing.paired_ratio): this provider / the other
        row["paired"] = {live[k]: paired_ratio(samples[j], samples[k]) for k in range(len(live)) if k != j}
    del fns, preps, keep
    line = "  ".join(f"{r['provider']} {r['ms_median']:.3f}" for r in rows)
    log(f"    {mode:8s} ms: {line}  ({reps} reps)")
    return rows


def _peak_memory(name: str, case: Case, modes: Sequence[str], rows: List[Dict], device: torch.device, timer: Timer,
                 args) -> None:
    """Set peak_mem_mb on provider `name`'s rows of `modes`, from a fresh build, counting from before its tensors
    were made."""
    timer.sync()
    before = (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0) - _own_preexisting_bytes(name)
    st = prov.build(name, case, device, compile_mode=args.compile_mode)
    for mode in modes:
        fn, prep, k = _mode_callable(st, mode)
        peak = timer.peak_memory_mb(fn, prep)
        if device.type == "cuda":
            flush = timer.flush_buf.numel() * 4 if timer.flush_buf is not None else 0
            peak -= (before - flush) / 2**20
        for r in rows:
            if r["provider"] == name and r["mode"] == mode:
                r["peak_mem_mb"] = peak
        del fn, prep, k
    _clear_grads(st.leaves)


def _measure_peak_memory(case: Case, names: Sequence[str], modes: Sequence[str], rows: List[Dict],
                         device: torch.device, timer: Timer, args, log) -> None:
    """Peak memory of every timed provider and mode: one provider alive at a time. Rows it could not measure get
    None."""
    for name in names:
        timed = [m for m in modes if any(r["provider"] == name and r["mode"] == m for r in rows)]
        if not timed:
            continue
        try:
            _peak_memory(name, case, timed, rows, device, timer, args)
        except Exception as e:
            log(f"    {name}: peak memory not measured ({type(e).__name__}: {e})")
        _collect(device)
    for r in rows:
        if isinstance(r["peak_mem_mb"], float) and math.isnan(r["peak_mem_mb"]):
            r["peak_mem_mb"] = None


def bench_case(
    case: Case,
    names: Sequence[str],
    modes: Sequence[str],
    device: torch.device,
    timer: Timer,
    args,
    log,
    skipped: List[Dict],
    traffic_out: Optional[List[Dict]] = None,
) -> List[Dict]:
    """Every provider x mode of one case: the timed rows, then each one's peak memory, then (into traffic_out) the
    bytes each one's aten ops move on this device's path. Providers that fail to build or run are recorded in
    `skipped`."""
    states = _build_states(case, names, device, args, log, skipped)
    rows: List[Dict] = []
    for mode in modes:
        rows += _time_mode(case, mode, states, timer, args, log, skipped)
    for st in states.values():
        _clear_grads(st.leaves)
    states.clear()
    _collect(device)
    _measure_peak_memory(case, names, modes, rows, device, timer, args, log)
    if traffic_out is not None and not getattr(args, "no_traffic", False):
        from . import traffic

        timed = [n for n in names if any(r["provider"] == n for r in rows)]
        traffic_out.append(traffic.count_case(case, timed, device_path(device)))
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


def _logger(quiet: bool):
    def log(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    return log


def _load_avg_1m() -> Optional[float]:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _budget_spent(budget: float) -> str:
    return f"--time-budget-s {budget:g} spent"


def _runnable(names: Sequence[str], device: torch.device, args, log, skipped: List[Dict]) -> List[str]:
    """The providers that can run here; the others are recorded as skipped, with the reason."""
    runnable = []
    for n in names:
        ok, why = prov.usable(n, device)
        if ok and n == "torch_compile" and device.type == "cpu" and not args.explicit_providers:
            ok, why = False, ("left out of the CPU default: inductor compiles each shape for 20-60 s on 2 cores; "
                              "ask for it with --providers ...,torch_compile")
        if ok:
            runnable.append(n)
        else:
            _record_skip(skipped, log, f"skipping provider {n}: {why}", provider=n, reason=why)
    return runnable


def _bench_cases(cases: Sequence[Case], names: Sequence[str], modes: Sequence[str], device: torch.device,
                 timer: Timer, args, log, skipped: List[Dict], t_start: float, over_budget,
                 traffic_out: List[Dict]) -> List[Dict]:
    """bench_case over the cases, until the time budget (if any) is spent; the cases left then are listed."""
    rows: List[Dict] = []
    for i, case in enumerate(cases):
        if over_budget():
            for left in cases[i:]:
                skipped.append({"case": str(left), "reason": _budget_spent(args.time_budget_s)})
            log(f"time budget spent: {len(cases) - i} cases left out")
            break
        log(f"[{i + 1}/{len(cases)}] {case}  ({time.perf_counter() - t_start:.0f} s elapsed)")
        rows += bench_case(case, names, modes, device, timer, args, log, skipped, traffic_out)
    return rows


def _whole_model_runs(device: torch.device, timer: Timer, args, log, skipped: List[Dict], over_budget) -> List[Dict]:
    if not args.whole_model:
        return []
    if over_budget():
        skipped.append({"case": "whole-model runs", "reason": _budget_spent(args.time_budget_s)})
        return []
    from . import wholemodel

    log("whole-model runs")
    return wholemodel.run_all(device, small=(device.type != "cuda" or args.whole_model_small), timer=timer, log=log,
                              args=args)


def _timing_settings(timer: Timer, args, device: torch.device) -> Dict:
    return {"method": timer.method, "warmup": args.warmup, "rep_ms": args.rep_ms, "min_reps": args.min_reps,
            "max_reps": args.max_reps, "compile_mode": args.compile_mode,
            "allow_tf32_matmul": allow_tf32(),
            "peak_mem": ("torch.cuda.max_memory_allocated during one call, minus what was allocated before "
                         "the provider's tensors were made (inputs, parameters and saved tensors count)"
                         if device.type == "cuda" else
                         "CPU estimate: peak live tensor storage seen by a dispatch mode during one call "
                         "(inputs, parameters and saved tensors count; scratch inside kernels does not)")}


def _results(env: Dict, command: str, now: _dt.datetime, device: torch.device, timer: Timer, args,
             runnable: Sequence[str], skipped: List[Dict], rows: List[Dict], whole: List[Dict], t_start: float,
             load_start: Optional[float], traffic: List[Dict]) -> Dict:
    """The results file's content (schema SCHEMA_VERSION)."""
    import kasa_kernels

    backends = {k: {"usable": v.available, "reason": v.reason} for k, v in kasa_kernels.backends(device).items()}
    if device.type == "cpu":  # which fp32 GEMM the torch backend ran: it differs from CPU to CPU
        backends["torch"]["cpu_gemm"] = cpu_mask.gemm_description()
    return {
        "schema": SCHEMA_VERSION,
        **{k: env[k] for k in ("device", "capability", "driver", "torch", "triton", "cuda")},
        "command": command,
        "date": now.strftime("%Y-%m-%d %H:%M:%S"),
        "device_slug": env["device_slug"],
        "device_type": env["device_type"],
        "python": env["python"],
        "host": env["host"],
        "kasa_kernels": kasa_kernels.__version__,
        "backends": backends,
        "timing": _timing_settings(timer, args, device),
        "formulas": {
            "tflops": "base 2MNK (+2MNK for dW of dense_linear in backward); adapter 2Mr(K+N) forward, 4Mr(K+N) "
                      "backward; full = forward + backward",
            "gbps": "compulsory bytes (each operand read once, each result written once) / median time",
        },
        "providers": {n: prov.usable(n, device)[1] for n in runnable},
        "skipped": skipped,
        "rows": rows,
        # bytes per aten op of one forward + backward on this device's path, per case (bench/traffic.py)
        "traffic": traffic,
        "whole_model": whole,
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        # other work on the machine inflates and spreads CPU timings; the 1-minute load average says how much
        "load_avg_1m": {"start": load_start, "end": _load_avg_1m()},
    }


def _write_json(path: str, result: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
        f.write("\n")


def run(args, cases: Sequence[Case], names: Sequence[str], modes: Sequence[str], device: torch.device,
        command: str) -> str:
    t_start = time.perf_counter()
    log = _logger(args.quiet)
    env = environment(device)
    load_start = _load_avg_1m()
    skipped: List[Dict] = []
    runnable = _runnable(names, device, args, log, skipped)
    log(f"kasa-bench on {env['device']}: {len(cases)} cases x {len(modes)} modes x {len(runnable)} providers")
    timer = Timer(device, flush=not args.no_flush)
    budget = getattr(args, "time_budget_s", None)

    def over_budget() -> bool:
        return budget is not None and time.perf_counter() - t_start > budget

    traffic: List[Dict] = []
    rows = _bench_cases(cases, runnable, modes, device, timer, args, log, skipped, t_start, over_budget, traffic)
    whole = _whole_model_runs(device, timer, args, log, skipped, over_budget)
    now = _dt.datetime.now()
    result = _results(env, command, now, device, timer, args, runnable, skipped, rows, whole, t_start, load_start,
                      traffic)
    path = default_out_path(args.out, env, now.strftime("%Y-%m-%d"))
    _write_json(path, result)
    log(f"wrote {path} ({len(rows)} rows, {len(whole)} whole-model rows, {result['elapsed_s']} s)")
    return path
