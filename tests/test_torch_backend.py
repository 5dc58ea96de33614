"""The torch backend computes docs/math.md's forward and closed-form backward, checked against python/kasa_reference."""
import os

import pytest
import torch

import kasa_kernels as kk
import kasa_reference as ref
from helpers import LINEAR_NAMES, assert_within_ref, check_against_reference, make_case, torch_threads
from kasa_kernels.ops.rng import keep_mask, make_seed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


SHAPES = [  # (leading dims, K, N, r)
    ((1,), 7, 5, 1),
    ((7,), 37, 130, 4),
    ((37,), 130, 37, 16),
    ((3, 13), 64, 96, 8),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, shape, bias):
    lead, k, n, r = shape
    check_against_reference(make_case(lead, k, n, r, dtype, dtype, bias=bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_with_low_precision_activations(dtype):
    # PEFT's default: adapters stay fp32 beside bf16/fp16 x and W.
    check_against_reference(make_case((2, 19), 40, 24, 4, dtype, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_input(dtype):
    check_against_reference(make_case((2, 11), 33, 21, 3, dtype, dtype, noncontig=True))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_matches_reference_with_the_same_mask(dtype, p):
    # forward and backward must both use keep_mask(seed): the reference is given that mask explicitly.
    check_against_reference(make_case((29,), 48, 20, 4, dtype, torch.float32), p=p)


def test_dropout_properties():
    x = torch.ones(256, 64)
    w = torch.zeros(8, 64)
    a = torch.eye(64)[:8].contiguous()  # H = dropout(x)[:, :8]
    d = torch.ones(8)
    bb = torch.eye(8)
    p = 0.3
    y1 = kk.kasa_linear(x, w, None, a, d, bb, 1.0, dropout_p=p, training=True)
    y2 = kk.kasa_linear(x, w, None, a, d, bb, 1.0, dropout_p=p, training=True)
    assert not torch.equal(y1, y2), "two calls drew the same mask"
    kept = (y1 != 0).double().mean().item()
    n = y1.numel()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma
    vals = torch.unique(y1)
    assert vals.numel() == 2 and vals[0] == 0 and vals[1].item() == pytest.approx(1 / (1 - p))
    # inverted dropout is unbiased
    assert abs(y1.mean().item() - 1.0) < 5 * (p / (1 - p) / n) ** 0.5
    # eval == p = 0
    y_eval = kk.kasa_linear(x, w, None, a, d, bb, 1.0, dropout_p=p, training=False)
    assert torch.equal(y_eval, kk.kasa_linear(x, w, None, a, d, bb, 1.0, dropout_p=0.0))
    # the same seed gives the same mask
    s = make_seed(5, x.device)
    assert torch.equal(
        kk.kasa_linear(x, w, None, a, d, bb, 1.0, dropout_p=p, dropout_seed=s),
        kk.kasa_linear(x, w, None, a, d, bb, 1.0, dropout_p=p, dropout_seed=s),
    )


def test_keep_mask_is_a_hash_of_seed_and_index():
    s = make_seed(123, torch.device("cpu"))
    m = keep_mask(s, 40, 50, 0.5)
    # row-major element index: a (40, 50) mask is the (2000,) mask reshaped, and a (20, 100) one too
    assert torch.equal(m.flatten(), keep_mask(s, 1, 2000, 0.5).flatten())
    assert torch.equal(m.flatten(), keep_mask(s, 20, 100, 0.5).flatten())
    other = keep_mask(make_seed(124, torch.device("cpu")), 40, 50, 0.5)
    agree = (m == other).double().mean().item()
    assert 0.45 < agree < 0.55, "masks of neighbouring seeds are correlated"
    # neighbouring elements are not correlated either
    assert 0.45 < (m[:, 1:] == m[:, :-1]).double().mean().item() < 0.55


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 6, dtype=torch.float64, generator=g)
    b = torch.randn(5, dtype=torch.float64, generator=g)
    a = torch.randn(3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    d = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
    bb = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    for p in (0.0, 0.4):
        seed = make_seed(99, x.device)

        def f(x, a, d, bb):
            return kk.kasa_linear(x, w, b, a, d, bb, 1.5, dropout_p=p, backend="torch", dropout_seed=seed)

        assert torch.autograd.gradcheck(f, (x, a, d, bb))


def test_saves_no_activation_sized_tensor():
    m, k, n, r = 64, 48, 40, 4
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(n, k)
    a, d, bb = (torch.randn(*s, requires_grad=True) for s in ((r, k), (r,), (n, r)))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = kk.kasa_linear(x, w, None, a, d, bb, 2.0, dropout_p=0.1, backend="torch")
    extra = [t for t in saved if t.data_ptr() not in (x.data_ptr(), w.data_ptr(), a.data_ptr(), d.data_ptr(), bb.data_ptr())]
    for t in extra:
        assert t.numel() not in (m * n, m * k), f"saved an activation-sized tensor {tuple(t.shape)}"
    extra_bytes = sum(t.numel() * t.element_size() for t in extra)
    assert extra_bytes <= m * r * 4 + 2 * 8, f"saved {extra_bytes} bytes beyond x and the parameters"
    y.sum().backward()
    assert a.grad is not None and x.grad is not None
    # with x non-contiguous, x itself (not a contiguous copy) is what is kept
    saved.clear()
    xw = torch.randn(m, 2 * k)[:, ::2].requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kk.kasa_linear(xw, w, None, a, d, bb, 2.0, backend="torch")
    assert not any(t.numel() == m * k and t.data_ptr() != xw.data_ptr() for t in saved)
    # nor for a 3-D x that reshape has to copy into the 2-D operand (the copy is the op's, never kept)
    saved.clear()
    x3 = torch.randn(k, 8, m // 8).permute(1, 2, 0).requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y3 = kk.kasa_linear(x3, w, None, a, d, bb, 2.0, backend="torch")
    assert not any(t.numel() == m * k and t.data_ptr() != x3.data_ptr() for t in saved)
    y3.sum().backward()
    assert x3.grad.shape == x3.shape


def test_frozen_base_weight_is_refused_when_trainable():
    w = torch.randn(5, 6, requires_grad=True)
    with pytest.raises(ValueError, match="weight"):
        kk.kasa_linear(torch.randn(2, 6), w, None, torch.randn(2, 6), torch.randn(2), torch.randn(5, 2), 1.0)


def test_autocast_behaves_like_f_linear():
    layer = kk.KasaLinear(24, 16, r=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_lin = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert y.dtype == y_lin.dtype == torch.bfloat16
    want = ref.kasa_linear_ref(
        x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(), layer.lora_diag.double(),
        layer.lora_B.double(), layer.scaling,
    )
    assert (y.double() - want).abs().max() <= 4 * 2**-8 * want.abs().max()


def test_backward_inside_autocast_runs_as_outside():
    """A backward called inside an autocast block runs the op with autocast off, as forward does: the fp32 layer's
    gradients are the ones a backward outside the block gives, bit for bit (with autocast on, its GEMMs would round
    to bf16). Also for a 3-D x, whose gradient comes back in x's shape."""
    torch.manual_seed(0)
    w, a, d, b = torch.randn(16, 24), torch.randn(4, 24), torch.randn(4), torch.randn(16, 4)
    x = torch.randn(2, 5, 24)
    dy = torch.randn(2, 5, 16)
    grads = []
    for inside in (False, True):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, d, b)]
        y = kk.kasa_linear(leaves[0], w, None, *leaves[1:], 2.0, backend="torch")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=inside):
            y.backward(dy)
        grads.append([t.grad for t in leaves])
    assert grads[1][0].shape == x.shape
    for g0, g1 in zip(*grads):
        assert g1.dtype == torch.float32 and torch.equal(g0, g1)


@pytest.mark.slow
def test_torch_compile_fullgraph_matches_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    from kasa_kernels.ops import cpu_mask

    torch.manual_seed(0)
    # G of 512 x 256 elements: eager backward takes ops/cpu_rank.c's pass (from DY_MIN_ELEMENTS), which tracing must
    # not reach either
    layer = kk.KasaLinear(40, 256, r=4, dropout=0.1, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 128, 40)
    assert x.numel() // 40 * 256 >= cpu_mask.DY_MIN_ELEMENTS

    def step(module):
        torch.manual_seed(11)
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.square().sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in (layer.lora_A, layer.lora_diag, layer.lora_B)]
        for p in (layer.lora_A, layer.lora_diag, layer.lora_B):
            p.grad = None
        return [y.detach()] + grads

    # the eager reference takes torch's GEMMs, as the compiled graph does (cpu_rank.c's pass and cpu_gemm.c's GEMM sum
    # in other orders)
    with monkeypatch.context() as m:
        m.setattr(cpu_mask, "DY_MIN_ELEMENTS", 1 << 62)
        m.setattr(cpu_mask, "GEMM_MIN_MACS", 1 << 62)
        eager = step(layer)
    # as in a process whose first layer call is compiled: the C mask kernels not loaded yet (tracing must not reach
    # their build)
    monkeypatch.setattr(cpu_mask, "_lib", None)
    monkeypatch.setattr(cpu_mask, "_error", None)
    # eager RNG inside the compiled graph, so both runs draw the same dropout seed
    with inductor_config.patch(fallback_random=True):
        compiled = step(torch.compile(layer, fullgraph=True))
    for name, e, c in zip(LINEAR_NAMES, eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=name)


def _spec_keep(seed: int, index: int, p: float) -> bool:
    """The ops/rng.py spec in plain Python integers, independent of any tensor arithmetic."""
    def mix(h):
        h ^= h >> 16
        h = (h * 0x21F0AAAD) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0xD35A2D97) & 0xFFFFFFFF
        return h ^ (h >> 15)

    s0, s1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    h = mix(mix((index & 0xFFFFFFFF) ^ s0) ^ (index >> 32) ^ s1)
    return h >= min(int(round(p * 2.0**32)), 0xFFFFFFFF)


@pytest.mark.parametrize("seed", [0, 123, 2**40 + 7, 2**64 - 1])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_follows_the_integer_spec(seed, p):
    rows, cols = 9, 31
    got = keep_mask(make_seed(seed, torch.device("cpu")), rows, cols, p).flatten().tolist()
    assert got == [_spec_keep(seed % 2**64, i, p) for i in range(rows * cols)]


def test_keep_mask_hash_of_indices_beyond_32_bits():
    # Layers with M*K > 2**31 hash int64 indices (hi32(i) != 0 from 2**32 on); too big to build here, so the hash of
    # such indices is checked directly against the integer spec.
    from kasa_kernels.ops import rng

    seed = 2**40 + 77
    idx = [0, 5, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**32 + 123456789, 2**40 + 3]
    words = rng.make_seed(seed, torch.device("cpu")).to(torch.int32)
    hashes = rng._hash(torch.tensor(idx, dtype=torch.int64), words)
    got = ((hashes ^ rng._SIGN) >= rng.compare_threshold(0.5)).tolist()
    assert got == [_spec_keep(seed, i, 0.5) for i in idx]
    # and the int32 form agrees with the int64 one where both apply
    small = torch.tensor(idx[:4], dtype=torch.int64)
    assert torch.equal(rng._hash(small.to(torch.int32), words), rng._hash(small, words))


# The mask kernels of ops/rng.py run fused on CUDA (inductor-compiled) and on CPU (ops/cpu_mask.c where a C compiler
# is present, else inductor-compiled for large tensors), eagerly elsewhere: every form must give bit for bit the same
# result (same mask, same casts, same adds). Here both CPU forms are held to the eager one (the GPU test below checks
# inductor's Triton form).
# (x dtype, operand dtype): the pairs the torch backend uses, each one cpu_mask.c instantiates
MASK_PAIRS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
              (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]


def _kernel_args(name, dtype, rows=37, cols=130, strided=False, operand=None):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, 2 * cols if strided else cols, generator=g).to(dtype)
    x = x[:, 1::2] if strided else x
    if operand is None:
        operand = torch.float32 if dtype == torch.float16 else dtype
    t = torch.randn(rows, cols, generator=g).to(operand)
    dx = torch.randn(rows, cols, generator=g).to(dtype)
    seed = make_seed(2**40 + 3, torch.device("cpu"))
    from kasa_kernels.ops import rng

    thr = rng.compare_threshold(0.3)
    return {"masked": (x, seed, thr, t.dtype), "add_masked_": (dx, t, seed, thr),
            "dropout_backward_": (dx, t, x, seed, thr)}[name]


def _clone_args(args):
    # strides kept (clone() makes a non-dense view contiguous, and the strided reads would go untested)
    def copy(a):
        return torch.empty_strided(a.shape, a.stride(), dtype=a.dtype).copy_(a) if isinstance(a, torch.Tensor) else a

    return tuple(copy(a) for a in args)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _without_c_kernels(monkeypatch):
    from kasa_kernels.ops import cpu_mask

    monkeypatch.setattr(cpu_mask, "_lib", None)
    monkeypatch.setattr(cpu_mask, "_error", "switched off by the test")


@pytest.fixture
def inductor_only(monkeypatch):
    """The C kernels off, and room for the recompiles of this file's dtypes and layouts: dynamo allows 8 per kernel
    and process, and one more would make the kernel fall back to eager for good. (config.patch, not monkeypatch:
    monkeypatch's undo deletes a dynamo config entry instead of restoring it.)"""
    import torch._dynamo

    from kasa_kernels.ops import rng

    _without_c_kernels(monkeypatch)
    monkeypatch.setattr(rng, "_failed", set())  # a failure of an earlier test does not carry over
    cfg = torch._dynamo.config  # torch < 2.6 calls it cache_size_limit
    with cfg.patch(**{"recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit": 64}):
        yield


def _require_c_kernels():
    import shutil

    from kasa_kernels.ops import cpu_mask

    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")):
        pytest.skip("no C compiler: ops/cpu_mask.c cannot be built here (rng.py uses its torch forms)")
    assert cpu_mask.available(), f"a C compiler is present but ops/cpu_mask.c did not build: {cpu_mask._error}"


# (rows, cols, x strided): rows of 130 elements end in a vector tail; a strided x is read through column stride 2
MASK_CASES = ((37, 130, False), (5, 7, True))


def _check_fused_against_eager(name, dtype, operand, cases=MASK_CASES):
    from kasa_kernels.ops import rng

    for rows, cols, strided in cases:
        args = _kernel_args(name, dtype, rows, cols, strided, operand)
        fused_args, eager_args = _clone_args(args), _clone_args(args)
        fused = _as_tuple(rng.run_fused(name, fused_args))
        eager = _as_tuple(rng._EAGER[name](*eager_args))
        for f, e in zip(fused, eager):
            assert f.dtype == e.dtype and f.shape == e.shape and torch.equal(f, e)
        for f, e in zip(fused_args, eager_args):  # the in-place kernels mutated the same inputs the same way
            if isinstance(f, torch.Tensor):
                assert torch.equal(f, e)
        if strided and name != "add_masked_":  # x, the one read-only (M, K) operand, reached the kernel strided
            assert fused_args[{"masked": 0, "dropout_backward_": 2}[name]].stride(1) == 2
    keep = rng.keep_mask(make_seed(2**40 + 3, torch.device("cpu")), 37, 130, 0.3)
    assert 0 < int(keep.sum()) < 37 * 130  # the mask both dropped and kept something


def test_c_mask_kernels_keep_an_element_whose_hash_equals_the_threshold():
    # keep iff hash >= threshold: the one element whose hash is the threshold itself tells >= from >
    from kasa_kernels.ops import rng

    _require_c_kernels()
    seed = make_seed(2**40 + 3, torch.device("cpu"))
    h = int(rng._hash(torch.arange(40, dtype=torch.int32), seed.to(torch.int32))[17]) & rng.MASK32
    thr = rng._signed32(h ^ 2**31)  # compare_threshold's form of threshold h
    x = torch.randn(4, 10)
    got = rng.run_fused("masked", (x, seed, thr, x.dtype))
    assert torch.equal(got, rng._masked(x, seed, thr, x.dtype)) and got.view(-1)[17] == x.view(-1)[17] != 0


def test_c_mask_kernel_adds_round_once_in_fp32_then_to_the_output_dtype():
    # torch adds a 16-bit and an fp32 tensor in fp32 and rounds the sum to the 16-bit dtype: 1 + (2^-e + 2^-30),
    # with 2^-e half a 16-bit ulp of 1, is 1 + 2^-e in fp32, a tie that rounds to even (1.0); summed in fp64 and
    # rounded once it would give 1 + 2^(1-e)
    from kasa_kernels.ops import rng

    _require_c_kernels()
    seed, thr = make_seed(1, torch.device("cpu")), rng.compare_threshold(0.0)  # p = 0: every element kept
    for dtype, half_ulp in ((torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)):
        dx = torch.ones(2, 8, dtype=dtype)
        t = torch.full((2, 8), half_ulp + 2.0**-30)
        fresh = {"add_masked_": lambda: (dx.clone(), t, seed, thr),  # fresh for each call: the kernels write them
                 "dropout_backward_": lambda: (dx.clone(), t.clone(), dx, seed, thr)}
        for name, args in fresh.items():
            got = _as_tuple(rng.run_fused(name, args()))[0]
            want = _as_tuple(rng._EAGER[name](*args()))[0]
            assert torch.equal(got, want) and bool((got == 1).all()), (name, dtype)


@pytest.mark.parametrize("name", ["masked", "add_masked_", "dropout_backward_"])
@pytest.mark.parametrize("pair", MASK_PAIRS, ids=lambda p: f"{p[0]}-{p[1]}".replace("torch.", ""))
def test_c_mask_kernels_are_bit_identical_to_eager(name, pair):
    from kasa_kernels.ops import cpu_mask

    _require_c_kernels()
    calls = []
    real = cpu_mask.KERNELS[name]
    cpu_mask.KERNELS[name] = lambda *a: (calls.append(1), real(*a))[1]
    try:
        _check_fused_against_eager(name, *pair, cases=MASK_CASES + ((1, 1, False), (0, 4, False)))
    finally:
        cpu_mask.KERNELS[name] = real
    assert calls, "the C kernel did not run"


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_c_wide_dropout_backward_is_bit_identical_to_eager(x_dtype):
    # a 16-bit layer on a CPU without 16-bit GEMMs forms dx in fp32 (torch_linear.py, "wide"): dx, t fp32, x 16-bit
    from kasa_kernels.ops import cpu_mask, rng

    _require_c_kernels()
    for rows, cols, strided in MASK_CASES:
        dx, t, x, seed, thr = _kernel_args("dropout_backward_", x_dtype, rows, cols, strided, torch.float32)
        dx = dx.float()
        assert cpu_mask.dropout_backward_(dx.clone(), t.clone(), x, seed, thr) is not None  # the C kernel ran
        got = rng.run_fused("dropout_backward_", (dx.clone(), t.clone(), x, seed, thr))
        want = rng._EAGER["dropout_backward_"](dx.clone(), t.clone(), x, seed, thr)
        assert all(g.dtype == w.dtype == torch.float32 and torch.equal(g, w) for g, w in zip(got, want))


def test_c_mask_kernel_signed_zeros_and_nans_match_eager():
    # a dropped element adds +0 (so -0 + 0 = +0, as torch's add_ gives), a kept NaN stays NaN, a dropped one is 0
    from kasa_kernels.ops import rng

    _require_c_kernels()
    seed, thr = make_seed(11, torch.device("cpu")), rng.compare_threshold(0.5)
    for dtype, operand in MASK_PAIRS:
        dx = torch.full((8, 16), -0.0, dtype=dtype)
        t = torch.full((8, 16), float("nan"), dtype=operand)
        x = torch.full((8, 16), float("nan"), dtype=dtype)
        got = rng.run_fused("dropout_backward_", (dx.clone(), t.clone(), x, seed, thr))
        want = rng._EAGER["dropout_backward_"](dx.clone(), t.clone(), x, seed, thr)
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        for g, w in zip(got, want):
            # NaN where eager has NaN (its payload is the CPU kernel's choice: torch's own vector and scalar bf16
            # casts differ there), and bit for bit elsewhere: torch.equal would take -0 for +0
            assert torch.equal(g.isnan(), w.isnan())
            ok = ~w.isnan()
            assert torch.equal(g.view(bits[g.element_size()])[ok], w.view(bits[w.element_size()])[ok])


def test_c_mask_kernels_refuse_what_they_do_not_cover():
    from kasa_kernels.ops import cpu_mask, rng

    _require_c_kernels()
    seed, thr = make_seed(5, torch.device("cpu")), rng.compare_threshold(0.25)
    x = torch.randn(6, 10)
    assert cpu_mask.masked(x.half(), seed, thr, torch.float16) is None  # a pair the backend never uses
    assert cpu_mask.masked(x, seed[:1], thr, torch.float32) is None  # a malformed seed: the torch form raises
    assert cpu_mask.add_masked_(x.t(), x.t(), seed, thr) is None  # a written tensor that is not contiguous
    assert cpu_mask.dropout_backward_(x, x.clone(), x[:, :5], seed, thr) is None  # shapes that differ
    # written tensors that share storage with each other or with a read one (the loops take restrict pointers)
    dx, t = torch.randn(6, 10), torch.randn(6, 10)
    assert cpu_mask.add_masked_(dx, dx, seed, thr) is None
    assert cpu_mask.dropout_backward_(dx, dx, x, seed, thr) is None
    assert cpu_mask.dropout_backward_(dx, t, t, seed, thr) is None
    assert cpu_mask.dropout_backward_(dx, t, x, seed, thr) is not None  # apart: the C kernel runs
    # each of them still runs, through the torch form
    want = rng._masked(x.half(), seed, thr, torch.float16)
    assert torch.equal(rng.run_fused("masked", (x.half(), seed, thr, torch.float16)), want)


def test_c_mask_kernels_tell_autograd_of_their_writes():
    from kasa_kernels.ops import rng

    _require_c_kernels()
    dx, t, x, seed, thr = _kernel_args("dropout_backward_", torch.float32)
    before = (dx._version, t._version)
    rng.run_fused("dropout_backward_", (dx, t, x, seed, thr))
    assert dx._version > before[0] and t._version > before[1]


def test_c_mask_build_failure_falls_back_to_the_torch_forms(monkeypatch, tmp_path):
    from kasa_kernels.ops import cpu_mask, rng

    monkeypatch.setattr(cpu_mask, "_lib", None)
    monkeypatch.setattr(cpu_mask, "_error", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_mask.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="building the CPU kernels"):
        assert not cpu_mask.available()
    assert not cpu_mask.available()  # once: no second warning, no second build
    x, seed = torch.randn(6, 10), make_seed(5, torch.device("cpu"))
    assert rng.kernel_path(x) == "eager"  # small: the torch form runs eagerly, as before the C kernels existed
    want = rng._masked(x, seed, rng.compare_threshold(0.25), x.dtype)
    assert torch.equal(rng.masked(x, seed, 0.25), want)
    g = torch.randn(256, 128)  # over DY_MIN_ELEMENTS: without the library, the GEMMs run
    assert cpu_mask.dy_grads(g, torch.randn(128, 4), torch.randn(4), torch.randn(256, 4), 1.0) is None


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("r", [4, 16, 32])
def test_c_dy_grads_are_the_torch_form_within_its_error(threads, r):
    """ops/cpu_rank.c's (gH, dB, dd) against fp64, within twice the error of the torch form it replaces (its GEMMs,
    B diag(d) and the diagonal of B^T (s G^T H)): G a strided view (rows wider than N), an odd M (a lone last row),
    one thread and two (per-thread partial sums of dB and dd)."""
    from kasa_kernels.ops import cpu_mask

    _require_c_kernels()
    gen = torch.Generator().manual_seed(r)
    m, n, s = 515, 300, 0.75
    g = torch.randn(m, n + 7, generator=gen)[:, 3:n + 3]
    b, d, h = torch.randn(n, r, generator=gen), torch.randn(r, generator=gen), torch.randn(m, r, generator=gen)
    assert g.numel() >= cpu_mask.DY_MIN_ELEMENTS and g.stride(0) == n + 7
    with torch_threads(threads):
        gh, db, dd = cpu_mask.dy_grads(g, b, d, h, s)
    g64, b64, d64, h64 = g.double(), b.double(), d.double(), h.double()
    bd = b * d
    gth = torch.addmm(bd, g.t(), h, beta=0.0, alpha=s)
    assert_within_ref("gh", gh, s * g64 @ (b64 * d64), torch.addmm(h, g, bd, beta=0.0, alpha=s), torch.float32)
    assert_within_ref("db", db, s * g64.t() @ h64 * d64, gth * d, torch.float32)
    assert_within_ref("dd", dd, (b64 * (s * g64.t() @ h64)).sum(0), torch.mm(b.t(), gth).diagonal(), torch.float32)


def test_c_dy_grads_decline_what_they_do_not_cover():
    """None (the torch form runs) for: a rank without an instantiation, a G below DY_MIN_ELEMENTS, rows not
    contiguous, fp64, bf16 adapters, meta tensors, a dispatch mode (the traffic counter's, fake tensors)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kasa_kernels.ops import cpu_mask

    _require_c_kernels()
    m, n = 256, 128

    def args(r=16, **kw):
        g = kw.get("g", torch.randn(m, n))
        b = kw.get("b", torch.randn(g.shape[1], r, dtype=g.dtype))
        return g, b, torch.randn(r, dtype=g.dtype), torch.randn(g.shape[0], r, dtype=g.dtype), 1.0

    assert cpu_mask.dy_grads(*args()) is not None
    assert cpu_mask.dy_grads(*args(r=5)) is None
    assert cpu_mask.dy_grads(*args(g=torch.randn(m // 4, n))) is None
    assert cpu_mask.dy_grads(*args(g=torch.randn(n, m).t())) is None
    assert cpu_mask.dy_grads(*args(g=torch.randn(m, n, dtype=torch.float64))) is None
    assert cpu_mask.dy_grads(*args(b=torch.randn(n, 16, dtype=torch.bfloat16))) is None
    assert cpu_mask.dy_grads(*args(g=torch.randn(m, n, device="meta"))) is None

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert cpu_mask.dy_grads(*args()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_layer_with_the_c_dy_grads_matches_the_reference(monkeypatch, p, dtype):
    """The whole layer where backward takes gH, dB and dd from ops/cpu_rank.c (G of DY_MIN_ELEMENTS or more, an odd
    M), within the reference's bound, and the pass ran wherever the rank-r operands are fp32: fp32 and fp16 layers,
    and bf16 ones on a CPU without bf16 GEMM kernels (with them, bf16 operands take the GEMMs)."""
    from kasa_kernels.ops import cpu_mask
    from kasa_kernels.ops.precision import operand_dtype

    _require_c_kernels()
    ran = []
    real = cpu_mask.dy_grads

    def spy(*a):
        out = real(*a)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(cpu_mask, "dy_grads", spy)
    case = make_case((5, 105), 96, 256, 16, dtype, torch.float32)
    check_against_reference(case, p=p)
    assert ran == ([True] if operand_dtype(case[0]) == torch.float32 else [])


def test_c_mask_build_uses_the_temp_directory_when_the_cache_cannot_be_made(monkeypatch, tmp_path):
    from kasa_kernels.ops import cpu_mask

    _require_c_kernels()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(cpu_mask, "_lib", None)
    monkeypatch.setattr(cpu_mask, "_error", None)
    monkeypatch.setenv(cpu_mask.CACHE_ENV, str(blocker / "cache"))  # under a file: mkdir fails
    assert cpu_mask.available(), cpu_mask._error


@pytest.mark.slow
@pytest.mark.parametrize("name", ["masked", "add_masked_", "dropout_backward_"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_inductor_mask_kernels_are_bit_identical_to_eager(inductor_only, name, dtype):
    from kasa_kernels.ops import rng

    _check_fused_against_eager(name, dtype, None)
    assert name in rng._compiled and "cpu" not in rng._failed, "the inductor-compiled kernel did not run"


def test_mask_kernels_do_what_their_docstrings_say():
    from kasa_kernels.ops import rng

    x, seed, thr, _ = _kernel_args("masked", torch.float32)
    keep = rng.keep_mask(seed, *x.shape, 0.3)
    zero = torch.zeros(())
    assert torch.equal(rng.masked(x, seed, 0.3), torch.where(keep, x, zero))
    dx, t, _, _ = _kernel_args("add_masked_", torch.float32)
    want_dx = dx + torch.where(keep, t, zero)
    got_dx, got_t = rng.dropout_backward_(dx.clone(), t.clone(), x, seed, 0.3)
    assert torch.equal(got_dx, want_dx) and torch.equal(got_t, torch.where(keep, x, zero))
    assert torch.equal(rng.add_masked_(dx.clone(), t, seed, 0.3), want_dx)


def test_kernel_path_is_fused_only_where_it_pays(monkeypatch):
    from kasa_kernels.ops import rng
    from kasa_kernels.ops.precision import meta_runs_as
    from kasa_kernels.bench.timing import LiveTensorBytes

    small = torch.empty(64, 64)
    big = torch.empty(rng.CPU_FUSED_MIN_ELEMENTS // 64, 64)
    _require_c_kernels()
    assert rng.kernel_path(small) == "fused"  # the C kernels cost no compile: every size
    with LiveTensorBytes():  # they (and torch.compile) would run unseen by a TorchDispatchMode: the eager form does not
        assert rng.kernel_path(big) == "eager"
    _without_c_kernels(monkeypatch)  # inductor alone: only where compiling a kernel pays
    assert rng.kernel_path(small) == "eager"
    assert rng.kernel_path(big) == "fused"
    meta = torch.empty(8, 8, device="meta")
    assert rng.kernel_path(meta) == "eager"
    with meta_runs_as("cuda"):
        assert rng.kernel_path(meta) == "eager"  # meta tensors have no compiled kernels: only a runner launches them
        with rng.kernels_run_by(lambda name, fn, args: fn(*args)):
            assert rng.kernel_path(meta) == "fused"
    monkeypatch.setattr(rng, "_failed", {"cpu"})
    assert rng.kernel_path(big) == "eager"


def test_fused_kernel_falls_back_once_and_keeps_real_errors(monkeypatch):
    from kasa_kernels.ops import rng

    def broken(*args):
        raise RuntimeError("inductor is unavailable (simulated)")

    _without_c_kernels(monkeypatch)
    monkeypatch.setattr(rng, "_compiled", {"masked": broken})
    monkeypatch.setattr(rng, "_failed", set())
    monkeypatch.setattr(rng, "CPU_FUSED_MIN_ELEMENTS", 1)
    x, seed = torch.randn(6, 10), make_seed(5, torch.device("cpu"))
    want = rng._masked(x, seed, rng.compare_threshold(0.25), x.dtype)
    with pytest.warns(UserWarning, match="compiling the dropout-mask kernel masked on cpu failed"):
        got = rng.masked(x, seed, 0.25)
    assert rng._failed == {"cpu"} and torch.equal(got, want)
    assert rng.kernel_path(x) == "eager"
    # an error of the inputs is raised, not mistaken for a compile failure (the fused path stays enabled)
    monkeypatch.setattr(rng, "_failed", set())
    with pytest.raises(IndexError):
        rng.masked(x, seed[:1], 0.25)
    assert rng._failed == set()


@pytest.mark.parametrize("kernels", ["c", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_layer_on_the_fused_mask_path_matches_reference(monkeypatch, request, kernels, dtype, p):
    # the CPU threshold at 0: every mask kernel of this layer runs fused, as on CUDA and on big CPU layers
    from kasa_kernels.ops import rng

    if kernels == "c":
        _require_c_kernels()
    else:
        request.getfixturevalue("inductor_only")
    monkeypatch.setattr(rng, "CPU_FUSED_MIN_ELEMENTS", 0)
    launched = []
    real = rng.run_fused
    monkeypatch.setattr(rng, "run_fused", lambda name, args: (launched.append(name), real(name, args))[1])
    check_against_reference(make_case((29,), 48, 20, 4, dtype, torch.float32), p=p)
    assert sorted(set(launched)) == ["dropout_backward_", "masked"] and "cpu" not in rng._failed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["masked", "add_masked_", "dropout_backward_"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_fused_mask_kernels_on_cuda_are_bit_identical(name, dtype):
    from kasa_kernels.ops import rng

    args = tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in _kernel_args(name, dtype, 1000, 4099))
    assert rng.kernel_path(args[0]) == "fused"
    fused_args, eager_args = _clone_args(args), _clone_args(args)
    fused = _as_tuple(rng._launch(name, args[0], *fused_args))
    assert name in rng._compiled and "cuda" not in rng._failed, "the compiled path did not run"
    eager = _as_tuple(rng._EAGER[name](*eager_args))
    for f, e in zip(fused + fused_args, eager + eager_args):
        if isinstance(f, torch.Tensor):
            assert torch.equal(f, e)


# This machine's CPU decides the path a bf16 / fp16 layer takes (precision.PATHS); the other one is forced here, so
# both CPU paths are held to the reference wherever the suite runs.
@pytest.mark.parametrize("lowp_gemm", [True, False], ids=["lowp-gemm", "no-lowp-gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_both_cpu_paths_match_reference(monkeypatch, lowp_gemm, dtype, p):
    from kasa_kernels.ops import precision

    monkeypatch.setitem(precision._CPU_LOWP_GEMM, dtype, lowp_gemm)
    x = make_case((3, 13), 64, 96, 8, dtype, torch.float32)[0]
    assert precision.operand_dtype(x) == (dtype if lowp_gemm and dtype == torch.bfloat16 else torch.float32)
    check_against_reference(make_case((3, 13), 64, 96, 8, dtype, torch.float32), p=p)
    check_against_reference(make_case((2, 11), 33, 21, 3, dtype, dtype, noncontig=True), p=p)


@pytest.mark.parametrize("lowp_gemm", [True, False], ids=["lowp-gemm", "no-lowp-gemm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_no_16_bit_gemm_where_the_cpu_has_no_kernels_for_it(monkeypatch, lowp_gemm, dtype, p):
    # torch's fallback 16-bit GEMM is 4-6x slower than fp32 on such CPUs (torch_linear.py, "wide"): every GEMM of the
    # layer takes fp32 operands there, and where the CPU has 16-bit GEMM kernels the base GEMMs keep x's dtype
    from torch.utils._python_dispatch import TorchDispatchMode

    from kasa_kernels.ops import precision

    monkeypatch.setitem(precision._CPU_LOWP_GEMM, dtype, lowp_gemm)
    x, w, b, a, d, bb = make_case((3, 13), 64, 96, 8, dtype, torch.float32)[:6]
    for t in (x, a, d, bb):
        t.requires_grad_(True)
    gemms = []

    class Gemms(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("mm", "addmm", "addmm_", "linear"):
                gemms.append({t.dtype for t in args if isinstance(t, torch.Tensor)})
            return func(*args, **(kwargs or {}))

    with Gemms():
        y = kk.kasa_linear(x, w, b, a, d, bb, 2.0, dropout_p=p, backend="torch")
        y.backward(torch.ones_like(y))
    assert len(gemms) >= 8
    sixteen_bit = [g for g in gemms if dtype in g]
    assert (sixteen_bit == []) if not lowp_gemm else (len(sixteen_bit) >= 2), gemms


@pytest.mark.parametrize("lowp_gemm", [True, False], ids=["lowp-gemm", "no-lowp-gemm"])
def test_backward_inside_autocast_gives_the_gradients_of_backward_outside(monkeypatch, lowp_gemm):
    # autograd runs a backward called inside an autocast block with autocast on; the op must still run with it off
    from kasa_kernels.ops import precision

    monkeypatch.setitem(precision._CPU_LOWP_GEMM, torch.bfloat16, lowp_gemm)
    layer = kk.KasaLinear(24, 16, r=4, dropout=0.2, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24)

    def grads(backward_inside):
        torch.manual_seed(3)
        for p in layer.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            if backward_inside:
                y.float().square().sum().backward()
        if not backward_inside:
            y.float().square().sum().backward()
        return [p.grad.clone() for p in (layer.lora_A, layer.lora_diag, layer.lora_B)]

    for inside, outside in zip(grads(True), grads(False)):
        assert torch.equal(inside, outside)


# The CUDA path (precision.PATHS): bf16 rank-r products summed to fp32 by torch.mm(..., out_dtype=fp32), the mask
# kernels compiled to Triton. Run by the GPU session (tools/gpu_session.sh: pytest -m gpu).
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cuda_path_matches_reference(dtype, p):
    from kasa_kernels.ops import precision

    case = make_case((3, 37), 64, 96, 8, dtype, torch.float32, device="cuda")
    assert precision.mm_sums_to_fp32(case[0]) == (dtype == torch.bfloat16)
    check_against_reference(case, p=p)
    check_against_reference(make_case((2, 11), 33, 21, 3, dtype, dtype, noncontig=True, device="cuda"), p=p)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_torch_compile_fullgraph_on_cuda_bf16_matches_eager():
    import torch._inductor.config as inductor_config

    torch.manual_seed(0)
    layer = kk.KasaLinear(64, 48, r=8, dropout=0.1, backend="torch", dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 33, 64, device="cuda", dtype=torch.bfloat16)

    def step(module):
        torch.manual_seed(11)
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.float().square().sum().backward()
        out = [y.detach(), xi.grad] + [p.grad.clone() for p in (layer.lora_A, layer.lora_diag, layer.lora_B)]
        for p in (layer.lora_A, layer.lora_diag, layer.lora_B):
            p.grad = None
        return out

    eager = step(layer)
    with inductor_config.patch(fallback_random=True):
        compiled = step(torch.compile(layer, fullgraph=True))
    for name, e, c in zip(LINEAR_NAMES, eager, compiled):
        # same mask and math, other fusion and rounding: a few bf16 ulps of the largest value
        torch.testing.assert_close(c.float(), e.float(), rtol=0, atol=2**-6 * e.float().abs().max().item(), msg=name)
