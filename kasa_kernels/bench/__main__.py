"""kasa-bench: microbenchmarks of KaSA layers, provider by provider, and reports across GPUs.

    kasa-bench                              # = kasa-bench run: the P preset on a GPU, the CPU subset without one
    kasa-bench run --preset sweep --out benchmarks/results
    kasa-bench run --providers cublas_linear,frozen_linear,triton --modes forward,full --dtype bf16
    kasa-bench report benchmarks/results/nvidia-a100*/2026-*.json benchmarks/results/nvidia-geforce-rtx-3090/*.json
    kasa-bench traffic                      # bytes per aten op at P, p = 0 and 0.1, every device path (meta tensors)
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from typing import List, Optional, Sequence

from . import providers as prov
from ..ops.precision import PATHS, device_path
from .shapes import DTYPES, P, PRESETS, preset_cases, parse_shape

SUBCOMMANDS = ("run", "report", "traffic")


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="kasa-bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="time providers x modes x shapes and write a results JSON (the default)")
    r.add_argument("--preset", choices=PRESETS, default=None,
                   help="cpu: CPU subset, fp32 and bf16 (default without a GPU); p: shape P and decode sizes "
                        "(default on a GPU); sweep: M, r, dropout and model (K, N) sweeps; full: sweep x "
                        "bf16/fp16/fp32")
    r.add_argument("--providers", default=None,
                   help=f"comma list from {','.join(prov.PROVIDERS)} (default: all; unusable ones are recorded "
                        "as skipped with the reason)")
    r.add_argument("--modes", default="forward,backward,full", help="comma list of forward,backward,full")
    r.add_argument("--dtype", default=None,
                   help="comma list of bf16,fp16,fp32 (default: the preset's; on a CPU without bf16 GEMM kernels the "
                        "cpu preset leaves its slow bf16 cases out)")
    r.add_argument("--shape", action="append", default=None, metavar="M,K,N,r",
                   help="benchmark this shape instead of the preset's (repeatable)")
    r.add_argument("--dropout", default="0", help="dropout list for --shape cases (default 0)")
    r.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    r.add_argument("--out", default=None,
                   help="a .json path, or a folder: writes <folder>/<device>/<date>.json (default benchmarks/results)")
    r.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per provider and mode before timing (default 3 on CUDA, 2 on CPU)")
    r.add_argument("--rep-ms", type=float, default=None,
                   help="timing budget per provider and mode in ms (default 300 on CUDA, 60 on CPU)")
    r.add_argument("--min-reps", type=int, default=None, help="at least this many timed calls (default 10 / 5 on CPU)")
    r.add_argument("--max-reps", type=int, default=None, help="at most this many timed calls (default 200 / 30 on CPU)")
    r.add_argument("--no-flush", action="store_true", help="do not flush the cache between calls")
    r.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for torch_compile (default: torch's default)")
    wm = r.add_mutually_exclusive_group()
    wm.add_argument("--whole-model", dest="whole_model", action="store_true", default=None,
                    help="also run the whole-model regularizer and training-step benchmarks (default on)")
    wm.add_argument("--no-whole-model", dest="whole_model", action="store_false")
    r.add_argument("--whole-model-small", action="store_true", help="tiny whole-model widths even on a GPU")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new case (or whole-model run) after this many seconds; the results file is still "
                        "written, and the cases left out are listed under 'skipped'")
    r.add_argument("--report", action="store_true", help="render the report next to the results file afterwards")
    r.add_argument("--no-traffic", action="store_true",
                   help="do not count each case's bytes per aten op (kasa-bench traffic, on this device's path)")

    p = sub.add_parser("report", help="render markdown tables and PNG plots from one or more results files")
    p.add_argument("files", nargs="+",
                   help="results JSON files; two or more from different devices go side by side")
    p.add_argument("--out-dir", default=None,
                   help="where to write <name>.md and PNGs (default: next to the first file)")
    p.add_argument("--name", default=None, help="base name of the outputs (default: the results file's name)")
    p.add_argument("--no-plots", action="store_true", help="tables only")

    t = sub.add_parser("traffic", help="count the bytes every aten op of one forward + backward moves, per provider, "
                                       "on meta tensors (no compute), and write a results JSON and its report")
    t.add_argument("--shape", action="append", default=None, metavar="M,K,N,r",
                   help="count this shape (repeatable; default P: 8192,4096,4096,16)")
    t.add_argument("--dropout", default="0,0.1", help="comma list of dropout probabilities (default 0,0.1)")
    t.add_argument("--dtype", default="bf16", help="comma list of bf16,fp16,fp32 (default bf16)")
    t.add_argument("--paths", default=",".join(PATHS),
                   help=f"comma list of the device paths to count, from {','.join(PATHS)} (default: all)")
    t.add_argument("--providers", default=None, help="comma list (default: all; those not counted say why)")
    t.add_argument("--out", default=None,
                   help="a .json path, or a folder: writes <folder>/traffic/<date>.json (default benchmarks/results)")
    return ap


def _resolve_run_args(args):
    import torch

    if args.device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch")
    on_gpu = device.type == "cuda"
    preset = args.preset or ("p" if on_gpu else "cpu")
    dtypes = _csv(args.dtype) if args.dtype else []
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: expected some of {','.join(DTYPES)}, got {d!r}")
    if not on_gpu and any(d != "fp32" for d in dtypes):
        print("note: bf16/fp16 on CPU time CPU emulation paths, not anything a GPU does", file=sys.stderr)
    if args.shape:
        try:
            drops = [float(v) for v in _csv(args.dropout)]
        except ValueError:
            raise SystemExit(f"--dropout: expected a comma list of floats, got {args.dropout!r}") from None
        cases = []
        for s in args.shape:
            try:
                cases += parse_shape(s, drops, dtypes or (["bf16"] if on_gpu else ["fp32"]))
            except ValueError as e:
                raise SystemExit(str(e)) from None
    else:
        cases = preset_cases(preset, dtypes)
        if preset == "cpu" and not dtypes and device_path(device) == "cpu-no-bf16-gemm":
            cases = _without_slow_bf16(cases)
    names = _csv(args.providers) if args.providers else list(prov.PROVIDERS)
    args.explicit_providers = bool(args.providers)
    for n in names:
        if n not in prov.PROVIDERS:
            raise SystemExit(f"--providers: unknown provider {n!r}; expected some of {','.join(prov.PROVIDERS)}")
    modes = _csv(args.modes)
    for m in modes:
        if m not in prov.MODES:
            raise SystemExit(f"--modes: expected some of {','.join(prov.MODES)}, got {m!r}")
    if args.warmup is None:
        args.warmup = 3 if on_gpu else 2
    if args.rep_ms is None:
        args.rep_ms = 300.0 if on_gpu else 60.0
    if args.max_reps is None:
        args.max_reps = 200 if on_gpu else 30
    if args.min_reps is None:
        args.min_reps = 10 if on_gpu else 5
    if args.whole_model is None:
        args.whole_model = preset != "sweep" and not args.shape
    return device, cases, names, modes


def _without_slow_bf16(cases):
    """The CPU subset's default on a CPU without bf16 GEMM kernels (AVX2): its bf16 cases beyond the small layer are
    left out, because torch's fallback bf16 GEMM there makes them take hours for all providers (one forward+backward
    at 512 x 2048 x 2048 took 60 s on a 2-core AMD EPYC, 1 thread, 2026-12-01). `--dtype fp32,bf16` runs them."""
    kept = [c for c in cases if c.dtype != "bf16" or c.tag == "cpu-small"]
    if len(kept) < len(cases):
        print(f"note: this CPU has no bf16 GEMM kernels, so {len(cases) - len(kept)} bf16 cases of the CPU subset "
              "are left out by default (they take hours here); --dtype fp32,bf16 runs them", file=sys.stderr)
    return kept


def _traffic(args, command: str) -> int:
    from . import traffic

    paths = _csv(args.paths)
    for path in paths:
        if path not in PATHS:
            raise SystemExit(f"--paths: expected some of {','.join(PATHS)}, got {path!r}")
    dtypes = _csv(args.dtype)
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtype: expected some of {','.join(DTYPES)}, got {d!r}")
    try:
        drops = [float(v) for v in _csv(args.dropout)]
    except ValueError:
        raise SystemExit(f"--dropout: expected a comma list of floats, got {args.dropout!r}") from None
    if not drops or any(not 0.0 <= d < 1.0 for d in drops):
        raise SystemExit(f"--dropout: expected probabilities in [0, 1), got {args.dropout!r}")
    p_shape = f"{P['M']},{P['K']},{P['N']},{P['r']}"
    try:
        cases = [dataclasses.replace(c, tag="P") if s == p_shape else c
                 for s in (args.shape or [p_shape]) for c in parse_shape(s, drops, dtypes)]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    names = _csv(args.providers) if args.providers else list(prov.PROVIDERS)
    for n in names:
        if n not in prov.PROVIDERS:
            raise SystemExit(f"--providers: unknown provider {n!r}; expected some of {','.join(prov.PROVIDERS)}")
    path = traffic.run(cases, names, paths, command, args.out)
    print(path)
    print(traffic.render(path))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["run"] + argv
    args = build_parser().parse_args(argv)
    command = "kasa-bench " + " ".join(shlex.quote(a) for a in argv)
    if args.cmd == "traffic":
        return _traffic(args, command)
    if args.cmd == "report":
        from .report import render

        outputs = render(args.files, out_dir=args.out_dir, name=args.name, plots=not args.no_plots)
        for path in outputs:
            print(path)
        return 0
    from .run import run

    device, cases, names, modes = _resolve_run_args(args)
    path = run(args, cases, names, modes, device, command)
    print(path)
    if args.report:
        from .report import render

        for out in render([path]):
            print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
