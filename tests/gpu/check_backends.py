"""The compact correctness suite of a GPU session (tools/gpu_session.sh, stage "correctness").

The triton and cuda backends against python/kasa_reference (tests/helpers.check_against_reference: forward output
and every gradient, the test suite's one tolerance rule), in bf16, fp16 and fp32, at docs/design.md's shape P, at a
decode size and at a ragged real shape (GPT-2's fused attention projection, strided x), with and without dropout;
and with a bitsandbytes-quantized base (nf4 with double quantization, int8), against the reference on bitsandbytes'
own dequantization of it (skipped where bitsandbytes is not installed).
Cases run in order until --budget-s is spent; those left out are listed. Exit status 1 on any failure.

    python tests/gpu/check_backends.py --out $OUT/correctness.md
    python tests/gpu/check_backends.py --dry-run     # CPU: tiny shapes, triton under its interpreter (fp32, fp16)
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
if "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
sys.path[:0] = [os.path.join(HERE, ".."), ROOT, os.path.join(ROOT, "python")]

import torch  # noqa: E402

import helpers  # noqa: E402
import kasa_kernels as kk  # noqa: E402

BACKENDS = ("triton", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# (name, leading dims, K, N, r, dtypes, non-contiguous x). P first: it is what the targets are measured at.
GPU_SHAPES = [
    ("P", (8192,), 4096, 4096, 16, ("bf16",), False),
    ("decode", (64,), 4096, 4096, 16, ("bf16", "fp16", "fp32"), False),
    ("gpt2.c_attn", (2, 150), 768, 2304, 8, ("bf16", "fp16", "fp32"), True),
]
# The interpreter computes fp32 and fp16 only (numpy has no bf16).
CPU_SHAPES = [
    ("P-like", (37,), 40, 24, 4, ("fp32",), False),
    ("decode-like", (5,), 64, 40, 4, ("fp32", "fp16"), False),
    ("ragged", (3, 5), 40, 13, 8, ("fp32", "fp16"), True),
]
# (name, leading dims, K, N, r, dtype, quantized format: an index into tests/quant_cases.FORMATS)
GPU_QUANT = [("P nf4-dq", (8192,), 4096, 4096, 16, "bf16", 1), ("decode int8", (64,), 4096, 4096, 16, "fp16", 4)]
CPU_QUANT = [("nf4-dq", (5,), 72, 40, 4, "fp32", 1)]
DROPOUTS = (0.0, 0.1)


def cases(dry_run: bool):
    for name, lead, k, n, r, dtypes, noncontig in (CPU_SHAPES if dry_run else GPU_SHAPES):
        for dt in dtypes:
            for p in DROPOUTS:
                for backend in BACKENDS:
                    yield name, lead, k, n, r, dt, noncontig, p, backend, None
    for name, lead, k, n, r, dt, fmt in (CPU_QUANT if dry_run else GPU_QUANT):
        for backend in BACKENDS:
            yield name, lead, k, n, r, dt, False, 0.1, backend, fmt


def quantized(case, fmt: int, device):
    """The case with W quantized by bitsandbytes (on the CPU) in format FORMATS[fmt], and bitsandbytes' own fp32
    dequantization of it for the reference."""
    from kasa_kernels.ops.quant_weight import TENSOR_FIELDS
    from quant_cases import FORMATS, bnb_dequantize, quantize

    x, w, b, a, d, bb, gy = case
    q = quantize(FORMATS[fmt], w.float().cpu())
    w_ref = bnb_dequantize(q).to(device)
    q = q._replace(**{f: getattr(q, f).to(device) for f in TENSOR_FIELDS if getattr(q, f) is not None})
    return (x, q, b, a, d, bb, gy), w_ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton's interpreter")
    ap.add_argument("--budget-s", type=float, default=None, help="start no case after this many seconds")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    usable = kk.backends(device)
    t0 = time.perf_counter()
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [f"# Correctness against python/kasa_reference on {where}",
             "", f"`python tests/gpu/check_backends.py {' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "| shape | M, K, N, r | dtype | p | backend | result | s |", "|---|---|---|---:|---|---|---:|"]
    failed = 0
    try:
        import bitsandbytes  # noqa: F401
        no_bnb = None
    except ImportError:
        no_bnb = "bitsandbytes is not installed"
    for name, lead, k, n, r, dt, noncontig, p, backend, fmt in cases(args.dry_run):
        m = 1
        for v in lead:
            m *= v
        head = f"| {name} | {m}, {k}, {n}, {r} | {dt} | {p:g} | {backend} |"
        if not usable[backend].available or (fmt is not None and no_bnb):
            lines.append(f"{head} skipped: {usable[backend].reason if not usable[backend].available else no_bnb} | |")
            continue
        if args.budget_s is not None and time.perf_counter() - t0 > args.budget_s:
            lines.append(f"{head} not run: the {args.budget_s:g} s budget was spent | |")
            continue
        t = time.perf_counter()
        dtype = DTYPES[dt]
        try:
            case = helpers.make_case(lead, k, n, r, dtype, torch.float32, bias=True, noncontig=noncontig,
                                     device=device)
            w_ref = None
            if fmt is not None:
                case, w_ref = quantized(case, fmt, device)
            helpers.check_against_reference(case, scaling=2.0, p=p, backend=backend, weight_ref=w_ref)
            result = "ok"
        except Exception as e:  # noqa: BLE001 -- every case reports, the first failure does not end the run
            failed += 1
            result = "FAILED: " + "".join(traceback.format_exception_only(type(e), e)).strip().replace("|", "/")[:300]
        if device.type == "cuda":
            torch.cuda.synchronize()
        lines.append(f"{head} {result} | {time.perf_counter() - t:.1f} |")
        print(lines[-1], flush=True)
    lines += ["", f"{failed} failed; {time.perf_counter() - t0:.0f} s in all."]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
