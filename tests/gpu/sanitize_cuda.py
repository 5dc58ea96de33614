"""Run every kernel of the cuda backend once at the test shapes, for compute-sanitizer:

    compute-sanitizer --tool memcheck python tests/gpu/sanitize_cuda.py
    compute-sanitizer --tool racecheck python tests/gpu/sanitize_cuda.py --quick

Covers fp32 (FFMA and TF32), fp16, bf16; fp32 adapters beside low-precision activations; bias on/off; dropout on/off;
rows that are not 16-byte aligned (element loads) and non-unit column strides; deterministic and atomic reductions;
decode sizes (split-K shrink, column-sliced dY pass, row-sliced dA); the adapter-off base_gemm; the regularizer in
both forms.
Exits non-zero on the first CUDA error; the sanitizer reports any out-of-bounds or misaligned access.
"""
import argparse
import itertools

import torch

from kasa_kernels import _backend
from kasa_kernels.ops import cuda as cuda_ext
from kasa_kernels.ops import defs
from kasa_kernels.ops.rng import make_seed

# (M, K, N, r). The last three are decode sizes: the shrink splits K, the dY pass splits N into many column slices
# (partials and their ordered sum), dA splits M; r = 40 takes two rank tiles. On sm80/sm90 the 16-bit backward's
# rank-r kernels run on TF32 tensor cores (ldmatrix), elsewhere FFMA; the GEMM takes the 128 x 256 tile on sm80.
SHAPES = [(1, 7, 5, 1), (7, 37, 130, 4), (37, 130, 37, 16), (39, 64, 96, 8), (130, 136, 264, 33), (257, 520, 300, 24),
          (1, 4099, 64, 16), (16, 4096, 72, 40), (64, 136, 4096, 24)]


def run_linear(m, k, n, r, dtype, adapter_dtype, bias, p, strided, seed):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    if strided:  # rows padded (row stride != K: not 16-byte aligned) for x and W, every other column for grad_y
        x = torch.randn(m, k + 3, device=dev, generator=g).to(dtype)[:, :k]
        gy = torch.randn(m, 2 * n, device=dev, generator=g).to(dtype)[:, ::2]
    else:
        x = torch.randn(m, k, device=dev, generator=g).to(dtype)
        gy = torch.randn(m, n, device=dev, generator=g).to(dtype)
    w = (torch.randn(n, k + 3 * strided, device=dev, generator=g) / k**0.5).to(dtype)[:, :k]
    b = torch.randn(n, device=dev, generator=g).to(dtype) if bias else None
    a = (torch.randn(r, k, device=dev, generator=g) / k**0.5).to(adapter_dtype)
    d = torch.randn(r, device=dev, generator=g).to(adapter_dtype)
    bb = torch.randn(n, r, device=dev, generator=g).to(adapter_dtype)
    y, h = defs.linear_forward("cuda", x, w, b, a, d, bb, 2.0, p, seed)
    grads = defs.linear_backward("cuda", gy, x, w, a, d, bb, h, 2.0, p, seed, (True, True, True, True))
    y0 = defs.base_gemm("cuda", x, w, b)  # the adapter-off GEMM kasa-bench's cuda_gemm times
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(y0).all() and all(torch.isfinite(t).all() for t in grads)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one dtype combination per shape (for slow tools)")
    args = ap.parse_args()
    ok, why = cuda_ext.probe(torch.device("cuda"))
    assert ok, why
    _backend.load("cuda")
    seed = make_seed(12345, torch.device("cuda"))
    combos = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
              (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    n_runs = 0
    for shape in SHAPES:
        for (dtype, adt), bias, p, strided, tf32, det in itertools.product(
            combos[:1] + combos[2:3] if args.quick else combos, (True, False), (0.0, 0.3), (False, True),
            (False, True), (False, True),
        ):
            if tf32 and dtype != torch.float32:
                continue
            if args.quick and (strided or det) and not bias:
                continue
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.use_deterministic_algorithms(det)
            run_linear(*shape, dtype, adt, bias, p, strided, seed)
            n_runs += 1
    torch.use_deterministic_algorithms(False)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(1)
        shapes = [(4, 10, 7), (16, 130, 37), (33, 70, 260), (8, 520, 96), (1, 1, 1)]
        As = [torch.randn(r, k, generator=g).to(dtype).cuda() for r, k, n in shapes]
        Bs = [torch.randn(n, r, generator=g).to(dtype).cuda() for r, k, n in shapes]
        ds = [torch.randn(r, generator=g).to(dtype).cuda() for r, k, n in shapes]
        for form in ("paper", "official"):
            loss, *_ = defs.regularizer("cuda", As, Bs, ds, 1e-4, 1e-3, form)
            torch.cuda.synchronize()
            assert torch.isfinite(loss)
            n_runs += 1
    print(f"sanitize_cuda: {n_runs} configurations ran without a CUDA error")


if __name__ == "__main__":
    main()
