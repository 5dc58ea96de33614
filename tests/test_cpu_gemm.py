"""ops/cpu_gemm.c, the torch backend's fp32 GEMM on CPU with the rank-r term as extra k-steps (cpu_mask.gemm), and
the layer where it runs. Each product is checked against fp64 within tests/helpers.py's bound, whose reference is
torch's own fp32 GEMM (MKL's on x86) of the same formula.

The torch backend takes this GEMM only on CPUs where it measured faster (cpu_mask.gemm_preferred: AMD with AVX2);
these tests call it directly, or force it on, so they hold it to the reference on every x86 CPU with AVX2 and FMA,
Intel ones included."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_close_to_reference, check_against_reference, make_case, torch_threads


def _require_gemm():
    from kasa_kernels.ops import cpu_mask

    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler: the CPU kernels cannot be built here")
    assert cpu_mask.available(), f"a C compiler is present but the CPU kernels did not build: {cpu_mask._error}"
    if ("gemm", "f32") not in cpu_mask._lib:
        pytest.skip("ops/cpu_gemm.c needs AVX2 and FMA, which this CPU (or compiler target) lacks")
    return cpu_mask


def _check(name, got, a, b, bias=None, left=None, right=None, alpha=1.0):
    """got against fp64 within the bound of torch's fp32 form of the same product (F.linear-style addmm)."""
    a64, b64 = a.double(), b.double()
    ref64 = a64 @ b64
    mag = a64.abs() @ b64.abs()
    ref32 = a @ b
    if bias is not None:
        ref64, mag, ref32 = ref64 + bias.double(), mag + bias.double().abs(), ref32 + bias
    if left is not None:
        ref64 = ref64 + alpha * (left.double() @ right.double())
        mag = mag + abs(alpha) * (left.double().abs() @ right.double().abs())
        ref32 = ref32.addmm(left, right, alpha=alpha)
    assert_close_to_reference(name, got, ref64, ref32, torch.float32, magnitude=mag)


# (M, K, N, r): a single element; sizes that are no multiple of the 6 x 16 tile, the 8-wide transposes or the
# 256-deep k-blocks (a lone last row, a last k-block of 1, 3 or 257 - 256); K over two k-blocks; N over the 2048-wide
# column block (two column blocks, the second narrow); the widest rank; full 72-row blocks of full 256-deep k-blocks
# on every thread (A's packing buffer filled to its end, where its overlapping stores need their slack)
SHAPES = [(1, 1, 1, 1), (7, 9, 17, 3), (13, 257, 33, 16), (100, 515, 40, 8), (61, 300, 2065, 16), (37, 64, 48, 64),
          (432, 512, 24, 4)]


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_matches_torch_within_its_error(shape, threads):
    """Forward's form (B = W^T, the transposing packer) and backward's (B = W), with and without bias and rank-r
    term; 1-3 threads (3 splits the row panels unevenly)."""
    cpu_mask = _require_gemm()
    m, k, n, r = shape
    gen = torch.Generator().manual_seed(m * 1000 + n)
    a = torch.randn(m, k, generator=gen)
    w_fwd, w_bwd = torch.randn(n, k, generator=gen), torch.randn(k, n, generator=gen)
    bias = torch.randn(n, generator=gen)
    left, right = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    with torch_threads(threads):
        for form, b in (("x W^T", w_fwd.t()), ("G W", w_bwd)):
            _check(f"{form} + b + s L R", cpu_mask.gemm(a, b, bias, left, right, 0.37), a, b, bias, left, right,
                   0.37)
            _check(f"{form}", cpu_mask.gemm(a, b), a, b)
            _check(f"{form} + L R", cpu_mask.gemm(a, b, left=left, right=right), a, b, left=left, right=right)


def test_gemm_takes_any_strides():
    """Operands that are transposed or sliced views (the packers' general paths) give the same product."""
    cpu_mask = _require_gemm()
    gen = torch.Generator().manual_seed(3)
    m, k, n, r = 70, 300, 50, 16
    a = torch.randn(k, m + 5, generator=gen)[:, 2:m + 2].t()  # column-major with an offset
    b = torch.randn(n + 3, k * 2, generator=gen)[1:n + 1, ::2].t()  # neither stride 1
    left = torch.randn(r, m, generator=gen).t()
    right = torch.randn(n, r, generator=gen).t()
    assert a.stride(1) != 1 and 1 not in b.stride()
    _check("strided", cpu_mask.gemm(a, b, None, left, right, -1.5), a, b, None, left, right, -1.5)


def _raw_gemm(cpu_mask, a, b, c, ldc, left=None, right=None, threads=1):
    fn = cpu_mask._lib[("gemm", "f32")]
    m, k = a.shape
    n = b.shape[1]
    r = 0 if left is None else left.shape[1]
    return fn(m, n, k, a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), None, r,
              None if left is None else left.data_ptr(), *(left.stride() if r else (0, 0)),
              None if right is None else right.data_ptr(), *(right.stride() if r else (0, 0)), 1.0,
              c.data_ptr(), ldc, threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_gemm_writes_only_its_output(threads):
    """With rows wider than N (ldc > N) and guard rows around C, every element outside the M x N product keeps its
    canary: the partial tiles (M and N no multiple of 6 and 16) write only their rows and columns."""
    cpu_mask = _require_gemm()
    gen = torch.Generator().manual_seed(4)
    m, k, n, r, ldc = 23, 40, 37, 4, 45
    a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
    left, right = torch.randn(m, r, generator=gen), torch.randn(r, n, generator=gen)
    buf = torch.full((m + 2, ldc), 1234.5)
    c = buf[1:m + 1]
    assert _raw_gemm(cpu_mask, a, b, c, ldc, left, right, threads) == 0
    _check("inside", c[:, :n], a, b, left=left, right=right)
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[1:m + 1, :n] = False
    assert (buf[outside] == 1234.5).all()


def test_gemm_refuses_bad_arguments_without_writing():
    """The C entry point's own checks (the Python wrapper's come first): a non-positive size, ldc < N, a rank over
    the maximum or a rank-r term without its operands give -1 and leave C alone."""
    cpu_mask = _require_gemm()
    fn = cpu_mask._lib[("gemm", "f32")]
    a, b = torch.randn(4, 5), torch.randn(5, 6)
    c = torch.full((4, 6), 7.0)
    base = [4, 6, 5, a.data_ptr(), 5, 1, b.data_ptr(), 6, 1, None, 0, None, 0, 0, None, 0, 0, 1.0, c.data_ptr(), 6, 1]

    def call(**change):
        args = list(base)
        for i, v in change.items():
            args[int(i[1:])] = v
        return fn(*args)

    assert call(i0=0) == -1 and call(i1=-3) == -1 and call(i2=0) == -1  # M, N, K
    assert call(i19=5) == -1  # ldc < N
    assert call(i10=cpu_mask.GEMM_MAX_RANK + 1, i11=a.data_ptr(), i14=b.data_ptr()) == -1  # rank too wide
    assert call(i10=2) == -1  # a rank-r term without L and R
    assert (c == 7.0).all()
    assert call() == 0 and torch.allclose(c, a @ b, atol=1e-5)


def test_gemm_declines_what_it_does_not_cover():
    """None (the caller runs torch's GEMM) for: another dtype, meta tensors, mismatched shapes, a rank over
    GEMM_MAX_RANK, half a rank-r term, a strided bias, a dispatch mode (the traffic counter's, fake tensors)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    cpu_mask = _require_gemm()
    a, b, bias = torch.randn(8, 5), torch.randn(5, 6), torch.randn(6)
    left, right = torch.randn(8, 2), torch.randn(2, 6)
    assert cpu_mask.gemm(a, b, bias, left, right) is not None
    assert cpu_mask.gemm(a.double(), b.double()) is None
    assert cpu_mask.gemm(a.bfloat16(), b.bfloat16()) is None
    assert cpu_mask.gemm(a.to("meta"), b.to("meta")) is None
    assert cpu_mask.gemm(a, b[:4]) is None
    assert cpu_mask.gemm(a, b, torch.randn(5)) is None
    assert cpu_mask.gemm(a, b, torch.randn(12)[::2]) is None
    assert cpu_mask.gemm(a, b, left=left) is None and cpu_mask.gemm(a, b, right=right) is None
    assert cpu_mask.gemm(a, b, left=left[:7], right=right) is None
    wide = cpu_mask.GEMM_MAX_RANK + 1
    assert cpu_mask.gemm(a, b, left=torch.randn(8, wide), right=torch.randn(wide, 6)) is None
    assert cpu_mask.gemm(torch.randn(0, 5), b) is None

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert cpu_mask.gemm(a, b) is None


def test_gemm_splits_rows_over_the_team_it_gets():
    """Asked for more threads than the OpenMP runtime gives (OMP_THREAD_LIMIT=1 here; a call from inside another
    parallel region is the same), the rows split over the threads that run: every row is computed. A fresh process,
    as the limit is read when the runtime starts."""
    _require_gemm()
    code = (
        "import torch\n"
        "from kasa_kernels.ops import cpu_mask\n"
        "torch.manual_seed(0)\n"
        "a, b = torch.randn(97, 300), torch.randn(300, 40)\n"
        "torch.set_num_threads(2)\n"
        "c = cpu_mask.gemm(a, b)\n"
        "err = ((c.double() - a.double() @ b.double()).abs() / (a.double().abs() @ b.double().abs())).max()\n"
        "print(float(err))\n")
    env = dict(os.environ, OMP_THREAD_LIMIT="1", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_gemm_preference_follows_the_environment(monkeypatch):
    from kasa_kernels.ops import cpu_mask

    for value, want in (("1", True), ("0", False)):
        monkeypatch.setattr(cpu_mask, "_gemm_preferred", None)
        monkeypatch.setenv(cpu_mask.GEMM_ENV, value)
        assert cpu_mask.gemm_preferred() is want
        assert cpu_mask._gemm_forced is want
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", None)
    monkeypatch.setenv(cpu_mask.GEMM_ENV, "yes")
    with pytest.raises(ValueError, match=r"KASA_KERNELS_CPU_GEMM must be 0 or 1, got 'yes'"):
        cpu_mask.gemm_preferred()
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", None)
    monkeypatch.delenv(cpu_mask.GEMM_ENV)
    with open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else open(os.devnull) as f:
        info = f.read()
    amd_avx2 = "AuthenticAMD" in info and " avx2" in info and " fma" in info
    assert cpu_mask.gemm_preferred() is amd_avx2
    assert not cpu_mask._gemm_forced


def test_gemm_description_says_which_gemm_runs_and_how_to_change_it(monkeypatch):
    cpu_mask = _require_gemm()
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", True)
    monkeypatch.setattr(cpu_mask, "_gemm_forced", False)
    assert cpu_mask.gemm_description() == (
        "ops/cpu_gemm.c from 2^24 multiply-adds, at up to 2 torch threads (this CPU; $KASA_KERNELS_CPU_GEMM=0 turns "
        "it off)")
    monkeypatch.setattr(cpu_mask, "_gemm_forced", True)
    assert cpu_mask.gemm_description() == "ops/cpu_gemm.c from 2^24 multiply-adds ($KASA_KERNELS_CPU_GEMM=1)"
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", False)
    monkeypatch.setattr(cpu_mask, "_gemm_forced", False)
    assert cpu_mask.gemm_description().startswith("torch's (ops/cpu_gemm.c is built but not preferred")
    monkeypatch.setattr(cpu_mask, "_lib", {k: v for k, v in cpu_mask._lib.items() if k != ("gemm", "f32")})
    assert cpu_mask.gemm_description() == "torch's (ops/cpu_gemm.c needs AVX2 and FMA)"


def test_gemm_is_wanted_only_where_it_was_measured(monkeypatch):
    """Preferred by the CPU: large enough products, at up to GEMM_MAX_THREADS torch threads; asked for by the
    environment: at any thread count; never on meta tensors (the traffic counter) or below GEMM_MIN_MACS."""
    cpu_mask = _require_gemm()
    x = torch.empty(1)
    big = round(cpu_mask.GEMM_MIN_MACS ** (1 / 3)) + 1
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", True)
    monkeypatch.setattr(cpu_mask, "_gemm_forced", False)
    with torch_threads(1):
        assert cpu_mask.gemm_wanted(x, big, big, big)
        assert not cpu_mask.gemm_wanted(x, big, big, 1)
        assert not cpu_mask.gemm_wanted(x.to("meta"), big, big, big)
    with torch_threads(cpu_mask.GEMM_MAX_THREADS + 1):
        assert not cpu_mask.gemm_wanted(x, big, big, big)
        monkeypatch.setattr(cpu_mask, "_gemm_forced", True)
        assert cpu_mask.gemm_wanted(x, big, big, big)
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", False)
    monkeypatch.setattr(cpu_mask, "_gemm_forced", False)
    with torch_threads(1):
        assert not cpu_mask.gemm_wanted(x, big, big, big)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_layer_on_the_c_gemm_matches_the_reference(monkeypatch, p, dtype, bias):
    """The whole layer with the C GEMM forced on: forward's Y (its rank-r term and bias inside) and backward's dx
    (its rank-r term inside without dropout; with dropout the GEMM alone, the masked term added after), within the
    reference's bound, and both GEMMs ran wherever the operand dtype is fp32 (fp32 layers; bf16 ones on a CPU
    without bf16 GEMM kernels)."""
    from kasa_kernels.ops import cpu_mask
    from kasa_kernels.ops.precision import operand_dtype

    _require_gemm()
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", True)
    monkeypatch.setattr(cpu_mask, "_gemm_forced", True)  # at any thread count
    monkeypatch.setattr(cpu_mask, "GEMM_MIN_MACS", 0)
    ran = []
    real = cpu_mask.gemm

    def spy(*a, **kw):
        out = real(*a, **kw)
        ran.append((out is not None, kw.get("left") is not None or len(a) > 3))
        return out

    monkeypatch.setattr(cpu_mask, "gemm", spy)
    case = make_case((3, 35), 96, 200, 16, dtype, torch.float32, bias=bias)
    check_against_reference(case, p=p)
    if operand_dtype(case[0]) == torch.float32:
        # forward with its rank-r term; backward's dx with it only without dropout
        assert ran == [(True, True), (True, p == 0.0)]
    else:
        assert ran == []


def test_layer_takes_torch_gemms_where_the_c_gemm_is_not_preferred(monkeypatch):
    from kasa_kernels.ops import cpu_mask

    _require_gemm()
    monkeypatch.setattr(cpu_mask, "_gemm_preferred", False)
    monkeypatch.setattr(cpu_mask, "GEMM_MIN_MACS", 0)
    calls = []
    monkeypatch.setattr(cpu_mask, "gemm", lambda *a, **kw: calls.append(1))
    check_against_reference(make_case((40,), 64, 48, 8, torch.float32))
    assert calls == []

