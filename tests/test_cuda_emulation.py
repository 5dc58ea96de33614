"""csrc/'s CUDA kernels run on the CPU, against the reference (tests/cuda_emu/ emulates the device: blocks one after
another, the threads of a block as concurrent std::threads with real barriers and warp shuffles, cp.async copies
deferred until their wait, shared memory that starts as NaN, WMMA tiles with TF32 rounding, under ASan and UBSan).

No GPU is needed, so CI runs the kernels' indexing, edge masks, pipelines and epilogues on every change. What the
emulation cannot see: timing-dependent races between warps that the barriers do not order (threads interleave by the
OS scheduler, not by the hardware's), bank conflicts, performance, register spills, and anything nvcc does that g++
does not (it only proves the kernels compile for sm_80 in tests/test_cuda.py).
"""
import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import kasa_reference as ref
from helpers import assert_close_to_reference, regularizer_magnitudes
from kasa_kernels.ops.rng import dropout_threshold, keep_mask

HERE = Path(__file__).resolve().parent
# Loaded by path under its own name: a plain `import build` could find PyPA's `build` package instead.
_spec = importlib.util.spec_from_file_location("kasa_cuda_emu_build", HERE / "cuda_emu" / "build.py")
emu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)

DT = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32, "tf32": torch.float32,
      "ffma": torch.float32}
RUN_TIMEOUT = 90  # a deadlock (e.g. a shuffle only part of a warp reaches) fails here


def _in_ci():
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        assert not _in_ci(), f"CI must run the CUDA emulation, but {cxx} is not on PATH"
        pytest.skip(f"{cxx} is not on PATH: the CUDA emulation needs a C++20 g++")
    # KASA_EMU_SANITIZE=0 builds without ASan/UBSan, for a toolchain that lacks their runtimes (CI keeps them).
    sanitize = os.environ.get("KASA_EMU_SANITIZE", "1") != "0"
    # KASA_EMU_BUILD_DIR: build there, recompiling only the units whose inputs changed (mutation runs by hand).
    keep = os.environ.get("KASA_EMU_BUILD_DIR")
    return emu_build.build(keep or tmp_path_factory.mktemp("cuda_emu"), jobs=max(2, os.cpu_count() or 2),
                           sanitize=sanitize, cxx=cxx, incremental=bool(keep))


def _raw(t):
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def _load(path, dtype):
    a = np.fromfile(path, dtype=np.uint8)
    return torch.from_numpy(a.copy()).view(dtype)


class Case:
    """Buffers for one launch in a directory; each tensor is written with its exact storage."""

    def __init__(self, exe, tmp_path):
        self.exe, self.dir, self.params = exe, tmp_path, {}
        tmp_path.mkdir(parents=True, exist_ok=True)

    def put(self, name, flat, off_elems=0):
        (self.dir / f"{name}.bin").write_bytes(_raw(flat))
        if off_elems:
            self.params[f"{name}_off"] = off_elems * flat.element_size()

    def run(self, op, **params):
        self.params.update(params)
        args = [str(self.exe), op, str(self.dir)] + [f"{k}={v}" for k, v in self.params.items()]
        r = subprocess.run(args, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert r.returncode == 0, f"emulator failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
        return r.stdout

    def get(self, name, dtype):
        return _load(self.dir / f"{name}.out", dtype)


def strided(rows, cols, ld, dtype, gen, off=0, scale=1.0, fill=float("nan")):
    """A (rows, cols) matrix with row stride ld inside exact storage of off + (rows-1)*ld + cols elements; the
    elements no row owns (the offset and the gaps between rows) hold `fill`, so reading them shows up."""
    n = off + (rows - 1) * ld + cols if rows > 0 else off
    flat = torch.full((n,), fill, dtype=torch.float32)
    vals = torch.randn(rows, cols, generator=gen) * scale
    view = flat[off:].as_strided((rows, cols), (ld, 1)) if rows > 0 else flat[:0].view(0, cols)
    view.copy_(vals)
    flat = flat.to(dtype)
    return flat, flat[off:].as_strided((rows, cols), (ld, 1))


def seed_tensor(s0, s1):
    return torch.tensor([s0, s1], dtype=torch.int64)


def tf32_round(t):
    """cvt.rna.tf32.f32 on a float32 tensor: nearest, ties away from zero, 10 mantissa bits."""
    u = t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    finite = (u & 0x7F800000) != 0x7F800000
    r = torch.where(finite, (u + 0x1000) & 0xFFFFE000, u)
    r = torch.where(r >= 2**31, r - 2**32, r).to(torch.int32)
    return r.view(torch.float32)


def lowp_matmul(a, b, dt):
    """a @ b as the plain formula computes it in the kernel's input precision. On contiguous copies: the operands
    are often strided views whose gaps hold NaN, and a CPU BLAS may read past a row's end (seen: torch's bf16 GEMM on
    an Intel Xeon with AMX, K = 41), which would poison the reference instead of testing the kernel."""
    a, b = a.contiguous(), b.contiguous()
    if dt == "tf32":
        return tf32_round(a.float()) @ tf32_round(b.float())
    return a @ b


# ---------------------------------------------------------------------------------------------------------------
# Known answers: each emulated PTX instruction against its layout in the PTX ISA, written out here a second time
# (independently of tests/cuda_emu/emu_ptx.h): g = lane // 4 ("groupID"), t = lane % 4 ("threadID_in_group").

def _lanes():
    """Per lane of a warp: its group g = lane // 4 and its thread in the group t = lane % 4 (the PTX ISA's names)."""
    lane = np.arange(32)
    return lane // 4, lane % 4


def _pack16(lo, hi):
    return (lo.astype(np.uint32) & 0xFFFF) | ((hi.astype(np.uint32) & 0xFFFF) << 16)


def ldmatrix_expected(stored, rows, n, trans):
    """ldmatrix.m8n8.x{n}[.trans].b16: lane 8 i + j addresses row j of matrix i; lane l gets, per matrix i, the
    elements (l // 4, 2 (l % 4)) and (l // 4, 2 (l % 4) + 1), or with .trans (2 (l % 4), l // 4) and
    (2 (l % 4) + 1, l // 4)."""
    g, t = _lanes()
    out = np.zeros((32, n), np.uint32)
    for i in range(n):
        if trans:
            out[:, i] = _pack16(stored[rows[8 * i + 2 * t], g], stored[rows[8 * i + 2 * t + 1], g])
        else:
            out[:, i] = _pack16(stored[rows[8 * i + g], 2 * t], stored[rows[8 * i + g], 2 * t + 1])
    return out


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_known_answer_ldmatrix(emu, tmp_path, n, trans):
    rng = np.random.default_rng(n * 2 + trans)
    stored = rng.integers(0, 2**16, size=(64, 8), dtype=np.uint16)
    rows = rng.permutation(64)[:32].astype(np.int32)  # each lane addresses a different, scattered row
    rows[8 * n:] = 100000  # addresses of lanes past 8 n are ignored by the hardware: never dereferenced
    c = Case(emu, tmp_path)
    c.put("in", torch.from_numpy(stored.view(np.int16).copy()))
    c.put("rows", torch.from_numpy(rows))
    c.put("out", torch.zeros(32 * n, dtype=torch.int32))
    c.run("kat", which="ldmatrix", n=n, trans=int(trans))
    got = c.get("out", torch.int32).numpy().view(np.uint32).reshape(32, n)
    np.testing.assert_array_equal(got, ldmatrix_expected(stored, rows, n, trans))


def frag_positions(kind, operand):
    """(row, col) of each fragment element, per lane and register (and half for 16-bit operands), from the PTX
    ISA's "Matrix Fragments for mma.m16n8k16 with floating point type" / "... mma.m16n8k8" (.tf32)."""
    g, t = _lanes()
    if operand == "c":  # both shapes: c0, c1 at (g, 2t + i), c2, c3 at (g + 8, 2t + i)
        return [(g + 8 * (e // 2), 2 * t + e % 2) for e in range(4)]
    if kind == "tf32":
        if operand == "a":  # a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4)
            return [(g + 8 * (q % 2), t + 4 * (q // 2)) for q in range(4)]
        return [(t + 4 * q, g) for q in range(2)]  # b0 (t, g), b1 (t + 4, g)
    if operand == "a":  # a_i: row g (+8 for i in 2,3 / 6,7), col 2t + (i & 1) (+8 for i >= 4); two per register
        return [[(g + 8 * (q % 2), 2 * t + h + 8 * (q // 2)) for h in range(2)] for q in range(4)]
    return [[(2 * t + h + 8 * q, g) for h in range(2)] for q in range(2)]  # b_i: row 2t + (i & 1) (+8 for i >= 2)


def pack_fragment(kind, operand, mat):
    """The (32, registers) uint32 fragment of `mat` (integer-valued) in the kind's input type."""
    pos = frag_positions(kind, operand)
    if kind == "tf32":
        vals = [torch.from_numpy(mat[r, c].astype(np.float32)) for r, c in pos]
        return np.stack([v.view(torch.int32).numpy().view(np.uint32) for v in vals], axis=1)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float16

    def bits(r, c):
        return torch.from_numpy(mat[r, c].astype(np.float32)).to(dtype).view(torch.int16).numpy()

    return np.stack([_pack16(bits(*lo), bits(*hi)) for lo, hi in pos], axis=1)


MMA_KINDS = {"bf16": (0, 16), "f16": (1, 16), "tf32": (2, 8)}  # driver code, k


@pytest.mark.parametrize("kind", list(MMA_KINDS))
def test_known_answer_mma(emu, tmp_path, kind):
    # Small integers: every product and sum is exact, so D = A B + C must hold bit for bit.
    code, k = MMA_KINDS[kind]
    rng = np.random.default_rng(code)
    A = rng.integers(-8, 9, size=(16, k)).astype(np.float64)
    B = rng.integers(-8, 9, size=(k, 8)).astype(np.float64)
    C = rng.integers(-100, 101, size=(16, 8)).astype(np.float64)
    c = Case(emu, tmp_path)
    c.put("a", torch.from_numpy(pack_fragment(kind, "a", A).view(np.int32).copy()))
    c.put("b", torch.from_numpy(pack_fragment(kind, "b", B).view(np.int32).copy()))
    c.put("c", torch.from_numpy(np.stack([C[r, cc] for r, cc in frag_positions(kind, "c")], 1).astype(np.float32)))
    c.put("out", torch.zeros(32 * 4))
    c.run("kat", which="mma", kind=code)
    d = c.get("out", torch.float32).numpy().reshape(32, 4)
    D = np.zeros((16, 8))
    for e, (r, cc) in enumerate(frag_positions(kind, "c")):
        D[r, cc] = d[:, e]
    np.testing.assert_array_equal(D, A @ B + C)


@pytest.mark.parametrize("kind,b_kmajor", [("bf16", False), ("bf16", True), ("f16", False), ("f16", True),
                                           ("tf32", False)])
def test_known_answer_ldmatrix_feeds_mma(emu, tmp_path, kind, b_kmajor):
    # The addressing gemm_lowrank.cuh uses: ldmatrix.x4 of a row-major 16 x (32 bytes) A tile gives the A fragment,
    # ldmatrix.x2 of n-major B (or .x2.trans of k-major B) the B fragment, also for fp32 data read as 16-bit pairs.
    code, k = MMA_KINDS[kind]
    rng = np.random.default_rng(10 + code + b_kmajor)
    A = rng.integers(-8, 9, size=(16, k)).astype(np.float32)
    B = rng.integers(-8, 9, size=(k, 8)).astype(np.float32)
    dtype = torch.float32 if kind == "tf32" else (torch.bfloat16 if kind == "bf16" else torch.float16)
    c = Case(emu, tmp_path)
    c.put("a", torch.from_numpy(A).to(dtype).flatten())
    c.put("b", torch.from_numpy(B if b_kmajor else B.T.copy()).to(dtype).flatten())
    c.put("out", torch.zeros(32 * 4))
    c.run("kat", which="ldmatrix_mma", kind=code, b_kmajor=int(b_kmajor))
    d = c.get("out", torch.float32).numpy().reshape(32, 4)
    D = np.zeros((16, 8), np.float32)
    for e, (r, cc) in enumerate(frag_positions(kind, "c")):
        D[r, cc] = d[:, e]
    np.testing.assert_array_equal(D, A @ B)


def test_known_answer_cp_async_groups(emu, tmp_path):
    # Four groups (16 bytes in full, 5 of 16, 0 of 16, 16): wait_group n retires all but the n newest. The emulation
    # lands a group's bytes only when it is retired (hardware may land them earlier), so reading too early shows the
    # 0xFF fill; the bytes past src-size are zero.
    src = np.arange(1, 65, dtype=np.uint8)
    c = Case(emu, tmp_path)
    c.put("src", torch.from_numpy(src.copy()))
    c.put("out", torch.zeros(256, dtype=torch.uint8))
    c.run("kat", which="cp_async")
    got = c.get("out", torch.uint8).numpy().reshape(4, 64)
    landed = [src[0:16], np.r_[src[16:21], np.zeros(11, np.uint8)], np.zeros(16, np.uint8), src[48:64]]
    for snap in range(4):
        want = np.full(64, 0xFF, np.uint8)
        for grp in range(snap + 1):
            want[16 * grp:16 * grp + 16] = landed[grp]
        np.testing.assert_array_equal(got[snap], want, err_msg=f"after wait_group {3 - snap}")


# ---------------------------------------------------------------------------------------------------------------
# gemm_lowrank: forward out = x w^T + lx lw^T + bias; backward out = x w + drop(lx lw)

def run_gemm(emu, tmp_path, dt, fwd, M, N, K, R, pad=0, off=0, bias=True, p=0.0, seed=(0x1234, 0x9876), gen=None,
             cc=86):
    """One launch of the fused GEMM on an emulated sm_{cc} device (80: the wide 128 x 256 tile, 86: 128 x 128)."""
    dtype = DT[dt]
    # pad < 0: every row padded to the next 32-byte boundary past its end, so rows are aligned for 16-byte copies
    # while the last chunk of a row still crosses the matrix edge.
    ld = (lambda cols: cols + pad) if pad >= 0 else (lambda cols: (cols + 8) // 8 * 8)
    gen = gen or torch.Generator().manual_seed(M * 7919 + N * 31 + K * 7 + R)
    c = Case(emu, tmp_path)
    x_flat, x = strided(M, K, ld(K), dtype, gen, off)
    if fwd:
        w_flat, w = strided(N, K, ld(K), dtype, gen, off, scale=K ** -0.5)
        lw_flat, lw = strided(N, R, ld(R), dtype, gen, off)
    else:
        w_flat, w = strided(K, N, ld(N), dtype, gen, off, scale=K ** -0.5)
        lw_flat, lw = strided(R, N, ld(N), dtype, gen, off)
    lx_flat, lx = strided(M, R, ld(R), dtype, gen, off, scale=R ** -0.5)
    ldo = ld(N)
    o_flat = torch.full((off + (M - 1) * ldo + N,), 7.0).to(dtype)
    for name, flat in (("x", x_flat), ("w", w_flat), ("lx", lx_flat), ("lw", lw_flat), ("out", o_flat)):
        c.put(name, flat, off)
    b = None
    if bias:
        b_flat, b = strided(1, N, N, dtype, gen, off)
        b = b[0]
        c.put("bias", b_flat, off)
    params = dict(dt=dt, fwd=int(fwd), M=M, N=N, K=K, R=R, ldx=ld(K), ldw=ld(K if fwd else N), ldlx=ld(R),
                  ldlw=ld(R if fwd else N), ldo=ldo, cc=cc)
    mask = None
    if p > 0:
        assert not fwd
        sd = seed_tensor(*seed)
        c.put("seed", sd)
        params.update(threshold=dropout_threshold(p), keep_scale=repr(1.0 / (1.0 - p)))
        mask = keep_mask(sd, M, N, p).double() / (1.0 - p)
    c.run("gemm", **params)
    got_flat = c.get("out", dtype)
    got = got_flat[off:].as_strided((M, N), (ldo, 1))
    # Nothing outside the (M, N) view may change: not the row gaps, not the leading offset.
    untouched = torch.ones(got_flat.numel(), dtype=torch.bool)
    untouched[off:].as_strided((M, N), (ldo, 1)).fill_(False)
    assert (got_flat[untouched].float() == 7.0).all(), "gemm wrote outside its output rows"

    d = lambda t: t.double().contiguous()  # noqa: E731
    ab = lambda t: d(t).abs()  # noqa: E731
    wt = (lambda t: t.T) if fwd else (lambda t: t)  # noqa: E731
    main64, lr64 = d(x) @ wt(d(w)), d(lx) @ wt(d(lw))
    main_lp, lr_lp = lowp_matmul(x, wt(w), dt), lowp_matmul(lx, wt(lw), dt)
    mag = ab(x) @ wt(ab(w)) + (ab(lx) @ wt(ab(lw))) * (1.0 if mask is None else mask)
    if mask is not None:
        lr64 = lr64 * mask
        lr_lp = (lr_lp.double() * mask).to(lr_lp.dtype)
    ref64 = main64 + lr64 + (d(b) if b is not None else 0)
    ref_lp = main_lp + lr_lp + (b if b is not None else 0)
    mag = mag + (ab(b) if b is not None else 0)
    assert_close_to_reference(f"gemm {dt} fwd={fwd} {M}x{N}x{K} r{R}", got, ref64, ref_lp.to(dtype), dtype,
                              magnitude=mag, factor=4.0 if dt in ("tf32", "ffma") else 2.0)
    return got


GEMM_SHAPES = [  # M, N, K, R: every edge of the 128 x 128 tile, the k-tile (64 / 32) and the rank tile
    (1, 5, 7, 1),
    (37, 130, 136, 16),
    (130, 264, 136, 33),
]


@pytest.mark.parametrize("dt", ["f16", "bf16", "tf32", "ffma"])
@pytest.mark.parametrize("fwd", [True, False], ids=["fwd", "bwd"])
def test_gemm_lowrank_odd_shapes(emu, tmp_path, dt, fwd):
    # fp16 differs from bf16 only in the mma's input type (held to its known answer): it skips the largest shape,
    # which costs the emulation most (every warp-wide instruction is a barrier of 32 threads).
    for i, (M, N, K, R) in enumerate(GEMM_SHAPES[:2] if dt == "f16" else GEMM_SHAPES):
        run_gemm(emu, tmp_path / str(i), dt, fwd, M, N, K, R, bias=fwd and i != 1)


@pytest.mark.parametrize("dt", ["f16", "bf16", "tf32", "ffma"])
def test_gemm_lowrank_strided_unaligned(emu, tmp_path, dt):
    # Rows padded (ld > K) but 16-byte aligned: the cp.async path; then odd strides and an odd base: element loads.
    run_gemm(emu, tmp_path / "a", dt, True, 37, 70, 40, 8, pad=8, bias=True)
    run_gemm(emu, tmp_path / "b", dt, True, 37, 70, 41, 9, pad=3, off=1, bias=True)
    run_gemm(emu, tmp_path / "c", dt, False, 37, 70, 41, 9, pad=1, off=1, bias=False)
    # Aligned rows with ragged edges: 16-byte copies inside, element loads for the chunk that crosses K, N or R.
    run_gemm(emu, tmp_path / "d", dt, True, 37, 70, 41, 9, pad=-1, bias=True)
    run_gemm(emu, tmp_path / "e", dt, False, 37, 70, 41, 9, pad=-1, bias=False)


@pytest.mark.parametrize("dt", ["bf16", "tf32", "ffma"])  # fp16: as bf16 but for the mma's input type
def test_gemm_lowrank_wide_tile(emu, tmp_path, dt):
    # An emulated sm80 gets the 128 x 256 tile (64 x 64 warp tiles, 144 KB of shared memory): two column tiles and
    # ragged edges forward; backward with the rank-r prologue masked, on rows aligned for 16-byte copies.
    run_gemm(emu, tmp_path / "a", dt, True, 130, 300, 72, 16, bias=True, cc=80)
    run_gemm(emu, tmp_path / "b", dt, False, 37, 264, 72, 9, pad=-1, bias=False, p=0.3, cc=80)


def test_gemm_grouped_launch_order(emu, tmp_path):
    # 10 row tiles x 2 column tiles: launch order groups 8 row tiles, so the last group is 2 rows short; every output
    # tile must still be computed exactly once (run_gemm checks every element and the untouched row gaps).
    run_gemm(emu, tmp_path / "a", "ffma", True, 1153, 130, 16, 8, bias=True)  # FFMA: the same order, cheaper here
    run_gemm(emu, tmp_path / "b", "bf16", True, 37, 20, 16, 8, bias=True, cc=90)  # sm90: the 128 x 128 tile


@pytest.mark.parametrize("dt", ["f16", "bf16", "tf32", "ffma"])
def test_gemm_lowrank_backward_dropout(emu, tmp_path, dt):
    run_gemm(emu, tmp_path / "a", dt, False, 130, 37, 40, 16, bias=False, p=0.3)
    run_gemm(emu, tmp_path / "b", dt, False, 5, 130, 7, 33, pad=1, off=1, bias=False, p=0.5)


@pytest.mark.parametrize("dt", ["bf16", "tf32"])
def test_gemm_base_without_adapter(emu, tmp_path, dt):
    # base_gemm passes R = 0 and no rank-R operands; K = 0 leaves out = bias.
    dtype = DT[dt]
    for i, (M, N, K) in enumerate([(37, 130, 41), (3, 20, 0)]):
        gen = torch.Generator().manual_seed(i)
        c = Case(emu, tmp_path / str(i))
        x, w, b = (torch.randn(M, K, generator=gen).to(dtype), torch.randn(N, K, generator=gen).to(dtype),
                   torch.randn(N, generator=gen).to(dtype))
        for name, t in (("x", x), ("w", w), ("bias", b), ("out", torch.full((M * N,), 7.0).to(dtype))):
            c.put(name, t.flatten())
        c.run("gemm", dt=dt, fwd=1, M=M, N=N, K=K, R=0, ldx=max(K, 1), ldw=max(K, 1), ldo=N)
        got = c.get("out", dtype).view(M, N)
        ref64 = x.double() @ w.double().T + b.double()
        mag = x.double().abs() @ w.double().abs().T + b.double().abs()
        assert_close_to_reference(f"base gemm {dt} {M}x{N}x{K}", got, ref64,
                                  (lowp_matmul(x, w.T, dt) + b).to(dtype), dtype, magnitude=mag, factor=4.0)


def test_gemm_dropout_mask_bit_identical(emu, tmp_path):
    # x = 0 and lx lw = 1 leave out = keep_mask / (1 - p) exactly, element by element.
    M, N, p, seed = 67, 150, 0.25, (0xDEADBEEF, 0x01234567)
    c = Case(emu, tmp_path)
    c.put("x", torch.zeros(M * 8))
    c.put("w", torch.zeros(8 * N))
    c.put("lx", torch.ones(M))
    c.put("lw", torch.ones(N))
    c.put("out", torch.full((M * N,), 7.0))
    sd = seed_tensor(*seed)
    c.put("seed", sd)
    c.run("gemm", dt="ffma", fwd=0, M=M, N=N, K=8, R=1, ldx=8, ldw=N, ldlx=1, ldlw=N, ldo=N,
          threshold=dropout_threshold(p), keep_scale=repr(1.0 / (1.0 - p)))
    got = c.get("out", torch.float32).view(M, N)
    want = keep_mask(sd, M, N, p).float() * np.float32(1.0 / (1.0 - p))
    assert torch.equal(got, want), f"{(got != want).sum().item()} mask elements differ"


def test_gemm_tf32_rounds_operands_like_hardware(emu, tmp_path):
    # x, |w| = 1 + k 2^-13 (k < 8) lie between the TF32 neighbours 1 and 1 + 2^-10, k = 4 exactly halfway. Once
    # rounded, every product and every partial sum is exact in fp32, so out must equal round_tf32(x) round_tf32(w)^T
    # bit for bit: any other rounding of either operand (truncation, ties to even, none) changes some element.
    gen = torch.Generator().manual_seed(3)
    M, N, K = 20, 24, 8
    x = 1 + torch.randint(0, 8, (M, K), generator=gen).float() * 2.0 ** -13
    w = (1 + torch.randint(0, 8, (N, K), generator=gen).float() * 2.0 ** -13)
    w = w * (torch.randint(0, 2, (N, K), generator=gen).float() * 2 - 1)
    c = Case(emu, tmp_path)
    c.put("x", x.flatten())
    c.put("w", w.flatten())
    c.put("lx", torch.zeros(M))
    c.put("lw", torch.zeros(N))
    c.put("out", torch.full((M * N,), 7.0))
    c.run("gemm", dt="tf32", fwd=1, M=M, N=N, K=K, R=1, ldx=K, ldw=K, ldlx=1, ldlw=1, ldo=N)
    got = c.get("out", torch.float32).view(M, N)
    want = (tf32_round(x).double() @ tf32_round(w).double().T).float()
    assert torch.equal(got, want)
    # The case tells the roundings apart: truncating either operand instead gives other bits.
    trunc = lambda t: (t.view(torch.int32) & -8192).view(torch.float32)  # noqa: E731
    for xa, wa in ((tf32_round(x), trunc(w)), (trunc(x), tf32_round(w))):
        assert not torch.equal(want, (xa.double() @ wa.double().T).float())


# ---------------------------------------------------------------------------------------------------------------
# lowrank_shrink: H = dropout(x) A^T (fp32), S = H * sd (x's dtype)

def run_shrink(emu, tmp_path, dt, M, K, R, pad=0, off=0, splits=1, p=0.0, seed=(77, 99), sms=4):
    dtype = DT[dt]
    gen = torch.Generator().manual_seed(M * 131 + K * 17 + R)
    c = Case(emu, tmp_path)
    x_flat, x = strided(M, K, K + pad, dtype, gen, off)
    a = torch.randn(R, K, generator=gen) * K ** -0.5
    sdv = torch.randn(R, generator=gen) * 2
    c.put("x", x_flat, off)
    c.put("a", a)
    c.put("sd", sdv)
    c.put("h", torch.full((M * R,), float("nan")))
    c.put("s", torch.full((M * R,), float("nan")).to(dtype))
    params = dict(dt=dt, M=M, K=K, R=R, ldx=K + pad, splits=splits, sms=sms)
    xd = x.double().contiguous()
    if p > 0:
        sd = seed_tensor(*seed)
        c.put("seed", sd)
        params.update(threshold=dropout_threshold(p), keep_scale=repr(1.0 / (1.0 - p)))
        xd = xd * keep_mask(sd, M, K, p).double() / (1.0 - p)
    stdout = c.run("shrink", **params)
    h = c.get("h", torch.float32).view(M, R)
    s = c.get("s", dtype).view(M, R)
    ref64 = xd @ a.double().T
    assert_close_to_reference(f"shrink H {dt} {M}x{K} r{R} splits={splits}", h, ref64, (xd.float() @ a.T),
                              torch.float32, magnitude=xd.abs() @ a.double().abs().T, factor=4.0)
    want_s = (h * sdv).to(dtype)  # fp32 product, one rounding: bit-exact
    assert torch.equal(s.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want_s.view(torch.int16 if dtype != torch.float32 else torch.int32)), "S != H * sd rounded"
    return stdout, h


@pytest.mark.parametrize("dt", ["f16", "bf16", "f32"])
def test_lowrank_shrink(emu, tmp_path, dt):
    run_shrink(emu, tmp_path / "a", dt, 1, 7, 1)
    run_shrink(emu, tmp_path / "g", dt, 1, 300, 16, pad=1, splits=-1, sms=64)  # decode: one row, K split
    run_shrink(emu, tmp_path / "b", dt, 37, 136, 16, pad=3, off=1)            # element loads
    run_shrink(emu, tmp_path / "c", dt, 130, 264, 33, splits=3)               # two row blocks, two rank tiles
    run_shrink(emu, tmp_path / "d", dt, 5, 300, 9, pad=4, splits=-1, sms=64, p=0.3)  # the heuristic splits
    run_shrink(emu, tmp_path / "f", dt, 20, 130, 16, pad=6, p=0.2)  # aligned rows, last chunk crosses K
    run_shrink(emu, tmp_path / "e", dt, 3, 130, 5, splits=7)                   # more splits than k-steps allow


def test_lowrank_shrink_dropout_mask_bit_identical(emu, tmp_path):
    # x = 1, A = I: H = dropout(x) exactly, so H / keep_scale is the mask.
    M, K, p, seed = 45, 40, 0.4, (0x5EED, 0xF00D)
    c = Case(emu, tmp_path)
    c.put("x", torch.ones(M * K))
    c.put("a", torch.eye(K).flatten())
    c.put("sd", torch.ones(K))
    c.put("h", torch.full((M * K,), float("nan")))
    c.put("s", torch.full((M * K,), float("nan")))
    sd = seed_tensor(*seed)
    c.put("seed", sd)
    c.run("shrink", dt="f32", M=M, K=K, R=K, ldx=K, splits=1, threshold=dropout_threshold(p),
          keep_scale=repr(1.0 / (1.0 - p)))
    h = c.get("h", torch.float32).view(M, K)
    want = keep_mask(sd, M, K, p).float() * np.float32(1.0 / (1.0 - p))
    assert torch.equal(h, want), f"{(h != want).sum().item()} mask elements differ"


# ---------------------------------------------------------------------------------------------------------------
# dy_pass: gH = s (G B) d, dB = s G^T (H d), dd = colsum(s (G B) H); sum_partials

# The rank-r backward kernels sum on TF32 tensor cores (2xTF32) for 16-bit inputs on an emulated sm80 and with FFMA
# on sm86; fp32 inputs take FFMA on every architecture.
RANK_R_PATHS = [pytest.param(dt, cc, id=f"{dt}-{'mma' if cc == 80 and dt != 'f32' else 'ffma'}-sm{cc}")
                for dt, cc in (("f16", 80), ("bf16", 80), ("f16", 86), ("bf16", 86), ("f32", 86))]


# Deterministic mode changes only how dB leaves a block (partials instead of atomics), the same for every math path:
# it runs for one tensor-core and one FFMA path.
DY_CASES = [pytest.param(*prm.values, det, id=f"{'deterministic' if det else 'atomic'}-{prm.id}")
            for prm in RANK_R_PATHS for det in (False, True) if not det or prm.id in ("f16-mma-sm80", "f32-ffma-sm86")]


@pytest.mark.parametrize("dt,cc,det", DY_CASES)
def test_dy_pass(emu, tmp_path, dt, cc, det):
    dtype = DT[dt]
    # (M, N, R, row padding, column slices (-1: the heuristic), emulated SMs): one row; unaligned rows and two rank
    # tiles; uneven forced slices; a decode size that the heuristic splits into many slices.
    for i, (M, N, R, pad, splits, sms) in enumerate([(1, 5, 1, 0, -1, 4), (130, 70, 33, 3, -1, 4),
                                                     (64, 129, 16, 0, 3, 4), (3, 300, 24, 0, -1, 64)]):
        gen = torch.Generator().manual_seed(M + N * 3 + R)
        c = Case(emu, tmp_path / str(i))
        g_flat, g = strided(M, N, N + pad, dtype, gen)
        b = torch.randn(N, R, generator=gen)
        h = torch.randn(M, R, generator=gen)
        d = torch.randn(R, generator=gen)
        s = 0.75
        for name, t in (("g", g_flat), ("b", b), ("h", h), ("d", d)):
            c.put(name, t.flatten())
        c.put("gh", torch.full((M * R,), float("nan")))
        c.put("gh_lowp", torch.full((M * R,), float("nan")).to(dtype))
        c.put("db", torch.zeros(N * R))
        c.put("dd", torch.full((R,), float("nan")))
        out = c.run("dy", dt=dt, M=M, N=N, R=R, ldg=N + pad, scaling=repr(s), det=int(det), splits=splits, sms=sms,
                    cc=cc)
        if sms == 64:
            assert int(out.split("splits=")[1].split()[0]) >= 4, "the heuristic was meant to split this decode size"
        gh = c.get("gh", torch.float32).view(M, R)
        db = c.get("db", torch.float32).view(N, R)
        dd = c.get("dd", torch.float32)
        G, B, H, D = (t.double().contiguous() for t in (g, b, h, d))
        gz64 = s * G @ B
        gf, bf = g.float().contiguous(), b
        gz32 = s * (gf @ bf)
        mag_gz = s * G.abs() @ B.abs()
        name = f"dy {dt} {M}x{N} r{R}"
        assert_close_to_reference(name + " gH", gh, gz64 * D, gz32 * d, torch.float32, magnitude=mag_gz * D.abs(),
                                  factor=4.0)
        assert_close_to_reference(name + " dB", db, s * G.T @ (H * D), s * gf.T @ (h * d), torch.float32,
                                  magnitude=s * G.abs().T @ (H * D).abs(), factor=4.0)
        assert_close_to_reference(name + " dd", dd, (gz64 * H).sum(0), (gz32 * h).sum(0), torch.float32,
                                  magnitude=(mag_gz * H.abs()).sum(0), factor=4.0)
        assert torch.equal(c.get("gh_lowp", dtype).view(M, R).float(), gh.to(dtype).float()), "gh_lowp != gh rounded"


def test_dy_pass_deterministic_is_bitwise_repeatable(emu, tmp_path):
    outs = []
    for rep in range(2):
        gen = torch.Generator().manual_seed(5)
        M, N, R = 200, 70, 16
        c = Case(emu, tmp_path / str(rep))
        c.put("g", torch.randn(M * N, generator=gen).to(torch.bfloat16))
        c.put("b", torch.randn(N * R, generator=gen))
        c.put("h", torch.randn(M * R, generator=gen))
        c.put("d", torch.randn(R, generator=gen))
        c.put("gh", torch.zeros(M * R))
        c.put("db", torch.zeros(N * R))
        c.put("dd", torch.zeros(R))
        c.run("dy", dt="bf16", M=M, N=N, R=R, ldg=N, scaling="0.5", det=1, cc=80)  # the tensor-core path
        outs.append((c.get("db", torch.float32), c.get("dd", torch.float32)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


# ---------------------------------------------------------------------------------------------------------------
# lowrank_da: dA = gH^T dropout(x), split over M, partials summed in order

@pytest.mark.parametrize("dt,cc", RANK_R_PATHS)
def test_lowrank_da(emu, tmp_path, dt, cc):
    dtype = DT[dt]
    for i, (M, K, R, pad, splits, p) in enumerate([(1, 7, 1, 0, 1, 0.0), (130, 70, 33, 3, 3, 0.0),
                                                   (600, 65, 16, 1, -1, 0.3), (37, 129, 5, 0, 1, 0.5)]):
        gen = torch.Generator().manual_seed(M + K * 3 + R)
        c = Case(emu, tmp_path / str(i))
        x_flat, x = strided(M, K, K + pad, dtype, gen)
        gh = torch.randn(M, R, generator=gen)
        c.put("x", x_flat)
        c.put("gh", gh.flatten())
        c.put("da", torch.full((R * K,), float("nan")))
        params = dict(dt=dt, M=M, K=K, R=R, ldx=K + pad, splits=splits, sms=8, cc=cc)
        xd = x.double().contiguous()
        if p > 0:
            sd = seed_tensor(i * 1000 + 1, i)
            c.put("seed", sd)
            params.update(threshold=dropout_threshold(p), keep_scale=repr(1.0 / (1.0 - p)))
            xd = xd * keep_mask(sd, M, K, p).double() / (1.0 - p)
        out = c.run("da", **params)
        if splits == -1:
            assert "splits=1" not in out, "the heuristic was meant to split this case"
        da = c.get("da", torch.float32).view(R, K)
        assert_close_to_reference(f"da {dt} {M}x{K} r{R}", da, gh.double().T @ xd, gh.T @ xd.float(),
                                  torch.float32, magnitude=gh.double().abs().T @ xd.abs(), factor=4.0)


# ---------------------------------------------------------------------------------------------------------------
# regularizer: every layer's loss term and closed-form gradients, one launch

@pytest.mark.parametrize("official", [False, True], ids=["paper", "official"])
def test_regularizer(emu, tmp_path, official):
    gen = torch.Generator().manual_seed(11)
    codes = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
    specs = [(1, 7, 5, torch.float32, torch.float32, torch.float32),
             (33, 40, 70, torch.bfloat16, torch.float16, torch.float32),
             (16, 300, 20, torch.float16, torch.float32, torch.bfloat16)]
    c = Case(emu, tmp_path)
    params = dict(layers=len(specs), beta="0.01", gamma="0.1", official=int(official), reps=2)
    layers = []
    for l, (r, K, N, ta, tb, td) in enumerate(specs):
        a = (torch.randn(r, K, generator=gen) * K ** -0.5).to(ta)
        b = (torch.randn(N, r, generator=gen) * N ** -0.5).to(tb)
        d = torch.randn(r, generator=gen).to(td)
        layers.append((a, b, d))
        c.put(f"a{l}", a.flatten())
        c.put(f"b{l}", b.flatten())
        c.put(f"d{l}", d.flatten())
        for g, n in (("ga", r * K), ("gb", N * r), ("gd", r)):
            c.put(f"{g}{l}", torch.full((n,), float("nan")))
        params[f"layer{l}"] = f"{r},{K},{N},{codes[ta]},{codes[tb]},{codes[td]}"
    c.put("loss", torch.full((1,), float("nan")))
    c.run("reg", **params)
    form = "official" if official else "paper"

    def loss_and_grads(dtype):
        ps = [tuple(t.detach().to(dtype).requires_grad_() for t in lay) for lay in layers]
        loss = ref.regularizer_ref(ps, beta=0.01, gamma=0.1, form=form)
        loss.backward()
        return loss, ps

    l64, p64 = loss_and_grads(torch.float64)
    l32, p32 = loss_and_grads(torch.float32)
    mag_loss, mag_grads = regularizer_magnitudes(layers, 0.01, 0.1, form)
    assert_close_to_reference("reg loss", c.get("loss", torch.float32)[0], l64, l32, torch.float32,
                              magnitude=mag_loss, factor=4.0)
    for l, (r, K, N, *_ ) in enumerate(specs):
        for j, (g, shape) in enumerate((("ga", (r, K)), ("gb", (N, r)), ("gd", (r,)))):
            assert_close_to_reference(f"reg {g}{l}", c.get(f"{g}{l}", torch.float32).view(shape), p64[l][j].grad,
                                      p32[l][j].grad, torch.float32, magnitude=mag_grads[l][j], factor=4.0)
