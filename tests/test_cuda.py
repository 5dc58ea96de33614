"""Backend "cuda" (csrc/, extension kasa_kernels._C) against python/kasa_reference.

CPU part (runs in CI): the extension imports when it was built, its ops are registered with torch.library and their
fake implementations give the right shapes, the C++ argument checks name the argument, and the backend explains
itself when it cannot run. GPU part (marked gpu): every kernel against the reference over fp32/fp16/bf16, odd shapes,
non-contiguous inputs, bias on/off, fp32 adapters beside low-precision activations, dropout with the shared mask, the
regularizer in both forms, determinism, and torch.compile(fullgraph=True); the backward at decode sizes and with r
above one rank tile, rows that are not 16-byte aligned, fp32 with TF32 on and off, dropout in deterministic mode.
"""
import importlib.util
import os
import shutil

import pytest
import torch

import kasa_kernels as kk
import kasa_reference as ref
from helpers import (assert_close_to_reference, check_against_reference, kasa_linear_magnitudes, make_case,
                     regularizer_magnitudes)
from kasa_kernels import _backend
from kasa_kernels.ops import cuda as cuda_ext
from kasa_kernels.ops import cuda_linear, cuda_reg, defs  # noqa: F401  (cuda_*: register the cuda kernels)
from kasa_kernels.ops.rng import keep_mask, make_seed


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EXT_FUNCTIONS = ("linear_forward", "linear_backward", "regularizer", "base_gemm")  # kasa_kernels._C
BUILT = importlib.util.find_spec("kasa_kernels._C") is not None
needs_ext = pytest.mark.skipif(not BUILT, reason="kasa_kernels._C is not built")


# ------------------------------------------------------------------------------------------------------------ CPU --
def _ci_should_have_built():
    # In CI (CI=true) the README's `pip install --no-build-isolation -e .` builds the extension whenever torch has
    # CUDA and nvcc is on PATH (KASA_KERNELS_BUILD_CUDA=auto); a silent skip there is a failure.
    return (
        os.environ.get("CI", "").lower() in ("1", "true", "yes")
        and os.environ.get("KASA_KERNELS_BUILD_CUDA", "auto") != "0"
        and torch.version.cuda is not None
        and shutil.which("nvcc") is not None
    )


def test_extension_imports_when_built():
    if not BUILT:
        assert not _ci_should_have_built(), "CI has torch+CUDA and nvcc but kasa_kernels._C was not built"
        pytest.skip("kasa_kernels._C is not built")
    assert cuda_ext.IMPORT_ERROR is None, f"kasa_kernels._C is built but does not import: {cuda_ext.IMPORT_ERROR}"
    from kasa_kernels import _C

    for name in EXT_FUNCTIONS + ("kernel_image_status",):
        assert callable(getattr(_C, name)), name
    archs = cuda_ext.compiled_archs()
    assert archs and all(a.rstrip("a").isdigit() and int(a.rstrip("a")) >= 80 for a in archs), archs


def _linear_args(device, dtype=torch.bfloat16, m=37, k=130, n=77, r=16, p=0.1, bias=True):
    x = torch.empty(m, k, device=device, dtype=dtype)
    w = torch.empty(n, k, device=device, dtype=dtype)
    b = torch.empty(n, device=device, dtype=dtype) if bias else None
    a = torch.empty(r, k, device=device, dtype=torch.float32)
    d = torch.empty(r, device=device, dtype=torch.float32)
    bb = torch.empty(n, r, device=device, dtype=torch.float32)
    seed = torch.zeros(2, device=device, dtype=torch.int64)
    return x, w, b, a, d, bb, 2.0, p, seed


def test_cuda_kernels_are_registered_for_every_op():
    for op in defs.OPS:
        assert defs.kernel(op, "cuda") is not None


def test_probe_on_cpu_explains_itself():
    ok, why = cuda_ext.probe(torch.device("cpu"))
    assert not ok
    if BUILT:
        assert "CUDA tensors only" in why and "sm_" in why
    else:
        assert "KASA_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation -e ." in why
    info = kk.backends("cpu")["cuda"]
    assert not info.available and info.reason


def test_requesting_cuda_backend_on_cpu_raises_actionable_error():
    x = torch.randn(3, 5)
    with pytest.raises(_backend.BackendUnavailableError, match="cuda"):
        kk.kasa_linear(x, torch.randn(4, 5), None, torch.randn(2, 5), torch.randn(2), torch.randn(4, 2), 1.0,
                       backend="cuda")


@needs_ext
def test_cpp_checks_name_the_argument():
    from kasa_kernels import _C

    x, w, b, a, d, bb, s, p, seed = _linear_args("cpu", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="x2d: expected a CUDA tensor"):
        _C.linear_forward(x, w, b, a, d, bb, s, 429496730, 1.0 / 0.9, seed, False)
    with pytest.raises(RuntimeError, match=r"lora_As\[0\]: expected a CUDA tensor"):
        _C.regularizer([a], [bb], [d], 1e-4, 1e-3, False)
    with pytest.raises(RuntimeError, match="x2d: expected a CUDA tensor"):
        _C.base_gemm(x, w, b, False)


def test_missing_extension_error_is_actionable(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_C", None)
    monkeypatch.setattr(cuda_ext, "IMPORT_ERROR", ImportError("No module named 'kasa_kernels._C'"))
    with pytest.raises(RuntimeError, match="KASA_KERNELS_BUILD_CUDA=1"):
        cuda_ext.ext()
    ok, why = cuda_ext.probe(torch.device("cuda"))
    assert not ok and "KASA_KERNELS_BUILD_CUDA=1" in why


def _sass_facts_tool():
    spec = importlib.util.spec_from_file_location(
        "kasa_sass_facts", os.path.join(os.path.dirname(__file__), "..", "tools", "sass_facts.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SASS_LOOP = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.128.ZFILL [R16], [R10.64], P4 ;
        /*0020*/                   LDSM.16.M88.4 R64, [R64+0x800] ;
        /*0030*/              @!PT LDS RZ, [RZ] ;
        /*0040*/                   HMMA.16816.F32.BF16 R28, R32.reuse, R60, R28 ;
        /*0050*/                   {GENERIC}
        /*0060*/               @P0 BRA 0x10 ;
        /*0070*/                   LDS.64 R16, [R8] ;
        /*0080*/                   EXIT ;
"""


@pytest.mark.parametrize("generic", [False, True])
def test_sass_facts_reads_the_main_loop(generic):
    # tools/sass_facts.py's reading of cuobjdump output (the tool itself needs nvcc; csrc/sass_facts.md is its output):
    # the loop is the backward branch's body; never-executed @!PT placeholders are skipped; a generic load there breaks
    # the GEMM's facts.
    sf = _sass_facts_tool()
    body = SASS_LOOP.replace("{GENERIC}", "LD.E R2, [R4.64] ;" if generic else "IADD3 R2, R2, 0x1, RZ ;")
    insns = sf.parse_insns(body)
    f = sf.facts(insns, {"regs": 190, "spill_st": 0, "spill_ld": 0}, "gemm", "gemm_lowrank_kernel<bfloat16, TC16>")
    assert (f["ldsm"], f["lds"], f["hmma"], f["ldgsts128"]) == (1, 0, {"HMMA.16816.F32.BF16": 1}, 1)
    assert f["ld_generic"] == int(generic)
    assert sf.violations(f) == (["1 generic LD in the main loop"] if generic else [])
    # registers and spills from ptxas -v; any spill breaks the facts
    res = sf.ptxas_resources("ptxas info    : Compiling entry function '_Zk' for 'sm_80'\n"
                             "ptxas info    : Function properties for _Zk\n"
                             "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
                             "ptxas info    : Used 64 registers, used 1 barriers\n")
    assert res == {"_Zk": {"stack": 8, "spill_st": 4, "spill_ld": 12, "regs": 64}}
    spilled = sf.facts(insns, res["_Zk"], "gemm", "gemm_lowrank_kernel<bfloat16, TC16>")
    assert any(v.startswith("spills (4 B stored, 12 B loaded") for v in sf.violations(spilled))


# ------------------------------------------------------------------------------------------------------------ GPU --
def _cuda_usable():
    return torch.cuda.is_available() and cuda_ext.probe(torch.device("cuda"))[0]


gpu = pytest.mark.gpu


@pytest.fixture
def cuda_backend():
    ok, why = cuda_ext.probe(torch.device("cuda"))
    if not ok:
        pytest.fail(f"GPU present but the cuda backend is unusable: {why}")
    return "cuda"


def _to_cuda(case):
    return tuple(None if t is None else t.cuda() for t in case)


SHAPES = [  # (leading dims, K, N, r): odd sizes, single rows, several tiles, r above one 16-wide chunk
    ((1,), 7, 5, 1),
    ((7,), 37, 130, 4),
    ((37,), 130, 37, 16),
    ((3, 13), 64, 96, 8),
    ((130,), 136, 264, 33),
    ((257,), 520, 300, 24),
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(cuda_backend, dtype, shape, bias):
    lead, k, n, r = shape
    check_against_reference(_to_cuda(make_case(lead, k, n, r, dtype, dtype, bias=bias)), backend="cuda")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES[1:], ids=str)
def test_fp32_adapters_with_low_precision_activations(cuda_backend, dtype, shape):
    lead, k, n, r = shape
    check_against_reference(_to_cuda(make_case(lead, k, n, r, dtype, torch.float32)), backend="cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(cuda_backend, dtype):
    check_against_reference(_to_cuda(make_case((2, 11), 33, 21, 3, dtype, dtype, noncontig=True)), backend="cuda")
    check_against_reference(_to_cuda(make_case((5, 41), 136, 72, 16, dtype, dtype, noncontig=True)), backend="cuda")


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [((29,), 48, 20, 4), ((131,), 264, 136, 16)], ids=str)
def test_dropout_matches_reference_with_the_same_mask(cuda_backend, dtype, p, shape):
    lead, k, n, r = shape
    check_against_reference(_to_cuda(make_case(lead, k, n, r, dtype, torch.float32)), p=p, backend="cuda")


@gpu
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_is_bit_identical_to_rng_keep_mask(cuda_backend, p):
    # x = 1, A = I: H is exactly keep / (1 - p); W = 0, B = I, d = 1, s = 1, G = 1: dx is exactly keep / (1 - p).
    m, k = 259, 72
    seed = make_seed(0xDEADBEEF12345678, torch.device("cuda"))  # both seed words nonzero
    want = keep_mask(seed, m, k, p)
    x = torch.ones(m, k, device="cuda")
    eye = torch.eye(k, device="cuda")
    ones_r = torch.ones(k, device="cuda")
    w = torch.zeros(k, k, device="cuda")
    y, h = defs.linear_forward("cuda", x, w, None, eye, ones_r, eye, 1.0, p, seed)
    assert torch.equal(h != 0, want)
    assert torch.equal(h[want], torch.full_like(h[want], 1.0 / (1.0 - p)))
    g = torch.ones(m, k, device="cuda")
    dx, da, _, _ = defs.linear_backward("cuda", g, x, w, eye, ones_r, eye, h, 1.0, p, seed, (True, True, False, False))
    assert torch.equal(dx != 0, want)
    # dA[j, k] = sum_m gH[m, j] x~[m, k] with gH = 1: column counts of the mask, scaled
    torch.testing.assert_close(da, (want.double().sum(0) / (1 - p)).float().expand(k, k), rtol=1e-5, atol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        _, h_lp = defs.linear_forward("cuda", x.to(dtype), w.to(dtype), None, eye, ones_r, eye, 1.0, p, seed)
        assert torch.equal(h_lp != 0, want)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemm_alone_matches_cublas(cuda_backend, dtype):
    # The adapter switched off (B = 0): our GEMM against F.linear, which both round the same fp32 sum once.
    torch.manual_seed(0)
    for m, k, n in ((1, 8, 8), (129, 264, 520), (300, 1000, 136)):
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
        b = torch.randn(n, device="cuda", dtype=dtype)
        a, d, bb = torch.randn(4, k, device="cuda"), torch.randn(4, device="cuda"), torch.zeros(n, 4, device="cuda")
        y, _ = defs.linear_forward("cuda", x, w, b, a, d, bb, 1.0, 0.0, None)
        ref64 = torch.nn.functional.linear(x.double(), w.double(), b.double())
        mag = torch.nn.functional.linear(x.double().abs(), w.double().abs(), b.double().abs())
        assert_close_to_reference("gemm", y, ref64, torch.nn.functional.linear(x, w, b), dtype, magnitude=mag)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_base_gemm_matches_cublas(cuda_backend, dtype, bias):
    # The adapter-off entry point (what kasa-bench's cuda_gemm times against cuBLAS): odd K and N, a strided x.
    torch.manual_seed(0)
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32: the exact FFMA path against cuBLAS's exact fp32
        for m, k, n in ((1, 8, 8), (129, 264, 520), (300, 1001, 137)):
            x = torch.randn(m, 2 * k, device="cuda", dtype=dtype)[:, ::2]
            w = torch.randn(n, k, device="cuda", dtype=dtype) / k**0.5
            b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
            y = cuda_linear.base_gemm(x, w, b)
            ref64 = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
            mag = torch.nn.functional.linear(x.double().abs(), w.double().abs(), None if b is None else b.double().abs())
            assert y.dtype == dtype and y.shape == (m, n)
            # the low-precision reference on a contiguous copy of x (STYLE: never through strided padding)
            ref_lp = torch.nn.functional.linear(x.contiguous(), w, b)
            assert_close_to_reference("base_gemm", y, ref64, ref_lp, dtype, magnitude=mag)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@gpu
def test_tf32_path(cuda_backend):
    torch.manual_seed(0)
    x, w = torch.randn(130, 264, device="cuda"), torch.randn(72, 264, device="cuda") / 264**0.5
    a, d, bb = torch.randn(8, 264, device="cuda") / 16, torch.randn(8, device="cuda"), torch.randn(72, 8, device="cuda")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        y_tf32, _ = defs.linear_forward("cuda", x, w, None, a, d, bb, 2.0, 0.0, None)
        ref_tf32 = ref.kasa_linear_ref(x, w, None, a, d, bb, 2.0)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    ref64 = ref.kasa_linear_ref(x.double(), w.double(), None, a.double(), d.double(), bb.double(), 2.0)
    mag = kasa_linear_magnitudes(x, w, None, a, d, bb, torch.zeros(130, 72), 2.0)[0]
    # TF32 keeps 10 mantissa bits: both cuBLAS's TF32 result and ours sit within a few 2**-11 of the fp64 value.
    assert_close_to_reference("y_tf32", y_tf32, ref64, ref_tf32, torch.float32, magnitude=mag, factor=4.0)


def _reg_layers(dtype, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for r, k, n in shapes:
        a = (torch.randn(r, k, generator=g) / k**0.5).to(dtype).cuda()
        b = (torch.randn(n, r, generator=g) / n**0.5).to(dtype).cuda()
        d = torch.randn(r, generator=g).to(dtype).cuda()
        layers.append((a, b, d))
    return layers


REG_SHAPES = [(4, 10, 7), (16, 130, 37), (33, 70, 260), (8, 4096, 96), (1, 1, 1)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", ["paper", "official"])
def test_regularizer_matches_reference(cuda_backend, dtype, form):
    layers = _reg_layers(dtype, REG_SHAPES)
    beta, gamma = 1e-2, 1e-1
    loss, ga, gb, gd = defs.regularizer("cuda", [l[0] for l in layers], [l[1] for l in layers], [l[2] for l in layers],
                                        beta, gamma, form)
    # The kernel computes in fp32 from the parameters' values: hold it to fp32's tolerance around those values.
    outs = {}
    for acc in (torch.float64, torch.float32):
        leaves = [tuple(t.detach().to(acc).requires_grad_(True) for t in l) for l in layers]
        total = ref.regularizer_ref(leaves, beta, gamma, form)
        flat = [t for l in leaves for t in l]
        outs[acc] = [total] + list(torch.autograd.grad(total, flat))
    mag_loss, mag_grads = regularizer_magnitudes(layers, beta, gamma, form)
    assert_close_to_reference("loss", loss, outs[torch.float64][0], outs[torch.float32][0], torch.float32,
                              magnitude=mag_loss)
    got = [t for trip in zip(ga, gb, gd) for t in trip]
    mags = [m for per_layer in mag_grads for m in per_layer]
    for i, (g_, w64, w32, mag) in enumerate(zip(got, outs[torch.float64][1:], outs[torch.float32][1:], mags)):
        assert g_.dtype == torch.float32
        assert_close_to_reference(f"grad[{i}]", g_, w64, w32, torch.float32, magnitude=mag)


@gpu
def test_regularizer_zero_over_zero_is_zero(cuda_backend):
    # An exactly orthonormal A has f_A = 0; the paper form's gradient gamma 2 E A / f_A is 0/0, taken as 0.
    a = torch.eye(4, 9, device="cuda")
    b = torch.zeros(6, 4, device="cuda")  # the init state: f_B = sqrt(r), dR/dB = 0
    d = torch.randn(4, device="cuda")
    loss, ga, gb, gd = defs.regularizer("cuda", [a], [b], [d], 1e-4, 1e-3, "paper")
    assert torch.isfinite(loss) and torch.equal(ga[0], torch.zeros_like(a)) and torch.equal(gb[0], torch.zeros_like(b))
    torch.testing.assert_close(loss, 1e-4 * (d * d).sum() + 1e-3 * 2.0)
    torch.testing.assert_close(gd[0], 2e-4 * d)


@gpu
def test_deterministic_mode_is_bitwise_repeatable(cuda_backend):
    x, w, b, a, d, bb, gy = _to_cuda(make_case((300,), 136, 200, 16, torch.bfloat16, torch.float32))
    h = defs.linear_forward("cuda", x, w, b, a, d, bb, 2.0, 0.0, None)[1]
    args = ("cuda", gy, x, w, a, d, bb, h, 2.0, 0.0, None, (True, True, True, True))
    fast = defs.linear_backward(*args)
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        first = defs.linear_backward(*args)
        second = defs.linear_backward(*args)
    finally:
        torch.use_deterministic_algorithms(old)
    for f, s, q in zip(first, second, fast):
        assert torch.equal(f, s)
        torch.testing.assert_close(f, q, rtol=1e-4, atol=1e-4)


# The forward shrink (csrc/lowrank_shrink.cu) picks its own layout: K is split over blocks when the row blocks cannot
# fill the GPU (M <= 128 with K = 4096 splits on any GPU with two or more SMs), ranks above 32 are tiled in slices of
# 32, and x rows that are not 16-byte aligned take the element-load path. H (linear_forward's second output) is held
# to fp32 accuracy, which a lost or doubled split slice, or a value read past a row or rank edge, misses by far more
# than rounding; NaN placed just past the edges turns any such read into a non-finite H.
SHRINK_DECODE = [(1, 4096, 16), (16, 4096, 16), (64, 4096, 16), (1, 4099, 16), (16, 4099, 8), (64, 4099, 24)]
SHRINK_WIDE_R = [(5, 136, 33), (130, 520, 64), (37, 4096, 128), (300, 264, 128)]


def _shrink_case(m, k, r, dtype, n=72, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    a = torch.randn(r, k, generator=g) / k**0.5
    d = torch.randn(r, generator=g)
    bb = torch.randn(n, r, generator=g) / r**0.5
    return tuple(t.cuda() for t in (x, w, b, a, d, bb))


def _nan_tailed(t, offset=0):
    """A contiguous copy of t inside a larger buffer of NaN, starting `offset` elements in: reading past either end
    (or, with offset > 0, relying on 16-byte alignment) shows up in the result."""
    buf = torch.full((t.numel() + offset + 64,), float("nan"), dtype=t.dtype, device=t.device)
    view = buf[offset:offset + t.numel()].view(t.shape)
    view.copy_(t)
    return view


def _shrink_reference(x, a, p, seed):
    """H = dropout(x) A^T from the reference (kasa_linear_ref with W = 0, d = 1, B = I, s = 1): fp64 and fp32."""
    m, k = x.shape
    r = a.shape[0]
    mask = keep_mask(seed, m, k, p) if p > 0 else None
    out = []
    for dt in (torch.float64, torch.float32):
        z = torch.zeros(r, k, dtype=dt, device=x.device)
        ones, eye = torch.ones(r, dtype=dt, device=x.device), torch.eye(r, dtype=dt, device=x.device)
        out.append(ref.kasa_linear_ref(x.to(dt), z, None, a.to(dt), ones, eye, 1.0, dropout_mask=mask, dropout_p=p))
    return out


def _check_forward(name, x, w, b, a, d, bb, p=0.0, seed=None, scaling=2.0):
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references (and fp32 x) stay exact-fp32
        y, h = defs.linear_forward("cuda", x, w, b, a, d, bb, scaling, p, seed)
        x, a = x.contiguous(), a.contiguous()  # the references never read the kernel's poisoned padding
        h64, h32 = _shrink_reference(x, a, p, seed)
        mask = keep_mask(seed, x.shape[0], x.shape[1], p) if p > 0 else None
        y64 = ref.kasa_linear_ref(x.double(), w.double(), b.double(), a.double(), d.double(), bb.double(), scaling,
                                  dropout_mask=mask, dropout_p=p)
        ylp = ref.kasa_linear_ref(x, w, b, a, d, bb, scaling, dropout_mask=mask, dropout_p=p, dtype=x.dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert h.dtype == torch.float32 and h.shape == (x.shape[0], a.shape[0])
    # fp32 products summed in a different order than cuBLAS's: a few times the fp32 reference's own error
    mags = kasa_linear_magnitudes(x, w, b, a, d, bb, torch.zeros(y.shape), scaling, mask, p)
    mag_h = _shrink_reference(x.abs(), a.abs(), p, seed)[0]
    assert_close_to_reference(f"{name} H", h, h64, h32, torch.float32, magnitude=mag_h, factor=4.0)
    assert_close_to_reference(f"{name} y", y, y64, ylp, x.dtype, magnitude=mags[0])
    return y, h


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHRINK_DECODE + SHRINK_WIDE_R, ids=str)
def test_shrink_decode_and_wide_rank(cuda_backend, dtype, shape):
    m, k, r = shape
    x, w, b, a, d, bb = _shrink_case(m, k, r, dtype)
    _check_forward(f"m{m} k{k} r{r}", _nan_tailed(x), w, b, _nan_tailed(a), d, bb)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(16, 4096, 16), (130, 520, 24), (37, 4099, 64)], ids=str)
def test_shrink_unaligned_rows(cuda_backend, dtype, shape):
    m, k, r = shape
    x, w, b, a, d, bb = _shrink_case(m, k, r, dtype)
    # rows padded with NaN (row stride k + 3: no row after the first is 16-byte aligned)
    padded = torch.full((m, k + 3), float("nan"), dtype=dtype, device="cuda")
    padded[:, :k] = x
    _check_forward("padded rows", padded[:, :k], w, b, a, d, bb)
    # contiguous, but the first row starts one element past a 16-byte boundary; A likewise one float in
    _check_forward("offset base", _nan_tailed(x, offset=1), w, b, _nan_tailed(a, offset=1), d, bb)
    # both: the row start and the row stride are off by one element
    wide = torch.cat([torch.randn(m, 1, device="cuda").to(dtype), x], dim=1)
    _check_forward("sliced columns", wide[:, 1:], w, b, a, d, bb)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("shape", [(1, 4096, 16), (64, 4099, 24), (130, 520, 64), (37, 264, 128)], ids=str)
def test_shrink_dropout(cuda_backend, dtype, p, shape):
    m, k, r = shape
    x, w, b, a, d, bb = _shrink_case(m, k, r, dtype)
    seed = make_seed(0x5EED0000ABCD, x.device)
    _check_forward(f"p{p}", _nan_tailed(x), w, b, a, d, bb, p=p, seed=seed)


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_split_k_is_bitwise_repeatable(cuda_backend, dtype, p):
    # M = 16, K = 4096: one row block, so K is split and the slices are summed by the second launch in slice order.
    x, w, b, a, d, bb = _shrink_case(16, 4096, 16, dtype)
    seed = make_seed(11, x.device) if p > 0 else None
    y1, h1 = _check_forward("split", x, w, b, a, d, bb, p=p, seed=seed)
    for _ in range(3):
        y2, h2 = defs.linear_forward("cuda", x, w, b, a, d, bb, 2.0, p, seed)
        assert torch.equal(h1, h2) and torch.equal(y1, y2)


# The backward's rank-r kernels (csrc/dy_pass.cu, csrc/lowrank_da.cu) split N (dY pass) and M (dA) into slices so
# that decode sizes fill the GPU, tile ranks in 16s or 32s, and on sm80/sm90 sum 16-bit inputs on TF32 tensor cores
# (2xTF32) instead of FFMA. Decode sizes with K and N of a 7B layer; a ragged K and N (element loads past the last
# 16-byte chunk); r above 32 (two rank tiles).
BACKWARD_SIZES = [((1,), 4096, 4096, 16), ((16,), 4096, 1024, 16), ((64,), 4099, 4096, 24), ((3, 43), 1000, 4100, 40)]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BACKWARD_SIZES, ids=str)
def test_backward_decode_sizes_and_rank_tiles(cuda_backend, dtype, shape):
    lead, k, n, r = shape
    check_against_reference(_to_cuda(make_case(lead, k, n, r, dtype, torch.float32, seed=1)), backend="cuda")


def _padded_rows(t, pad=3):
    """t as a view whose rows are `pad` elements longer than they are wide (NaN in the gap): no row after the first is
    16-byte aligned, so every kernel takes its element-load path; a read into the gap turns the result non-finite."""
    buf = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    buf[..., : t.shape[-1]] = t
    return buf[..., : t.shape[-1]]


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((37,), 136, 264, 16), ((300,), 520, 130, 24)], ids=str)
def test_unaligned_rows_forward_and_backward(cuda_backend, dtype, shape):
    lead, k, n, r = shape
    x, w, b, a, d, bb, gy = _to_cuda(make_case(lead, k, n, r, dtype, torch.float32, seed=2))
    check_against_reference((_padded_rows(x), _padded_rows(w), b, a, d, bb, _padded_rows(gy)), backend="cuda")


@gpu
@pytest.mark.parametrize("shape", [((130,), 264, 136, 16), ((16,), 4096, 1024, 16), ((64,), 520, 4104, 40)], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp32_with_tf32_allowed(cuda_backend, shape, p):
    # torch's TF32 switch on: the GEMMs run m16n8k8 TF32 (the reference's matmuls TF32 too, so its own error sets the
    # bound); the rank-r kernels stay exact fp32 for fp32 inputs.
    lead, k, n, r = shape
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        check_against_reference(_to_cuda(make_case(lead, k, n, r, torch.float32, seed=3)), p=p, backend="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [((64,), 4096, 4096, 16), ((300,), 136, 200, 40)], ids=str)
def test_deterministic_with_dropout_is_bitwise_repeatable(cuda_backend, dtype, shape):
    # Deterministic mode: dB through per-row-block partials; gZ slices, dd and dA partials are always added in a fixed
    # order. With dropout the dX GEMM's masked rank-r prologue and dA's zeroing pass run too.
    lead, k, n, r = shape
    case = _to_cuda(make_case(lead, k, n, r, dtype, torch.float32, seed=4))
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        # warn_only: the reference's cuBLAS matmuls would otherwise demand CUBLAS_WORKSPACE_CONFIG; the extension
        # reads only whether deterministic algorithms are on.
        torch.use_deterministic_algorithms(True, warn_only=True)
        check_against_reference(case, p=0.2, backend="cuda")
        seed = make_seed(99, case[0].device)
        first = _run_cuda_grads(case, 0.2, seed)
        second = _run_cuda_grads(case, 0.2, seed)
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
    for f, s_ in zip(first, second):
        assert torch.equal(f, s_)


def _run_cuda_grads(case, p, seed):
    x, w, b, a, d, bb, gy = case
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, d, bb)]
    y = kk.kasa_linear(leaves[0], w, b, *leaves[1:], 2.0, dropout_p=p, training=True, backend="cuda",
                       dropout_seed=seed)
    return [y] + list(torch.autograd.grad(y, leaves, gy))


@gpu
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_torch_compile_fullgraph(cuda_backend, p):
    torch._dynamo.reset()
    x, w, b, a, d, bb, gy = _to_cuda(make_case((4, 33), 136, 72, 8, torch.bfloat16, torch.float32))
    seed = make_seed(3, x.device)

    def step(x, a, d, bb):
        y = kk.kasa_linear(x, w, b, a, d, bb, 2.0, dropout_p=p, training=True, backend="cuda", dropout_seed=seed)
        return (y.float() * gy.float()).sum()

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, d, bb)]
        loss = fn(*leaves)
        outs.append([loss] + list(torch.autograd.grad(loss, leaves)))
    for e, c in zip(*outs):
        torch.testing.assert_close(c, e, rtol=1e-3, atol=1e-3)


@gpu
def test_cpp_checks_on_gpu(cuda_backend):
    x, w, b, a, d, bb, s, p, seed = _linear_args("cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="lora_B: expected shape"):
        defs.linear_forward("cuda", x, w, b, a, d, bb[:-1], s, p, seed)
    with pytest.raises(RuntimeError, match="weight: expected dtype"):
        defs.linear_forward("cuda", x, w.float(), b, a, d, bb, s, p, seed)
    with pytest.raises(ValueError, match="seed: required"):
        defs.linear_forward("cuda", x, w, b, a, d, bb, s, p, None)
    with pytest.raises(ValueError, match="dropout_p"):
        defs.linear_forward("cuda", x, w, b, a, d, bb, s, 1.0, seed)
    with pytest.raises(RuntimeError, match="bias: expected shape"):
        defs.base_gemm("cuda", x, w, b[:-1])
    with pytest.raises(RuntimeError, match="weight: expected shape"):
        defs.base_gemm("cuda", x, w[:, :-1], b)
