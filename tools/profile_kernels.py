"""Where the time goes: per-kernel device time of kasa-bench providers at one shape, from torch.profiler.

docs/design.md's targets are ratios (fused forward / T_mm, fused forward+backward / T_frozen, ...). When one is missed,
this says which launch takes the difference: each provider's forward (or full step) is run `--iters` times under
torch.profiler after `--warmup` untimed calls (Triton autotuning and torch.compile happen there), and every device
kernel's total time is divided by the iteration count. The providers and their tensors are kasa-bench's own
(kasa_kernels.bench.providers.build), so a profile describes exactly what the benchmark timed, minus the L2 flush.

    python tools/profile_kernels.py                                   # P, bf16, forward + full, the GPU providers
    python tools/profile_kernels.py --shape 64,4096,4096,16 --modes forward --providers cublas_linear,triton
    python tools/profile_kernels.py --dropout 0,0.1 --out $OUT/profile.md   # P with and without dropout, to a file

On CPU (no GPU) it profiles CPU operators instead, which only shows that the tool runs.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kasa_kernels.bench import providers as prov  # noqa: E402
from kasa_kernels.bench.run import _mode_callable, _supports  # noqa: E402
from kasa_kernels.bench.shapes import P, parse_shape  # noqa: E402

# Profiled by default on a GPU: every provider of the registry but these (ask for them with --providers): the dense
# layer (no docs/design.md ratio uses it), PEFT's layer and torch.compile (unsloth_style stands for the unfused
# compositions). On CPU, where no fused kernel runs: the two references (T_mm, T_frozen) and the torch backend.
NOT_BY_DEFAULT = ("dense_linear", "peft", "torch_compile")
GPU_DEFAULT = ",".join(n for n in prov.PROVIDERS if n not in NOT_BY_DEFAULT)
CPU_DEFAULT = ",".join(prov.names(prov.BASELINE_GEMM, prov.FROZEN_LAYER, prov.OURS_TORCH))


def profile_one(name: str, mode: str, case, device: torch.device, warmup: int,
                iters: int) -> List[Tuple[str, int, float]]:
    """[(kernel or op name, calls per iteration, us per iteration)] for provider `name` in `mode`."""
    state = prov.build(name, case, device)
    fn, prepare, _keep = _mode_callable(state, mode)

    def step():
        if prepare is not None:
            prepare()
        fn()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    acts = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    rows: Dict[str, List[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if device.type == "cuda":
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = float(e.time_range.elapsed_us())  # a device event's range is the kernel's own duration
        else:
            if e.cpu_parent is not None:  # top-level CPU operators only
                continue
            us = float(e.cpu_time_total)
        rows[e.name][0] += 1
        rows[e.name][1] += us
    out = [(k, round(v[0] / iters), v[1] / iters) for k, v in rows.items()]
    return sorted(out, key=lambda t: -t[2])


def _short(name: str, width: int = 90) -> str:
    name = name.replace("|", "/")
    return name if len(name) <= width else name[: width - 3] + "..."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=None, help="M,K,N,r (default: docs/design.md's P, 8192,4096,4096,16)")
    ap.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--dropout", default="0", help="comma list: one profile per dropout (default 0)")
    ap.add_argument("--modes", default="forward,full")
    ap.add_argument("--providers", default=None)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    shape = args.shape or ",".join(str(P[k]) for k in ("M", "K", "N", "r"))
    cases = parse_shape(shape, [float(p) for p in args.dropout.split(",")], [dtype])
    names = (args.providers or (GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT)).split(",")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Per-kernel time on {where}", "",
             f"`python tools/profile_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
             f"(torch {torch.__version__}; {args.iters} profiled iterations after {args.warmup} warm-up calls; "
             "no L2 flush, so totals run a little under kasa-bench's medians)", ""]
    for case in cases:
        lines += ["", f"# {case}"]
        for mode in args.modes.split(","):
            for name in names:
                ok, why = prov.usable(name, device)
                if not ok or not _supports(name, mode):
                    lines.append(f"- {name} / {mode}: skipped ({why or 'forward-only provider'})")
                    continue
                rows = profile_one(name, mode, case, device, args.warmup, args.iters)
                total = sum(r[2] for r in rows)
                lines += ["", f"## {name}, {mode}: {total:.1f} us per iteration", "",
                          "| kernel | calls | us | share |", "|---|---:|---:|---:|"]
                lines += [f"| {_short(k)} | {c} | {us:.1f} | {us / total:.1%} |" for k, c, us in rows if total > 0]
                print("\n".join(lines[-(len(rows) + 4):]), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
