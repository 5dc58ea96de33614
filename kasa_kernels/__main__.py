"""python -m kasa_kernels: print the environment and self-check every usable backend against the reference.

Exit status 0 when every usable backend agrees with python/kasa_reference on a small shape, 1 otherwise.
"""
from __future__ import annotations

import platform
import sys
import warnings

import torch


def _versions() -> list:
    lines = [f"python       {platform.python_version()} ({sys.executable})", f"torch        {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton       {triton.__version__}")
    except ImportError as e:
        lines.append(f"triton       not importable ({e})")
    lines.append(f"torch CUDA   {torch.version.cuda or 'none (CPU build)'}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}        {p.name}, sm{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
    else:
        lines.append("GPU          none visible to torch")
    return lines


def _self_check(backend: str, device: torch.device) -> tuple:
    """Forward and every gradient of a small odd-shaped layer (fp32, bias, dropout off and on) against the
    float64 reference. Returns (ok, worst relative error)."""
    import kasa_reference as ref

    from . import kasa_linear
    from .ops.rng import keep_mask, make_seed

    g = torch.Generator().manual_seed(0)
    m, k, n, r, s = 37, 45, 29, 5, 2.0
    tensors = [torch.randn(*shape, generator=g) for shape in ((m, k), (n, k), (n,), (r, k), (r,), (n, r))]
    worst = 0.0
    for p in (0.0, 0.25):
        x, w, b, a, d, bb = (t.to(device) for t in tensors)
        x.requires_grad_(True)
        params = [t.clone().requires_grad_(True) for t in (a, d, bb)]
        seed = make_seed(1234, device)
        y = kasa_linear(x, w, b, *params, s, dropout_p=p, training=True, backend=backend, dropout_seed=seed)
        gy = torch.randn(y.shape, generator=g).to(device)
        got = [y] + list(torch.autograd.grad(y, [x] + params, gy))
        x64 = x.detach().double().cpu().requires_grad_(True)
        p64 = [t.detach().double().cpu().requires_grad_(True) for t in params]
        mask = keep_mask(seed, m, k, p).cpu() if p > 0 else None
        y64 = ref.kasa_linear_ref(x64, w.double().cpu(), b.double().cpu(), *p64, s, dropout_mask=mask, dropout_p=p)
        want = [y64] + list(torch.autograd.grad(y64, [x64] + p64, gy.double().cpu()))
        for got_t, want_t in zip(got, want):
            err = (got_t.detach().double().cpu() - want_t).abs().max() / want_t.abs().max().clamp_min(1e-30)
            worst = max(worst, err.item())
    # fp32 with fp32 accumulation (TF32 may be on for GPU matmuls): a few 1e-4 at most on these sizes.
    return worst < 5e-3, worst


def main(argv=None) -> int:
    from . import __version__, backends

    print(f"kasa_kernels {__version__}")
    for line in _versions():
        print(line)
    from .ops import cpu_mask

    with warnings.catch_warnings():  # the build's warning is printed below, as the reason
        warnings.simplefilter("ignore")
        built = cpu_mask.available()
    print("CPU kernels (dropout masks, rank-r dY pass, fp32 GEMM): " + (
        "C (ops/cpu_mask.c, cpu_rank.c, cpu_gemm.c, built)" if built else
        f"torch forms (ops/cpu_mask.c, cpu_rank.c, cpu_gemm.c did not build: {cpu_mask.build_error()})"))
    if built:
        print(f"  fp32 GEMM on CPU: {cpu_mask.gemm_description()}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    ok_all = True
    for device in devices:
        print(f"\nbackends on {device.type}:")
        for info in backends(device).values():
            print(f"  {info}")
        for info in backends(device).values():
            if not info.available:
                continue
            try:
                ok, err = _self_check(info.name, device)
            except Exception as e:  # report and go on: the point is a diagnosis
                ok, err = False, float("nan")
                print(f"  self-check {info.name:6s} on {device.type}: FAILED with {type(e).__name__}: {e}")
                ok_all = False
                continue
            ok_all &= ok
            print(f"  self-check {info.name:6s} on {device.type}: {'ok' if ok else 'FAILED'} (max relative error {err:.2e} vs fp64 reference)")
    print("\nall usable backends agree with the reference" if ok_all else "\nSELF-CHECK FAILED")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
