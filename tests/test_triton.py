"""The Triton backend computes docs/math.md's forward, backward and regularizer, checked against python/kasa_reference.

Without a GPU the kernels run under Triton's CPU interpreter (fp32 and fp16 only; tl.dot is exact fp32 there), on
small shapes. With a GPU the same tests run on CUDA tensors, and the `gpu`-marked ones add bf16, TF32, large shapes,
torch.compile with inductor and deterministic bit-identity.
"""
import os
import re
import subprocess
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# Triton decides interpreter or compiler when a function is decorated, and that includes triton.language's own
# helpers (tl.zeros, tl.sum, ...) defined when triton is first imported. So TRITON_INTERPRET=1 must be set before the
# first `import triton` of the process (kasa_kernels imports it through torch._dynamo). It is restored right after, so
# other test files see the environment they expect, and set again per test by the fixture below for the backend probe.
_FIRST_TRITON_IMPORT = "triton" not in sys.modules
if not HAS_CUDA and _FIRST_TRITON_IMPORT:
    _prev = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
try:
    import pytest

    triton = pytest.importorskip("triton")
    import triton.language as tl

    import kasa_kernels as kk
    import kasa_reference as ref
    import helpers
    from helpers import assert_close_to_reference, regularizer_magnitudes
    from kasa_kernels import _backend
    from kasa_kernels.ops import defs, triton_gemm, triton_linear, triton_lowrank
    from kasa_kernels.ops.rng import dropout_threshold, keep_mask, make_seed
    from kasa_kernels.ops.rng_constants import MASK32, MIX_MUL1, MIX_MUL2
    from kasa_kernels.ops.triton_common import Dropout, Target, aot_target, dot_precision, target_of
    from kasa_kernels.ops.triton_common import keep_mask as triton_keep_mask
    from kasa_kernels.ops.triton_gemm import KNView, LowRank
finally:
    if not HAS_CUDA and _FIRST_TRITON_IMPORT:
        if _prev is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _prev

# When another test module imported triton first (compiled mode) on a machine without a GPU, the kernels cannot run
# in this process: every test here is skipped and test_interpreter_suite_in_subprocess runs this file on its own.
INTERPRETER_READY = HAS_CUDA or not isinstance(tl.zeros, triton.runtime.jit.JITFunction)


@pytest.mark.skipif(INTERPRETER_READY, reason="the kernels run in this process")
def test_interpreter_suite_in_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", os.path.abspath(__file__)],
        cwd=os.path.dirname(os.path.abspath(__file__)), env=env, capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, "interpreter tests failed in the subprocess (output above)"
    # a subprocess whose tests all skipped would also exit 0: require the interpreter suite to have run
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= 30, "the interpreter suite did not run in the subprocess"


@pytest.fixture(autouse=True)
def _triton_backend_usable(request, monkeypatch):
    if not INTERPRETER_READY and request.node.name != "test_interpreter_suite_in_subprocess":
        pytest.skip("triton was imported in compiled mode before this module; see test_interpreter_suite_in_subprocess")
    if not HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.clear_cache()
    yield
    _backend.clear_cache()


DTYPES = [torch.float32, torch.float16]
NAMES = helpers.LINEAR_NAMES


def make_case(*args, **kwargs):
    return helpers.make_case(*args, **dict(dict(device=DEVICE), **kwargs))


def run_triton(x, w, b, a, d, bb, gy, scaling, p=0.0, seed=None, training=True):
    return helpers.run_backend(x, w, b, a, d, bb, gy, scaling, p, seed, backend="triton", training=training)


def check_against_reference(case, scaling=2.0, p=0.0):
    helpers.check_against_reference(case, scaling, p, backend="triton")


# (leading dims, K, N, r, bias, non-contiguous x, fp32 adapters)
CASES = [
    ((1,), 13, 40, 1, True, False, False),
    ((7,), 40, 130, 4, False, True, False),
    ((37,), 130, 13, 16, True, False, True),
    ((3, 5), 40, 13, 8, True, True, True),
    ((37,), 130, 40, 100, False, False, False),  # r pads to 128
]


@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}_r{c[3]}_b{int(c[4])}_nc{int(c[5])}_a32{int(c[6])}")
def test_matches_reference(case, dtype, p):
    lead, k, n, r, bias, noncontig, fp32_adapters = case
    adapter_dtype = torch.float32 if fp32_adapters else dtype
    check_against_reference(make_case(lead, k, n, r, dtype, adapter_dtype, bias, noncontig), p=p)


@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("splits", [None, (3, 64), (2, 128)], ids=["natural", "3x64", "2x128"])
def test_split_k_shrink_matches_reference_and_repeats(monkeypatch, splits, p):
    # Decode sizes split the shrink over K (partials summed in a fixed order by shrink_finish_kernel). K = 130 with
    # 64-column splits leaves a last split of 2 columns; "natural" is the launcher's own choice at M = 5, K = 300.
    k = 300 if splits is None else 130
    seen = []
    monkeypatch.setattr(triton_lowrank, "shrink_finish_kernel", _Spy(triton_lowrank.shrink_finish_kernel, seen))
    x, w, b, a, d, bb, gy = case = make_case((5,), k, 24, 4, torch.float32, bias=True)
    seed = make_seed(3, DEVICE)
    h, s = triton_lowrank.shrink(x, a, d, scaling=2.0, dropout=Dropout.of(p, seed), splits=splits)
    assert seen, "the shrink did not split"
    xd = x.double()
    if p > 0:
        xd = xd * keep_mask(seed, 5, k, p).double() / (1.0 - p)
    assert_close_to_reference("H", h, xd @ a.double().T, xd.float() @ a.T, torch.float32,
                              magnitude=xd.abs() @ a.double().abs().T)
    assert torch.equal(s, h * (d * 2.0)), "S != H (s d) in fp32"
    again = triton_lowrank.shrink(x, a, d, scaling=2.0, dropout=Dropout.of(p, seed), splits=splits)
    assert torch.equal(h, again[0]) and torch.equal(s, again[1])
    if splits is None:  # the whole op at the launcher's own split
        check_against_reference(case, p=p)


class _Spy:
    """Counts launches of a Triton kernel: kernel[grid](...) goes through __getitem__."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        self.seen.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
def test_deterministic_mode_matches_and_repeats(deterministic):
    case = make_case((37,), 40, 130, 4, torch.float32, noncontig=True)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        check_against_reference(case, p=0.25)
        first = run_triton(*case, 2.0, 0.25, make_seed(5, case[0].device))
        again = run_triton(*case, 2.0, 0.25, make_seed(5, case[0].device))
    finally:
        torch.use_deterministic_algorithms(prev)
    if deterministic:
        for name, u, v in zip(NAMES, first, again):
            assert torch.equal(u, v), f"{name} differs between two deterministic runs"


@pytest.mark.parametrize("splits", [2, 3])
def test_dy_pass_split_over_n_matches_reference(splits):
    # GPU sizes split the dy pass over N (see triton_lowrank.dy_pass_splits); the test shapes are too small to do it
    # by themselves, so the split is passed in
    n = 130 if splits == 3 else 100
    x, w, b, a, d, bb, gy = make_case((37,), 40, n, 4, torch.float32, noncontig=True)
    h = x @ a.T
    cols = triton.cdiv(triton.cdiv(n, 64), splits) * 64
    gh, db, dd = triton_lowrank.dy_pass(gy, bb, h, d, scaling=2.0, need_db=True, need_dd=True, deterministic=False,
                                        precision="ieee", splits=(triton.cdiv(n, cols), cols))
    G, B, H, D = (t.double() for t in (gy, bb, h, d))
    gz64, gz32, mag_gz = 2.0 * G @ B, 2.0 * gy @ bb, 2.0 * G.abs() @ B.abs()
    assert_close_to_reference("gH", gh, gz64 * D, gz32 * d, torch.float32, magnitude=mag_gz * D.abs())
    assert_close_to_reference("dB", db, 2.0 * G.T @ (H * D), 2.0 * gy.T @ (h * d), torch.float32,
                              magnitude=2.0 * G.abs().T @ (H * D).abs())
    assert_close_to_reference("dd", dd, (gz64 * H).sum(0), (gz32 * h).sum(0), torch.float32,
                              magnitude=(mag_gz * H.abs()).sum(0))


def test_gemm_prune_keeps_configs_that_fit():
    # sm86 (99 KB): fp32 tiles double the pipeline's shared memory; the estimate matches AOT compiles
    assert triton_gemm.smem_bytes(8, 128, 256, 32, 3, 2, 0) == 49152
    assert triton_gemm.smem_bytes(9, 128, 256, 64, 3, 2, 0) == 147456
    assert triton_gemm.smem_bytes(9, 128, 256, 64, 3, 2, 0, tma=True) == 147480  # + 3 mbarriers
    for bm, bn, bk, st, w in triton_gemm.GEMM_CONFIGS[(8, 6)]:
        assert triton_gemm.smem_bytes(8, bm, bn, bk, st, 2, 32) <= 99 * 1024


# ----------------------------------------------------------------------------------------------------------------
# GEMM variants (sm90 autotunes plain, persistent and TMA). Each is forced through gemm_lowrank's `config` argument
# and held to the reference GEMM, in the forward's shape (x W^T + S B^T + b) and in dX's (G W + mask(gH A)).

VARIANTS = {"persistent": (True, False), "tma": (False, True), "persistent_tma": (True, True)}
# (leading dims, K, N, r, bias, non-contiguous x, fp32 adapters)
VARIANT_CASES = [
    ((37,), 40, 24, 4, True, False, False),  # TMA-readable; M, N and K all end in partial tiles
    ((2, 9), 64, 32, 40, False, False, True),  # TMA-readable; whole k tiles, two rank-r steps
    ((37,), 13, 40, 4, True, False, False),  # odd K: x and W rows are not 16-byte multiples, no TMA either way
    ((7,), 40, 24, 4, False, True, False),  # strided x: pointer loads forward, TMA for dX (G and W are readable)
]


def _tma_readable(t):
    """TMA's rule, restated here: unit last stride, 16-byte aligned base and row stride, rows that do not overlap."""
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and (t.stride(-2) * t.element_size()) % 16 == 0
            and t.stride(-2) >= t.shape[-1])


class _LaunchSpy:
    """Stands in for gemm_lowrank_kernel and records the meta-parameters of every launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(kwargs)
            return self.kernel[grid](*args, **kwargs)
        return launch


def _variant_config(persistent, tma, tile=(16, 32, 16, 1, 4)):
    bm, bn, bk, stages, warps = tile
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2, PERSISTENT=persistent, USE_TMA=tma,
                num_stages=stages, num_warps=warps)


def _check_gemm(name, got, a, b, bias, l, lb, mask, dtype):
    """got against a @ b [+ (l @ lb) * mask] [+ bias]: fp64, and the plain formula with a @ b in dtype."""
    main64, main_lp = a.double() @ b.double(), (a @ b).double()
    lr64 = l.double() @ lb.double() * (1.0 if mask is None else mask)
    mag = a.double().abs() @ b.double().abs() + l.double().abs() @ lb.double().abs() * (1.0 if mask is None else mask)
    if bias is not None:
        main64, main_lp, mag = main64 + bias.double(), main_lp + bias.double(), mag + bias.double().abs()
    ref_lp = (main_lp + (l.float() @ lb.float()).double() * (1.0 if mask is None else mask)).to(dtype)
    assert_close_to_reference(name, got, main64 + lr64, ref_lp, dtype, magnitude=mag)


def _run_gemm_variant(case, dtype, p, config):
    """The forward GEMM and the dX GEMM of `case`, each through gemm_lowrank with `config`."""
    x, w, b, a, d, bb, gy = case
    x2d, gy2d = x.reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    m, k = x2d.shape
    n, r = w.shape[0], a.shape[0]
    s = (x2d.float() @ a.float().T) * (d.float() * 2.0)
    y = torch.empty(m, n, dtype=dtype, device=DEVICE)
    triton_gemm.gemm_lowrank(x2d, KNView(w, w.stride(1), w.stride(0)), y, bias=b,
                             lowrank=LowRank(s, KNView(bb, bb.stride(1), bb.stride(0))),
                             precision=dot_precision(dtype, False), lowrank_precision=dot_precision(dtype, True),
                             config=config)
    _check_gemm("forward GEMM", y, x2d, w.T, b, s, bb.float().T, None, dtype)
    gh = torch.randn(m, r, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    seed = make_seed(11, DEVICE)
    mask = keep_mask(seed, m, k, p).double() / (1.0 - p) if p > 0 else None
    dx = torch.empty(m, k, dtype=dtype, device=DEVICE)
    triton_gemm.gemm_lowrank(gy2d, KNView(w, w.stride(0), w.stride(1)), dx,
                             lowrank=LowRank(gh, KNView(a, a.stride(0), a.stride(1))), dropout=Dropout.of(p, seed),
                             precision=dot_precision(dtype, False), lowrank_precision=dot_precision(dtype, True),
                             config=config)
    _check_gemm("dX GEMM", dx, gy2d, w, None, gh, a.float(), mask, dtype)
    return x2d, gy2d


def _check_variant_launches(spy, w, x2d, gy2d, persistent, tma):
    # forward reads x and W; dX reads G and W (TMA only on sm90, or in the interpreter)
    tma_here = tma and (not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9)
    want = [tma_here and _tma_readable(x2d) and _tma_readable(w), tma_here and _tma_readable(gy2d) and _tma_readable(w)]
    assert [k["USE_TMA"] for k in spy.launches] == want
    assert all(k["PERSISTENT"] == persistent for k in spy.launches)


@pytest.mark.parametrize("p", [0.0, 0.25], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", VARIANT_CASES,
                         ids=lambda c: f"{c[0]}x{c[1]}->{c[2]}_r{c[3]}_b{int(c[4])}_nc{int(c[5])}")
@pytest.mark.parametrize("variant", list(VARIANTS), ids=str)
def test_gemm_variant_matches_reference(variant, case, dtype, p, monkeypatch):
    persistent, tma = VARIANTS[variant]
    lead, k, n, r, bias, noncontig, fp32_adapters = case
    spy = _LaunchSpy(triton_gemm.gemm_lowrank_kernel)
    monkeypatch.setattr(triton_gemm, "gemm_lowrank_kernel", spy)
    tensors = make_case(lead, k, n, r, dtype, torch.float32 if fp32_adapters else dtype, bias, noncontig)
    x2d, gy2d = _run_gemm_variant(tensors, dtype, p, _variant_config(persistent, tma))
    _check_variant_launches(spy, tensors[1], x2d, gy2d, persistent, tma)


def test_unaligned_operands_never_choose_tma():
    f16 = dict(dtype=torch.float16, device=DEVICE)
    w = torch.randn(24, 40, **f16)

    def descriptors(a, b, stride_bk, stride_bn, n, k):
        return triton_gemm.tma_descriptors(a, KNView(b, stride_bk, stride_bn), a.shape[0], n, k)

    def fwd(x, w):
        return descriptors(x, w, w.stride(1), w.stride(0), w.shape[0], x.shape[1])

    def dx(g, w):
        return descriptors(g, w, w.stride(0), w.stride(1), w.shape[1], g.shape[1])

    # readable: forward reads W as (N, K) tiles, dX as (K_gemm = N, N_gemm = K) tiles, both straight from W
    a_desc, b_desc = fwd(torch.randn(37, 40, **f16), w)
    assert a_desc.shape == [37, 40] and b_desc.shape == [24, 40] and b_desc.strides == [40, 1]
    a_desc, b_desc = dx(torch.randn(37, 24, **f16), w)
    assert a_desc.shape == [37, 24] and b_desc.shape == [24, 40] and b_desc.strides == [40, 1]
    flat = torch.randn(37 * 40 + 8, **f16)
    unreadable = {
        "odd K": fwd(torch.randn(37, 13, **f16), torch.randn(24, 13, **f16)),
        "strided x": fwd(torch.randn(37, 80, **f16)[:, ::2], w),
        "x at a 2-byte offset": fwd(flat[1:1 + 37 * 40].view(37, 40), w),
        "broadcast grad_y": dx(torch.randn(1, 24, **f16).expand(37, 24), w),
        "odd N in dX": dx(torch.randn(37, 13, **f16), torch.randn(13, 40, **f16)),
        "W with no unit stride": fwd(torch.randn(37, 40, **f16), torch.randn(24, 80, **f16)[:, ::2]),
    }
    for what, descs in unreadable.items():
        assert descs == (None, None), what

    # the autotuner's prune drops every TMA config when the launcher built no descriptors (planned for an H100)
    h100 = Target((9, 0), 132, 227 * 1024)

    class _A:  # what the prune reads of a
        device = torch.device("cuda", 0)

        @staticmethod
        def element_size():
            return 2

    configs = triton_gemm.autotune_configs((9, 0))
    assert {(c.kwargs["PERSISTENT"], c.kwargs["USE_TMA"]) for c in configs} == set(VARIANTS.values()) | {(False, False)}

    def prune(tma_ok, m):
        with aot_target(h100):
            return triton_gemm.prune_configs(configs, dict(a_ptr=_A, M=m, N=4096), TMA_OK=tma_ok, LOWRANK=True,
                                             R_CHUNK=32)

    assert not any(c.kwargs["USE_TMA"] for c in prune(False, 8192))
    assert any(c.kwargs["USE_TMA"] for c in prune(True, 8192))
    assert any(c.kwargs["PERSISTENT"] for c in prune(True, 8192))
    # decode size: at most 64 x 16 tiles, fewer than the SMs: persistent would launch the same programs
    assert not any(c.kwargs["PERSISTENT"] for c in prune(True, 16))
    # decode tiles (BLOCK_M <= 32) only while M <= 64, the others only while M > 32
    for m, want in ((16, {True}), (48, {True, False}), (8192, {False})):
        assert {c.kwargs["BLOCK_M"] <= triton_gemm.DECODE_BLOCK_M for c in prune(True, m)} == want, m
    for arch in ((8, 0), (8, 6)):
        assert not any(c.kwargs["PERSISTENT"] or c.kwargs["USE_TMA"] for c in triton_gemm.autotune_configs(arch))


GPUS = {(9, 0): Target((9, 0), 132, 227 * 1024), (8, 0): Target((8, 0), 108, 163 * 1024),
        (8, 6): Target((8, 6), 82, 99 * 1024)}


class _Bf16:  # what the prune reads of a (bf16 operands on a CUDA device)
    device = torch.device("cuda", 0)

    @staticmethod
    def element_size():
        return 2


@pytest.mark.parametrize("arch", list(GPUS), ids=lambda a: f"sm{a[0]}{a[1]}")
def test_autotune_shortlist_serves_every_launch(arch, monkeypatch):
    # A first GPU session tunes over SHORTLIST only: it must be part of the full space, and leave every launch the
    # prune sees (P and decode; forward, dX, masked dX; TMA-readable operands or not) a config of its own choosing,
    # never the prune's keep-the-smallest fallback, and the masked dX only tiles that fit (masked_dx_fits).
    full = triton_gemm.autotune_configs(arch, "full")
    short = triton_gemm.autotune_configs(arch, "shortlist")
    monkeypatch.setenv(triton_gemm.AUTOTUNE_ENV, "shortlist")
    assert [c.all_kwargs() for c in triton_gemm.autotune_configs(arch)] == [c.all_kwargs() for c in short]
    assert {str(c.all_kwargs()) for c in short} < {str(c.all_kwargs()) for c in full} and len(short) == 3
    for m in (8192, 64, 16):
        for tma_ok in (True, False):
            for masked in (False, True):
                with aot_target(GPUS[arch]):
                    kept = triton_gemm.prune_configs(short, dict(a_ptr=_Bf16, M=m, N=4096), TMA_OK=tma_ok,
                                                     LOWRANK=True, LOWRANK_DROPOUT=masked, R_CHUNK=16)
                what = (m, tma_ok, masked)
                assert kept and all(tma_ok or not c.kwargs["USE_TMA"] for c in kept), what
                decode = {c.kwargs["BLOCK_M"] <= triton_gemm.DECODE_BLOCK_M for c in kept}
                assert decode == ({True} if m <= 32 else {True, False} if m <= 64 else {False}), what
                assert not masked or all(triton_gemm.masked_dx_fits(c) for c in kept), what
    monkeypatch.setenv(triton_gemm.AUTOTUNE_ENV, "short")
    with pytest.raises(ValueError, match="KASA_KERNELS_TRITON_AUTOTUNE: expected 'full' or 'shortlist', got 'short'"):
        triton_gemm.autotune_configs(arch)


def _identity_adapter(m, k, p, seed, dtype=torch.float32, x=None):
    """r = K, A = I, d = 1, s = 1: H = dropout(x) exactly, so H exposes the kernel's mask."""
    x = torch.randn(m, k, dtype=dtype, device=DEVICE) if x is None else x
    w = torch.zeros(8, k, dtype=dtype, device=DEVICE)
    a = torch.eye(k, dtype=torch.float32, device=DEVICE)
    d = torch.ones(k, device=DEVICE)
    bb = torch.randn(8, k, device=DEVICE)
    y, h = triton_linear.linear_forward(x, w, None, a, d, bb, 1.0, p, seed)
    return x, w, a, d, bb, y, h


def _spec_keep(seed, idx, threshold):
    """ops/rng.py's mask spec for one element index, in Python integers (restated here, independently)."""
    def mix32(h):
        h ^= h >> 16
        h = (h * MIX_MUL1) & MASK32
        h ^= h >> 15
        h = (h * MIX_MUL2) & MASK32
        return h ^ (h >> 15)

    s0, s1 = (int(v) for v in seed.tolist())
    return mix32(mix32((idx & MASK32) ^ s0) ^ (idx >> 32) ^ s1) >= threshold


@pytest.mark.parametrize("p", [0.3, 0.9])  # 0.9: threshold above 2**31
def test_mask_index_carries_into_its_high_word(p):
    # The kernels form the element index row * n_cols + col as two 32-bit words. With n_cols = 2**31 - 1 the index
    # crosses 2**32 inside row 2 (at column 2) and 2**33 inside row 4 (at column 4), which no test shape reaches.
    n_cols, rows, cols = 2**31 - 1, 8, 32
    seed = make_seed(2**40 + 12345, DEVICE)

    @triton.jit
    def probe(seed_ptr, out_ptr, n_cols, threshold, ROWS: tl.constexpr, COLS: tl.constexpr):
        offs_r = tl.arange(0, ROWS)
        offs_c = tl.arange(0, COLS)
        keep = triton_keep_mask(seed_ptr, offs_r, offs_c, n_cols, threshold)
        tl.store(out_ptr + offs_r[:, None] * COLS + offs_c[None, :], keep.to(tl.int8))

    out = torch.full((rows, cols), -1, dtype=torch.int8, device=DEVICE)
    threshold = dropout_threshold(p)
    probe[(1,)](seed, out, n_cols, threshold, ROWS=rows, COLS=cols)
    want = torch.tensor([[_spec_keep(seed, r * n_cols + c, threshold) for c in range(cols)] for r in range(rows)])
    assert torch.equal(out.cpu().bool(), want)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])  # 0.9: threshold above 2**31
def test_dropout_mask_is_the_shared_spec(p):
    m, k = 37, 16
    seed = make_seed(2**40 + 12345, DEVICE)
    x, *_, h = _identity_adapter(m, k, p, seed)
    keep = keep_mask(seed, m, k, p)
    assert torch.equal(h != 0, keep & (x != 0))
    # the same single fp32 multiply as ops/rng.apply_dropout: bit-identical values, not only the same mask
    assert torch.equal(h, torch.where(keep, x.float() * (1.0 / (1.0 - p)), torch.zeros((), device=DEVICE)))


def test_backward_uses_the_forward_mask():
    m, k, p = 37, 16, 0.5
    seed = make_seed(99, DEVICE)
    x, w, a, d, bb, y, h = _identity_adapter(m, k, p, seed)
    gy = torch.randn(m, 8, device=DEVICE)
    dx, da, dd, db = triton_linear.linear_backward(gy, x, w, a, d, bb, h, 1.0, p, seed, (True, True, True, True))
    keep = keep_mask(seed, m, k, p)
    # W = 0, A = I: dx = dropout_backward(gH), zero exactly where forward dropped
    gh = gy @ bb
    assert torch.equal(dx == 0, ~keep | (gh == 0))
    torch.testing.assert_close(dx, torch.where(keep, gh * 2.0, torch.zeros((), device=DEVICE)))
    torch.testing.assert_close(da, gh.t() @ torch.where(keep, x * 2.0, torch.zeros((), device=DEVICE)))


def test_dropout_draws_differ_eval_equals_p0_and_mean_is_unbiased():
    x, w, b, a, d, bb, _ = make_case((37,), 40, 13, 4, torch.float32)
    y1 = kk.kasa_linear(x, w, b, a, d, bb, 2.0, dropout_p=0.3, backend="triton")
    y2 = kk.kasa_linear(x, w, b, a, d, bb, 2.0, dropout_p=0.3, backend="triton")
    assert not torch.equal(y1, y2), "two calls without a seed drew the same mask"
    y_eval = kk.kasa_linear(x, w, b, a, d, bb, 2.0, dropout_p=0.3, training=False, backend="triton")
    y_p0 = kk.kasa_linear(x, w, b, a, d, bb, 2.0, dropout_p=0.0, backend="triton")
    assert torch.equal(y_eval, y_p0)
    # E[dropout(1)] = 1: with x = 1 and A = I, H's mean over 64 x 64 elements has standard deviation 1/64 at p = 0.5
    ones = torch.ones(64, 64, device=DEVICE)
    h = _identity_adapter(64, 64, 0.5, make_seed(3, DEVICE), x=ones)[-1]
    assert abs(h.mean().item() - 1.0) < 4 / 64


def test_adapter_off_gemm_is_linear():
    x, w, b, *_ = make_case((37,), 130, 40, 1, torch.float32, noncontig=True)
    torch.testing.assert_close(triton_linear.base_gemm(x, w, b), torch.nn.functional.linear(x, w, b))


def test_only_requested_gradients():
    x, w, b, a, d, bb, gy = make_case((7,), 40, 13, 4, torch.float32)
    y, h = triton_linear.linear_forward(x, w, b, a, d, bb, 2.0, 0.0, None)
    full = triton_linear.linear_backward(gy, x, w, a, d, bb, h, 2.0, 0.0, None, (True, True, True, True))
    for i in range(4):
        needs = tuple(j == i for j in range(4))
        got = triton_linear.linear_backward(gy, x, w, a, d, bb, h, 2.0, 0.0, None, needs)
        assert all((g is None) == (j != i) for j, g in enumerate(got))
        torch.testing.assert_close(got[i], full[i])


# ----------------------------------------------------------------------------------------------------------------
# Quantized base (bitsandbytes formats): W dequantized inside the GEMM main loop, forward and dX


# (format index into quant_cases.FORMATS, dtype, dropout p): nf4 without and with double quantization, fp4, int8
QUANT_CASES = [(0, torch.float32, 0.0), (1, torch.float16, 0.25), (2, torch.float32, 0.0), (4, torch.float16, 0.0),
               (4, torch.float32, 0.25)]


@pytest.mark.parametrize("fmt_index,dtype,p", QUANT_CASES, ids=lambda v: str(v))
def test_quantized_base_dequantized_in_the_main_loop(fmt_index, dtype, p, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from kasa_kernels.ops import quant_weight
    from quant_cases import FORMATS, bnb_dequantize, quantize, spread_weight

    # K = 72 is no multiple of the blocks, N = 40 no multiple of the tiles; N K / 256 leaves a partial block
    k, n, r = 72, 40, 4
    q = quantize(FORMATS[fmt_index], spread_weight(n, k))
    w_ref = bnb_dequantize(q)  # before dequantize is poisoned below

    def refuse(*args, **kwargs):
        raise AssertionError("the triton backend dequantized W into memory")

    monkeypatch.setattr(quant_weight, "dequantize", refuse)  # what every unfused qlinear kernel calls
    x, _, b, a, d, bb, gy = make_case((3, 5), k, n, r, dtype, adapter_dtype=torch.float32, seed=2)
    check = q._replace(**{f: getattr(q, f).to(DEVICE) for f in quant_weight.TENSOR_FIELDS if getattr(q, f) is not None})
    helpers.check_against_reference((x, check, b, a, d, bb, gy), scaling=2.0, p=p, backend="triton",
                                    weight_ref=w_ref.to(DEVICE))


# ----------------------------------------------------------------------------------------------------------------
# Regularizer


def _reg_layers(dtype, device=DEVICE):
    g = torch.Generator().manual_seed(1)
    shapes = [(4, 13, 40), (16, 40, 24), (1, 130, 7), (8, 40, 40)]  # (r, K, N)
    layers = []
    for r, k, n in shapes:
        a = torch.randn(r, k, generator=g) / k**0.5
        b = torch.randn(n, r, generator=g) / n**0.5
        d = torch.randn(r, generator=g)
        layers.append(tuple(t.to(device=device, dtype=dtype) for t in (a, b, d)))
    layers[1] = (layers[1][0], torch.zeros_like(layers[1][1]), layers[1][2])  # B = 0, as at init
    return layers


@pytest.mark.parametrize("form", ["paper", "official"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_regularizer_matches_reference(form, dtype):
    layers = _reg_layers(dtype)
    beta, gamma = 1e-2, 1e-1
    modules = []
    for a, b, d in layers:
        m = kk.KasaLinear(a.shape[1], b.shape[0], r=a.shape[0], device=DEVICE, dtype=dtype, backend="triton")
        with torch.no_grad():
            m.lora_A.copy_(a)
            m.lora_B.copy_(b)
            m.lora_diag.copy_(d)
        modules.append(m)
    loss = kk.kasa_regularizer(modules, beta=beta, gamma=gamma, form=form, backend="triton")
    params = [p for m in modules for p in (m.lora_A, m.lora_B, m.lora_diag)]
    grads = torch.autograd.grad(loss, params)
    assert loss.dtype == torch.float32 and loss.dim() == 0

    def reference(dt):
        leaves = [t.detach().to(dt).requires_grad_(True) for t in params]
        triples = [tuple(leaves[3 * i : 3 * i + 3]) for i in range(len(modules))]
        value = ref.regularizer_ref(triples, beta, gamma, form)
        return [value] + list(torch.autograd.grad(value, leaves))

    want64 = reference(torch.float64)
    # fp16 parameters are read into fp32 by the kernel; the fp32 reference is the low-precision one to beat
    want32 = reference(torch.float32)
    mag_loss, mag_grads = regularizer_magnitudes([(m.lora_A, m.lora_B, m.lora_diag) for m in modules], beta, gamma,
                                                 form)
    assert_close_to_reference("loss", loss, want64[0], want32[0], torch.float32, magnitude=mag_loss)
    mags = [g for per_layer in mag_grads for g in per_layer]
    for i, (g_, w64, w32, p, mag) in enumerate(zip(grads, want64[1:], want32[1:], params, mags)):
        assert g_.dtype == p.dtype
        assert_close_to_reference(f"grad[{i}]", g_.float(), w64, w32, torch.float32, magnitude=mag)


def test_regularizer_orthonormal_factor_has_zero_gradient():
    # E = 0 exactly: 0/0 must come out as 0, not NaN
    a = torch.zeros(2, 16, device=DEVICE)
    a[0, 3] = 1.0
    a[1, 7] = 1.0
    b = torch.zeros(5, 2, device=DEVICE)
    b[0, 0] = b[4, 1] = 1.0
    d = torch.tensor([0.5, -1.0], device=DEVICE)
    loss, ga, gb, gd = defs.regularizer("triton", [a], [b], [d], 1e-2, 1e-1, "paper")
    assert torch.equal(ga[0], torch.zeros_like(a)) and torch.equal(gb[0], torch.zeros_like(b))
    torch.testing.assert_close(loss, torch.tensor(1e-2 * 1.25, device=DEVICE))
    torch.testing.assert_close(gd[0], 2e-2 * d)


# ----------------------------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_traces_layer_and_regularizer():
    # aot_eager: traces through Dynamo and AOTAutograd (what fullgraph checks) without needing a C++ compiler on CPU
    layer = kk.KasaLinear(40, 24, r=4, dropout=0.0, backend="triton", device=DEVICE)
    with torch.no_grad():
        layer.lora_B.normal_()

    def step(x):
        return layer(x).square().sum() + kk.kasa_regularizer(layer, backend="triton")

    x = torch.randn(2, 5, 40, device=DEVICE)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x1 = x.clone().requires_grad_(True)
    compiled(x1).backward()
    g_compiled = [x1.grad] + [p.grad.clone() for p in (layer.lora_A, layer.lora_diag, layer.lora_B)]
    layer.zero_grad()
    x2 = x.clone().requires_grad_(True)
    step(x2).backward()
    g_eager = [x2.grad] + [p.grad for p in (layer.lora_A, layer.lora_diag, layer.lora_B)]
    for u, v in zip(g_compiled, g_eager):
        torch.testing.assert_close(u, v)


# ----------------------------------------------------------------------------------------------------------------
# GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("adapter_fp32", [False, True], ids=["a_bf16", "a_fp32"])
def test_gpu_bf16(p, adapter_fp32):
    case = make_case((4, 77), 520, 300, 16, torch.bfloat16, torch.float32 if adapter_fp32 else torch.bfloat16,
                     noncontig=True)
    check_against_reference(case, p=p)


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_gpu_fp32_follows_tf32_setting(tf32):
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        # The reference in fp32 runs under the same setting, so its own error (the bound) includes TF32's.
        check_against_reference(make_case((300,), 1024, 520, 32, torch.float32), p=0.1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("r", [16, 128])
def test_gpu_large_shapes(dtype, r):
    check_against_reference(make_case((2048,), 2048, 1536, r, dtype, torch.float32), p=0.1)


@pytest.mark.gpu
def test_gpu_deterministic_bit_identical():
    case = make_case((4096,), 1024, 2048, 16, torch.bfloat16, torch.float32)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        runs = [run_triton(*case, 2.0, 0.1, make_seed(11, DEVICE)) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for other in runs[1:]:
        for name, u, v in zip(NAMES, runs[0], other):
            assert torch.equal(u, v), f"{name} differs between deterministic runs"


@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph():
    layer = kk.KasaLinear(512, 384, r=16, dropout=0.1, backend="triton", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.normal_()
    compiled = torch.compile(lambda x: layer(x).float().square().sum(), fullgraph=True)
    x = torch.randn(4, 128, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled(x).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.lora_A.grad).all()


@pytest.mark.gpu
def test_gpu_regularizer_bf16_many_layers():
    layers = [_reg_layers(torch.bfloat16, "cuda")[i % 4] for i in range(64)]
    a_s, b_s, d_s = (list(t) for t in zip(*layers))
    for form in ("paper", "official"):
        loss, ga, gb, gd = defs.regularizer("triton", a_s, b_s, d_s, 1e-4, 1e-3, form)
        want = ref.regularizer_ref([tuple(t.double() for t in lay) for lay in layers], 1e-4, 1e-3, form)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("p", [0.0, 0.1], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("shape", [(4096, 2056, 2000, 16), (4096, 2050, 2048, 128)],
                         ids=["aligned_partial_tiles", "odd_K"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=str)
def test_gpu_gemm_variant_bf16(variant, shape, p, monkeypatch):
    # Each sm90 variant run on its own at a real tile; the autotuner may pick any of them. odd_K: rows of x and W are
    # 4100 bytes, so the forced TMA config must run on pointer loads instead.
    persistent, tma = VARIANTS[variant]
    cap = torch.cuda.get_device_capability()
    if tma and cap[0] < 9:
        pytest.skip("TMA needs sm90")
    # sm90's largest tile, 128 x 256: at least 32 x 8 tiles here, more than an H100's 132 SMs, so persistent
    # programs loop over several tiles
    tile = triton_gemm.GEMM_CONFIGS[(9, 0)][0] if cap == (9, 0) else (64, 64, 32, 3, 4)
    m, k, n, r = shape
    spy = _LaunchSpy(triton_gemm.gemm_lowrank_kernel)
    monkeypatch.setattr(triton_gemm, "gemm_lowrank_kernel", spy)
    case = make_case((m,), k, n, r, torch.bfloat16, torch.float32)
    x2d, gy2d = _run_gemm_variant(case, torch.bfloat16, p, _variant_config(persistent, tma, tile))
    _check_variant_launches(spy, case[1], x2d, gy2d, persistent, tma)


@pytest.mark.gpu
def test_gpu_autotuner_times_every_variant_and_keeps_tma_off_unaligned_operands():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the variants are sm90's")
    tuner = triton_gemm.autotuned_kernel(target_of(torch.device("cuda")).arch)
    # 4096 x 1024: 256 tiles of 128 x 128, more than the SMs, so the persistent configs are not pruned either
    check_against_reference(make_case((4096,), 1024, 1024, 16, torch.bfloat16, torch.float32), p=0.1)
    timed = list(tuner.configs_timings)  # the dX launch's autotuning
    assert any(c.kwargs["USE_TMA"] for c in timed) and any(c.kwargs["PERSISTENT"] for c in timed)
    # K = 1030: rows of x (forward) and of W (dX) are 2060 bytes, so TMA cannot read them
    check_against_reference(make_case((4096,), 1030, 1024, 16, torch.bfloat16, torch.float32), p=0.1)
    assert not any(c.kwargs["USE_TMA"] for c in tuner.configs_timings)
    assert not tuner.best_config.kwargs["USE_TMA"]
