"""Backend "triton": the fused KaSA linear op (DESIGN.md, "Fused kernel plan").

Forward, two launches:
    shrink                 H = dropout(x) A^T and S = H * (s d) (M x r, both fp32), on the r-wide tile
    gemm_lowrank           Y = x W^T + S B^T + b: the rank-r term is the accumulator's first k-step, b the epilogue
Backward, three launches (+ one tiny fp32 sum over split partials):
    dy_pass                reads each tile of G once: gH = s (G B) * d, dB = s G^T Z, dd = colsum(gZ * H)
    dA                     dA = gH^T dropout(x), the mask regenerated from the seed
    gemm_lowrank           dx = G W + dropout_backward(gH A), the rank-r term (masked per element when p > 0) as
                           the accumulator's first k-steps
On sm90 the gemm_lowrank autotuner also tries each tile persistent and with TMA loads of x/G and W (issue #3); the
TMA configs only where host tensor descriptors can read those operands.
Nothing of size M x N or M x K is allocated besides the outputs. Reductions over M accumulate in fp32; with
torch.use_deterministic_algorithms(True) they go through per-block partials summed in a fixed order (no atomics), so
reruns are bit-identical.

The dropout mask is the hash of ops/rng.py (the spec), reimplemented in uint32 arithmetic below.

Precision: the big GEMMs feed the tensor cores in x's dtype (fp32 follows torch.backends.cuda.matmul.allow_tf32). The
rank-r kernels are memory-bound, so they upcast their tiles to fp32 and use TF32 when x is fp16/bf16 (exact for
x's values, keeps fp32 range for H and gH) and honour allow_tf32 when x is fp32.

The launchers are registered as torch.library custom ops with fake implementations, so torch.compile traces a
KasaLinear on this backend without graph breaks; eagerly they are plain calls.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .precision import allow_tf32
from .rng import dropout_threshold

# ----------------------------------------------------------------------------------------------------------------
# Launch configurations

# GEMM tiles per architecture. sm86 (RTX 3090) has ~100 KB of shared memory per SM against ~164 KB (sm80) and
# ~228 KB (sm90), hence shallower pipelines there. Untuned starting points: a GPU session measures and prunes.
# Tiles with BLOCK_M = 32 serve decode sizes (M <= 64, DESIGN.md's "fused forward / T_mm <= 1.30"): at N = 4096 a
# 64-wide BLOCK_N gives 64 programs per 32 rows, where 128 x 128 tiles would give 32 in all. _prune_gemm_configs keeps
# them for small M only, and the others for M > 32 only, so neither side pays the other's autotuning.
_GEMM_CONFIGS = {
    (9, 0): [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 4, 4),
        (64, 256, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 5, 4),
        (32, 64, 128, 4, 4),
        (32, 32, 128, 4, 4),
    ],
    (8, 0): [
        (128, 256, 32, 3, 8),
        (128, 128, 32, 4, 4),
        (256, 128, 32, 3, 8),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 5, 4),
        (32, 64, 64, 4, 4),
        (32, 32, 128, 4, 4),
    ],
    (8, 6): [
        (128, 128, 32, 3, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 64, 64, 3, 4),
        (32, 64, 64, 3, 4),
        (32, 32, 128, 3, 4),
    ],
}
_DECODE_BLOCK_M = 32  # configs with BLOCK_M <= this are the decode tiles
# Columns of r per k-step of the GEMM's rank-r term (its fp32 operand tiles sit in shared memory beside the pipeline).
_LOWRANK_CHUNK = 32
# The CPU interpreter costs per numpy op, not per flop: few, large-ish tiles keep the tests fast.
_INTERPRET_GEMM = (32, 64, 32, 1, 4)


def _arch_key(device: torch.device) -> Tuple[int, int]:
    cap = torch.cuda.get_device_capability(device)
    if cap in _GEMM_CONFIGS:
        return cap
    if cap[0] >= 9:
        return (9, 0)
    if cap == (8, 9) or cap == (8, 7):
        return (8, 6)  # Ada/Orin: sm86-sized shared memory
    return (8, 0)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _r_pad(r: int) -> int:
    # tl.dot needs every dimension >= 16.
    return max(16, _next_pow2(r))


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 2
    return torch.cuda.get_device_properties(device).multi_processor_count


def _small_cfg(device: torch.device, r_pad: int):
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) for the memory-bound rank-r kernels (fp32 tiles)."""
    if device.type != "cuda":
        return 32, 64, 4, 1
    big_smem = _arch_key(device) != (8, 6)
    block_k = 64 if r_pad <= 32 else 32
    stages = 3 if (big_smem or r_pad <= 32) else 2
    return 64, block_k, 4, stages


def _shrink_splits(device: torch.device, M: int, K: int, block_m: int, block_k: int) -> Tuple[int, int]:
    """(splits of K, columns per split) for the shrink: about two programs per SM when the row blocks alone are
    fewer, each split at least two k-steps, at most 64 splits (the partials are splits x M x r fp32)."""
    n_mblocks = triton.cdiv(M, block_m)
    k_blocks = triton.cdiv(K, block_k)
    want = triton.cdiv(2 * _sm_count(device), n_mblocks)
    n_split = max(1, min(want, k_blocks // 2, 64))
    cols = triton.cdiv(k_blocks, n_split) * block_k
    return triton.cdiv(K, cols), cols


def _dy_pass_splits(device: torch.device, n_mblocks: int, N: int, block_n: int) -> Tuple[int, int]:
    """(slices of N's columns, columns per slice) for the dy pass: about two programs per SM, each slice at least
    two column blocks (each slice costs one M x r atomic add of its partial G B)."""
    n_nblocks = triton.cdiv(N, block_n)
    want = triton.cdiv(2 * _sm_count(device), n_mblocks)
    n_split = max(1, min(want, n_nblocks // 2))
    cols = triton.cdiv(n_nblocks, n_split) * block_n
    return triton.cdiv(N, cols), cols


def _precision(x_dtype: torch.dtype, lowp_tf32: bool) -> str:
    if x_dtype != torch.float32:
        return "tf32" if lowp_tf32 else "ieee"
    return "tf32" if allow_tf32() else "ieee"


# ----------------------------------------------------------------------------------------------------------------
# Dropout: ops/rng.py in uint32 arithmetic (products wrap mod 2**32, as the spec's).


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x21F0AAAD
    h = h ^ (h >> 15)
    h = h * 0xD35A2D97
    return h ^ (h >> 15)


@triton.jit
def _keep_mask(seed_ptr, offs_row, offs_col, n_cols, threshold):
    """keep[i, j] for element (offs_row[i], offs_col[j]) of the logical row-major (rows, n_cols) input."""
    s0 = tl.load(seed_ptr).to(tl.uint32)
    s1 = tl.load(seed_ptr + 1).to(tl.uint32)
    idx = offs_row[:, None].to(tl.int64) * n_cols + offs_col[None, :]
    h = _mix32(idx.to(tl.uint32) ^ s0)
    h = _mix32(h ^ (idx >> 32).to(tl.uint32) ^ s1)
    # threshold can be 2**32 - 1: compare in int64 so no signedness promotion rule is involved.
    return h.to(tl.int64) >= threshold


# ----------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _store_h_s(acc, d_ptr, h_ptr, s_ptr, offs_m, offs_r, m_ok, r_ok, R, stride_d, scaling, keep_scale):
    # 1/(1-p) applied once to the fp32 H rather than to each low-precision x element.
    h = acc * keep_scale
    d = tl.load(d_ptr + offs_r * stride_d, mask=r_ok, other=0.0).to(tl.float32)
    s = h * (d * scaling)[None, :]
    out_off = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    out_ok = m_ok[:, None] & r_ok[None, :]
    tl.store(h_ptr + out_off, h, mask=out_ok)
    tl.store(s_ptr + out_off, s.to(s_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, d_ptr, h_ptr, s_ptr, part_ptr, seed_ptr,
    M, K, R, k_per_split,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_d,
    scaling, keep_scale, threshold,
    DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    """H = dropout(x) A^T and S = H (s d) for one row block, over columns [pid_k k_per_split, +k_per_split) of K.
    Without SPLIT_K one program covers all of K and writes H and S. With it (too few row blocks to fill the GPU:
    cdiv(M, 64) programs are 128 at M = 8192 and one at decode sizes) each program writes its fp32 partial to
    part[pid_k] and _shrink_finish_kernel adds the partials in a fixed order: no atomics, the same bits every run."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_ok = offs_m < M
    r_ok = offs_r < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = min(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_end
        x = tl.load(
            x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(tl.float32)
        if DROPOUT:
            x = tl.where(_keep_mask(seed_ptr, offs_m, offs_k, K, threshold), x, 0.0)
        a_t = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None].to(tl.int64) * stride_ak,
            mask=k_ok[:, None] & r_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc = tl.dot(x, a_t, acc, input_precision=INPUT_PRECISION)
    if SPLIT_K:
        part_off = (pid_k.to(tl.int64) * M + offs_m[:, None].to(tl.int64)) * R + offs_r[None, :]
        tl.store(part_ptr + part_off, acc, mask=m_ok[:, None] & r_ok[None, :])
    else:
        _store_h_s(acc, d_ptr, h_ptr, s_ptr, offs_m, offs_r, m_ok, r_ok, R, stride_d, scaling, keep_scale)


@triton.jit
def _shrink_finish_kernel(
    part_ptr, d_ptr, h_ptr, s_ptr,
    M, R, n_splits, split_stride, stride_d, scaling, keep_scale,
    BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
):
    """H and S from the split shrink's partials, added in split order."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_ok = offs_m < M
    r_ok = offs_r < R
    off = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for t in range(0, n_splits):
        # split_stride = M * R: splits happen only while cdiv(M, BLOCK_M) < 2 SMs, so t * M * R stays far below 2**31
        acc += tl.load(part_ptr + t * split_stride + off, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    _store_h_s(acc, d_ptr, h_ptr, s_ptr, offs_m, offs_r, m_ok, r_ok, R, stride_d, scaling, keep_scale)


@triton.jit
def _gemm_lowrank_tile(
    tile, a_ptr, b_ptr, a_desc, b_desc, l_ptr, lb_ptr, bias_ptr, out_ptr, seed_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_lbr, stride_lbn,
    stride_om, stride_on,
    keep_scale, threshold,
    HAS_BIAS: tl.constexpr, LOWRANK: tl.constexpr, LOWRANK_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, LOWRANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R_CHUNK: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of _gemm_lowrank_kernel's output (its docstring has the math)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped tile order: GROUP_M row-blocks share each column-block of b while it is hot in L2.
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_n)) % group_rows
    pid_n = (tile % (GROUP_M * num_n)) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/cols past the edge are wrapped onto valid ones for the loads (their results are never stored), so the
    # main loop needs a mask along k only.
    offs_m_ld = (offs_m % M).to(tl.int64)
    offs_n_ld = (offs_n % N).to(tl.int64)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if LOWRANK:
        for r0 in tl.range(0, R, R_CHUNK, num_stages=1):
            offs_r = r0 + tl.arange(0, R_CHUNK)
            r_ok = offs_r < R
            l_tile = tl.load(l_ptr + offs_m_ld[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                             mask=r_ok[None, :], other=0.0).to(tl.float32)
            lb_tile = tl.load(lb_ptr + offs_r[:, None] * stride_lbr + offs_n_ld[None, :] * stride_lbn,
                              mask=r_ok[:, None], other=0.0).to(tl.float32)
            acc = tl.dot(l_tile, lb_tile, acc, input_precision=LOWRANK_PRECISION)
        if LOWRANK_DROPOUT:
            keep = _keep_mask(seed_ptr, offs_m, offs_n, N, threshold)
            acc = tl.where(keep, acc * keep_scale, 0.0)

    if USE_TMA:
        # The copy engine zero-fills whatever lies past M, N or K, so no masks and no wrapped offsets here.
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([off_m, k0])
            if B_K_CONTIG:
                b = tl.trans(b_desc.load([off_n, k0]))
            else:
                b = b_desc.load([k0, off_n])
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m_ld[:, None] * stride_am + offs_k[None, :].to(tl.int64) * stride_ak
        b_ptrs = b_ptr + offs_k[:, None].to(tl.int64) * stride_bk + offs_n_ld[None, :] * stride_bn
        for k0 in range(0, K, BLOCK_K):
            k_left = K - k0
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n_ld).to(tl.float32)[None, :]

    out_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _gemm_lowrank_kernel(
    a_ptr, b_ptr, a_desc, b_desc, l_ptr, lb_ptr, bias_ptr, out_ptr, seed_ptr,
    M, N, K, R, m_bucket,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_lbr, stride_lbn,
    stride_om, stride_on,
    keep_scale, threshold,
    HAS_BIAS: tl.constexpr, LOWRANK: tl.constexpr, LOWRANK_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, LOWRANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
    R_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, USE_TMA: tl.constexpr, TMA_OK: tl.constexpr, B_K_CONTIG: tl.constexpr,
):
    """out (M, N) = a (M, K) @ b (K, N) + [l (M, R) @ lb (R, N)] + [bias (N,)], every operand through its strides.

    Forward: a = x, b = W^T, l = S, lb = B^T. dX: a = G, b = W, l = gH, lb = A; with dropout (LOWRANK_DROPOUT) the
    rank-r term is masked per output element (m, n), which is exactly element (m, k) of x: the mask is applied to the
    accumulator right after the rank-r k-steps, before the main loop adds G W, so no second M x N accumulator is
    held across the loop (AOT sm90, 128x256 tile, bf16: the epilogue form spilled ~800 B/thread).
    The rank-r operands stay fp32 (l is H-sized: it can exceed fp16's 65504 while the output does not) and run at
    LOWRANK_PRECISION (tf32 for fp16/bf16 x: fp16's mantissa with fp32's range), R_CHUNK columns of r at a
    time: whole fp32 (BLOCK_M + BLOCK_N) x R_PAD tiles added 196 KB of shared memory at r = 128 (AOT, sm90).

    Variants (sm90 autotunes over them, issue #3): PERSISTENT launches min(tiles, SMs) programs that stride over the
    tiles; USE_TMA reads a and b through host tensor descriptors a_desc (BLOCK_M, BLOCK_K) and b_desc, which is
    (BLOCK_N, BLOCK_K) over b's transpose when B_K_CONTIG (forward: W itself) and (BLOCK_K, BLOCK_N) otherwise (dX).
    TMA_OK (the launcher built both descriptors) only keys the autotuner; a_desc/b_desc are None without it."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_lowrank_tile(
                tile, a_ptr, b_ptr, a_desc, b_desc, l_ptr, lb_ptr, bias_ptr, out_ptr, seed_ptr, M, N, K, R,
                stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_lbr, stride_lbn,
                stride_om, stride_on, keep_scale, threshold,
                HAS_BIAS, LOWRANK, LOWRANK_DROPOUT, INPUT_PRECISION, LOWRANK_PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_K, R_CHUNK, GROUP_M, USE_TMA, B_K_CONTIG,
            )
    else:
        _gemm_lowrank_tile(
            tl.program_id(0), a_ptr, b_ptr, a_desc, b_desc, l_ptr, lb_ptr, bias_ptr, out_ptr, seed_ptr, M, N, K, R,
            stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_lbr, stride_lbn,
            stride_om, stride_on, keep_scale, threshold,
            HAS_BIAS, LOWRANK, LOWRANK_DROPOUT, INPUT_PRECISION, LOWRANK_PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_K, R_CHUNK, GROUP_M, USE_TMA, B_K_CONTIG,
        )


@triton.jit
def _dy_pass_kernel(
    g_ptr, b_ptr, h_ptr, d_ptr, gh_ptr, db_ptr, dd_ptr,
    M, N, R, cols_per_split,
    stride_gm, stride_gn, stride_bn, stride_br, stride_d,
    scaling,
    NEED_DB: tl.constexpr, NEED_DD: tl.constexpr, DETERMINISTIC: tl.constexpr, SPLIT_N: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
):
    """One row-block of G, swept once along one slice of N's columns: gZ = s G B accumulates over the slice while
    each (BLOCK_N, r) slice of dB = s G^T Z is reduced over M (atomics, or per-row-block partials in deterministic
    mode). With SPLIT_N (several column slices; never in deterministic mode) the unscaled partial G B is atomically
    added to the zeroed gh buffer and _dy_finish_kernel turns it into gH and dd: cdiv(M, 64) programs alone are 128
    at M = 8192 (fewer than an H100's 132 SMs) and 1 at decode sizes."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_ok = offs_m < M
    r_ok = offs_r < R
    mr_ok = m_ok[:, None] & r_ok[None, :]
    h = tl.load(h_ptr + offs_m[:, None].to(tl.int64) * R + offs_r[None, :], mask=mr_ok, other=0.0)
    d = tl.load(d_ptr + offs_r * stride_d, mask=r_ok, other=0.0).to(tl.float32)
    z_scaled = h * (d * scaling)[None, :]
    gz = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    n_start = pid_s * cols_per_split
    n_end = min(n_start + cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :].to(tl.int64) * stride_gn,
                    mask=m_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        nr_ok = n_ok[:, None] & r_ok[None, :]
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                    mask=nr_ok, other=0.0).to(tl.float32)
        gz = tl.dot(g, b, gz, input_precision=INPUT_PRECISION)
        if NEED_DB:
            db_part = tl.dot(tl.trans(g), z_scaled, input_precision=INPUT_PRECISION)
            db_off = offs_n[:, None].to(tl.int64) * R + offs_r[None, :]
            if DETERMINISTIC:
                tl.store(db_ptr + pid.to(tl.int64) * N * R + db_off, db_part, mask=nr_ok)
            else:
                tl.atomic_add(db_ptr + db_off, db_part, mask=nr_ok)
    gh_off = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    if SPLIT_N:
        tl.atomic_add(gh_ptr + gh_off, gz, mask=mr_ok)
    else:
        gz = gz * scaling
        tl.store(gh_ptr + gh_off, gz * d[None, :], mask=mr_ok)
        if NEED_DD:
            dd_part = tl.sum(gz * h, axis=0)
            if DETERMINISTIC:
                tl.store(dd_ptr + pid * R + offs_r, dd_part, mask=r_ok)
            else:
                tl.atomic_add(dd_ptr + offs_r, dd_part, mask=r_ok)


@triton.jit
def _dy_finish_kernel(
    gh_ptr, h_ptr, d_ptr, dd_ptr,
    M, R, stride_d, scaling,
    NEED_DD: tl.constexpr, BLOCK_M: tl.constexpr, R_PAD: tl.constexpr,
):
    """After a split dy_pass: gh holds G B summed over the column slices; make it gH = s (G B) * d, dd += colsum."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < R
    mr_ok = (offs_m < M)[:, None] & r_ok[None, :]
    off = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    gz = tl.load(gh_ptr + off, mask=mr_ok, other=0.0) * scaling
    d = tl.load(d_ptr + offs_r * stride_d, mask=r_ok, other=0.0).to(tl.float32)
    tl.store(gh_ptr + off, gz * d[None, :], mask=mr_ok)
    if NEED_DD:
        h = tl.load(h_ptr + off, mask=mr_ok, other=0.0)
        tl.atomic_add(dd_ptr + offs_r, tl.sum(gz * h, axis=0), mask=r_ok)


@triton.jit
def _da_kernel(
    x_ptr, gh_ptr, seed_ptr, da_ptr,
    M, K, R, rows_per_split,
    stride_xm, stride_xk,
    keep_scale, threshold,
    DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    """Partial dA over one slice of rows: da[split] (R, K) = gH[rows]^T dropout(x)[rows]; the splits are summed in a
    fixed order afterwards, so the result does not depend on scheduling."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    k_ok = offs_k < K
    r_ok = offs_r < R
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    acc = tl.zeros((R_PAD, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        if DROPOUT:
            x = tl.where(_keep_mask(seed_ptr, offs_m, offs_k, K, threshold), x, 0.0)
        gh_t = tl.load(gh_ptr + offs_m[None, :].to(tl.int64) * R + offs_r[:, None],
                       mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(gh_t, x, acc, input_precision=INPUT_PRECISION)
    tl.store(da_ptr + pid_s.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :], acc * keep_scale,
             mask=r_ok[:, None] & k_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# GEMM autotuning: one Autotuner per architecture, built on first use.

# TMA_OK and B_K_CONTIG key the cache too: a config that reads through TMA must never be reused for operands that TMA
# cannot read, and the forward (b = W^T, unit stride along k) and dX (b = W, unit stride along n) read b in different
# orders even where their (M, N, K) coincide.
_GEMM_KEY = ["m_bucket", "N", "K", "R_PAD", "LOWRANK", "LOWRANK_DROPOUT", "TMA_OK", "B_K_CONTIG"]

# (PERSISTENT, USE_TMA) variants tried per tile: issue #3 asks sm90 to keep whichever of plain, persistent and TMA
# measures faster, so all four combinations go to its autotuner. TMA needs sm90; sm8x keeps the plain kernel.
_GEMM_VARIANTS = {
    (9, 0): [(False, False), (True, False), (False, True), (True, True)],
}

# Test-only: a dict of _gemm_lowrank_kernel meta-parameters (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PERSISTENT, USE_TMA,
# num_warps, num_stages) that replaces the autotuner/interpreter choice, so tests can run each variant explicitly.
# USE_TMA is honoured only where TMA can read the operands (as the autotuner's prune), and on CUDA only where the
# sm90 configs apply.
_GEMM_OVERRIDE: Optional[dict] = None


def _set_tma_block_shapes(nargs):
    """Config pre-hook: the host descriptors' block shapes are the config's tiles. Set for every config, TMA or not,
    because a descriptor's block shape is part of the kernel's signature: a stale one would recompile the plain
    configs for each shape left behind by the previous config."""
    a_desc, b_desc = nargs["a_desc"], nargs["b_desc"]
    if a_desc is None:
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    a_desc.block_shape = [bm, bk]
    b_desc.block_shape = [bn, bk] if nargs["B_K_CONTIG"] else [bk, bn]


def _gemm_configs(arch: Tuple[int, int]):
    variants = _GEMM_VARIANTS.get(arch, [(False, False)])
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=persistent, USE_TMA=tma),
                      num_stages=st, num_warps=w, pre_hook=_set_tma_block_shapes if len(variants) > 1 else None)
        for bm, bn, bk, st, w in _GEMM_CONFIGS[arch]
        for persistent, tma in variants
    ]


@functools.lru_cache(maxsize=None)
def _gemm_for(arch: Optional[Tuple[int, int]]):
    if arch is None:
        bm, bn, bk, stages, warps = _INTERPRET_GEMM
        return _gemm_lowrank_kernel, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=False,
                                          USE_TMA=False, num_stages=stages, num_warps=warps)
    return triton.autotune(configs=_gemm_configs(arch), key=_GEMM_KEY,
                           prune_configs_by={"early_config_prune": _prune_gemm_configs})(_gemm_lowrank_kernel), {}


def _gemm_smem_bytes(major: int, bm: int, bn: int, bk: int, stages: int, elem: int, r_chunk: int,
                     tma: bool = False) -> int:
    """Upper bound of the GEMM's shared memory, fitted to AOT compiles (tools/aot_compile_triton.py, triton 3.8):
    sm90 allocates num_stages operand buffers, sm8x num_stages - 1 (bf16/fp16; fp32 inputs took up to one buffer
    more, e.g. 160 KB for 128x256x32x3 on sm80); the rank-r step's fp32 tiles are counted on top. TMA configs add
    one 8-byte mbarrier per stage (AOT sm90, bf16 128x256x64x3: 147480 B against the pointer loads' 147456)."""
    buffers = stages if major >= 9 or elem == 4 else stages - 1
    return buffers * (bm * bk + bk * bn) * elem + (bm + bn) * r_chunk * 4 + (8 * stages if tma else 0)


@functools.lru_cache(maxsize=None)
def _smem_limit(device_index: int) -> int:
    props = torch.cuda.get_device_properties(device_index)
    limit = getattr(props, "shared_memory_per_block_optin", None)
    if not limit:
        limit = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return int(limit)


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop decode tiles (BLOCK_M <= 32) unless M <= 64 and the others unless M > 32, TMA configs where the
    launcher could not build descriptors (TMA_OK false), persistent configs where the tiles do not outnumber the SMs
    (they would launch the same programs as the plain config), and configs whose shared memory exceeds this GPU's
    (sm86/sm89: 99 KB; fp32 inputs double the tiles), so the autotuner does not compile them only to fail with
    OutOfResources; keep the smallest if none fits."""
    a = named_args["a_ptr"]
    M, N = named_args["M"], named_args["N"]
    n_sms = _sm_count(a.device)

    def fits_m(c):  # constant over an autotune key: its m_bucket (next power of two) splits at 32 and 64 too
        decode_tile = c.kwargs["BLOCK_M"] <= _DECODE_BLOCK_M
        return M <= 2 * _DECODE_BLOCK_M if decode_tile else M > _DECODE_BLOCK_M

    configs = [c for c in configs if fits_m(c)] or configs
    configs = [
        c for c in configs
        if (kwargs.get("TMA_OK", False) or not c.kwargs.get("USE_TMA", False))
        and (not c.kwargs.get("PERSISTENT", False)
             or triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(N, c.kwargs["BLOCK_N"]) > n_sms)
    ]
    major = torch.cuda.get_device_capability(a.device)[0]
    limit = _smem_limit(a.device.index if a.device.index is not None else torch.cuda.current_device())
    r_chunk = kwargs.get("R_CHUNK", 0) if kwargs.get("LOWRANK", False) else 0

    def need(c):
        k = c.kwargs
        return _gemm_smem_bytes(major, k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, a.element_size(),
                                r_chunk, k.get("USE_TMA", False))

    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


def _tma_descriptors(a, b, stride_bk, stride_bn, M, N, K):
    """Host tensor descriptors (a over (M, K), b over (N, K) when its unit stride is along k, else over (K, N)), or
    (None, None) when TMA cannot read both: it needs a unit last-dim stride and 16-byte aligned base pointer and row
    stride (odd K or N in fp16/bf16, strided views of x and offset slices fail that). Rows that overlap (a broadcast
    grad_y has row stride 0) stay on pointer loads too: no GPU run has tried TMA on them. The block shapes are
    placeholders until _set_tma_block_shapes fills in the config's tiles."""

    def readable(t, row_stride, cols):
        return (t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0 and row_stride >= cols)

    if a.stride(1) != 1 or not readable(a, a.stride(0), K):
        return None, None
    if stride_bk == 1:
        b_shape, b_row_stride = [N, K], stride_bn
    elif stride_bn == 1:
        b_shape, b_row_stride = [K, N], stride_bk
    else:
        return None, None
    if not readable(b, b_row_stride, b_shape[1]):
        return None, None
    return (TensorDescriptor(a, [M, K], [a.stride(0), 1], [16, 16]),
            TensorDescriptor(b, b_shape, [b_row_stride, 1], [16, 16]))


def _launch_gemm(a, b_strided, l, lb_strided, bias, out, seed, M, N, K, R, keep_scale, threshold,
                 lowrank, lowrank_dropout, precision, lowrank_precision):
    """b_strided / lb_strided: (tensor, stride_k, stride_n) / (tensor, stride_r, stride_n) views of the right
    operands, so W and its transpose need no copy."""
    b, stride_bk, stride_bn = b_strided
    lb, stride_lbr, stride_lbn = lb_strided
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads b with unit stride (N elements, cheap)
    arch = None if a.device.type != "cuda" else _arch_key(a.device)
    override = _GEMM_OVERRIDE
    if override is not None:
        kernel, fixed = _gemm_lowrank_kernel, dict(override)
        want_tma = bool(fixed.get("USE_TMA")) and arch in (None, (9, 0))
    else:
        kernel, fixed = _gemm_for(arch)
        want_tma = any(tma for _, tma in _GEMM_VARIANTS.get(arch, ()))
    a_desc, b_desc = _tma_descriptors(a, b, stride_bk, stride_bn, M, N, K) if want_tma else (None, None)
    tma_ok = a_desc is not None
    b_k_contig = stride_bk == 1
    if override is not None:
        fixed["USE_TMA"] = tma_ok
        _set_tma_block_shapes(dict(fixed, a_desc=a_desc, b_desc=b_desc, B_K_CONTIG=b_k_contig))
    use_lowrank = lowrank
    r_pad = _r_pad(R) if use_lowrank else 16
    n_sms = _sm_count(a.device)

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(tiles, n_sms) if meta["PERSISTENT"] else tiles,)

    kernel[grid](
        a, b, a_desc, b_desc, l if use_lowrank else a, lb if use_lowrank else b, bias if bias is not None else a,
        out, seed if seed is not None else a,
        M, N, K, R, _next_pow2(M),
        a.stride(0), a.stride(1), stride_bk, stride_bn,
        l.stride(0) if use_lowrank else 0, l.stride(1) if use_lowrank else 0, stride_lbr, stride_lbn,
        out.stride(0), out.stride(1),
        keep_scale, threshold,
        HAS_BIAS=bias is not None, LOWRANK=lowrank, LOWRANK_DROPOUT=lowrank and lowrank_dropout,
        INPUT_PRECISION=precision, LOWRANK_PRECISION=lowrank_precision, R_PAD=r_pad,
        R_CHUNK=min(r_pad, _LOWRANK_CHUNK), TMA_OK=tma_ok, B_K_CONTIG=b_k_contig, **fixed,
    )


def _dropout_consts(dropout_p: float):
    if dropout_p > 0.0:
        return 1.0 / (1.0 - dropout_p), dropout_threshold(dropout_p)
    return 1.0, 0


# ----------------------------------------------------------------------------------------------------------------
# Launchers as torch ops


@torch.library.custom_op("kasa_kernels::triton_linear_fwd", mutates_args=())
def _linear_fwd_op(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    use_adapter: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    M, K = x2d.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    dev = x2d.device
    y = torch.empty((M, N), dtype=x2d.dtype, device=dev)
    h = torch.empty((M, R), dtype=torch.float32, device=dev)
    if M == 0:
        return y, h
    r_pad = _r_pad(R)
    dropout = dropout_p > 0.0
    keep_scale, threshold = _dropout_consts(dropout_p)
    s = torch.empty((M, R), dtype=torch.float32, device=dev)
    if use_adapter:
        bm, bk, warps, stages = _small_cfg(dev, r_pad)
        n_split, k_per_split = _shrink_splits(dev, M, K, bm, bk)
        part = torch.empty((n_split, M, R), dtype=torch.float32, device=dev) if n_split > 1 else h
        _shrink_kernel[(triton.cdiv(M, bm), n_split)](
            x2d, lora_A, lora_diag, h, s, part, seed if dropout else x2d,
            M, K, R, k_per_split,
            x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), lora_diag.stride(0),
            float(scaling), keep_scale, threshold,
            DROPOUT=dropout, SPLIT_K=n_split > 1, INPUT_PRECISION=_precision(x2d.dtype, True),
            BLOCK_M=bm, BLOCK_K=bk, R_PAD=r_pad, num_warps=warps, num_stages=stages,
        )
        if n_split > 1:
            _shrink_finish_kernel[(triton.cdiv(M, bm),)](
                part, lora_diag, h, s, M, R, n_split, M * R, lora_diag.stride(0), float(scaling), keep_scale,
                BLOCK_M=bm, R_PAD=r_pad, num_warps=4,
            )
    _launch_gemm(
        x2d, (weight, weight.stride(1), weight.stride(0)), s, (lora_B, lora_B.stride(1), lora_B.stride(0)),
        bias, y, None, M, N, K, R, 1.0, 0, use_adapter, False, _precision(x2d.dtype, False),
        _precision(x2d.dtype, True),
    )
    return y, h


@_linear_fwd_op.register_fake
def _(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed, use_adapter):
    M = x2d.shape[0]
    return (x2d.new_empty((M, weight.shape[0])), x2d.new_empty((M, lora_A.shape[0]), dtype=torch.float32))


@torch.library.custom_op("kasa_kernels::triton_linear_bwd", mutates_args=())
def _linear_bwd_op(
    grad_y: torch.Tensor,
    x2d: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    h: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    need_dx: bool,
    need_da: bool,
    need_dd: bool,
    need_db: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    M, K = x2d.shape
    N = weight.shape[0]
    R = lora_A.shape[0]
    dev = x2d.device
    f32 = torch.float32

    def empty():
        # a fresh placeholder per unwanted output: custom ops may not return aliased tensors
        return torch.empty(0, dtype=f32, device=dev)

    dx = torch.empty((M, K), dtype=x2d.dtype, device=dev) if need_dx else empty()
    deterministic = torch.are_deterministic_algorithms_enabled()
    if M == 0:
        zero = functools.partial(torch.zeros, dtype=f32, device=dev)
        return dx, zero((R, K)) if need_da else empty(), zero((R,)) if need_dd else empty(), \
            zero((N, R)) if need_db else empty()
    r_pad = _r_pad(R)
    dropout = dropout_p > 0.0
    keep_scale, threshold = _dropout_consts(dropout_p)
    small_prec = _precision(x2d.dtype, True)
    bm, bk, warps, stages = _small_cfg(dev, r_pad)

    # dy pass
    n_mblocks = triton.cdiv(M, bm)
    n_split, cols_per_split = (1, N) if deterministic else _dy_pass_splits(dev, n_mblocks, N, bk)
    gh = (torch.zeros if n_split > 1 else torch.empty)((M, R), dtype=f32, device=dev)
    if deterministic:
        db_buf = torch.empty((n_mblocks, N, R), dtype=f32, device=dev) if need_db else None
        dd_buf = torch.empty((n_mblocks, R), dtype=f32, device=dev) if need_dd else None
    else:
        db_buf = torch.zeros((N, R), dtype=f32, device=dev) if need_db else None
        dd_buf = torch.zeros((R,), dtype=f32, device=dev) if need_dd else None
    _dy_pass_kernel[(n_mblocks, n_split)](
        grad_y, lora_B, h, lora_diag, gh, db_buf if need_db else gh, dd_buf if need_dd else gh,
        M, N, R, cols_per_split,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), lora_diag.stride(0),
        float(scaling),
        NEED_DB=need_db, NEED_DD=need_dd, DETERMINISTIC=deterministic, SPLIT_N=n_split > 1,
        INPUT_PRECISION=small_prec,
        BLOCK_M=bm, BLOCK_N=bk, R_PAD=r_pad, num_warps=warps, num_stages=stages,
    )
    if n_split > 1:
        _dy_finish_kernel[(triton.cdiv(M, bm),)](
            gh, h, lora_diag, dd_buf if need_dd else gh, M, R, lora_diag.stride(0), float(scaling),
            NEED_DD=need_dd, BLOCK_M=bm, R_PAD=r_pad, num_warps=4,
        )
    db = (db_buf.sum(0) if deterministic else db_buf) if need_db else empty()
    dd = (dd_buf.sum(0) if deterministic else dd_buf) if need_dd else empty()

    da = empty()
    if need_da:
        n_kblocks = triton.cdiv(K, bk)
        # Enough (k-block, row-slice) programs to fill the GPU; each slice a whole number of row blocks.
        want = max(1, (4 * _sm_count(dev)) // n_kblocks)
        n_split = max(1, min(n_mblocks, want))
        rows_per_split = triton.cdiv(n_mblocks, n_split) * bm
        n_split = triton.cdiv(M, rows_per_split)
        da_buf = torch.empty((n_split, R, K), dtype=f32, device=dev)
        _da_kernel[(n_kblocks, n_split)](
            x2d, gh, seed if dropout else x2d, da_buf,
            M, K, R, rows_per_split,
            x2d.stride(0), x2d.stride(1),
            keep_scale, threshold,
            DROPOUT=dropout, INPUT_PRECISION=small_prec,
            BLOCK_M=bm, BLOCK_K=bk, R_PAD=r_pad, num_warps=warps, num_stages=stages,
        )
        da = da_buf[0] if n_split == 1 else da_buf.sum(0)

    if need_dx:
        _launch_gemm(
            grad_y, (weight, weight.stride(0), weight.stride(1)), gh, (lora_A, lora_A.stride(0), lora_A.stride(1)),
            None, dx, seed if dropout else None, M, K, N, R, keep_scale, threshold,
            True, dropout, _precision(x2d.dtype, False), small_prec,
        )
    return dx, da, dd, db


@_linear_bwd_op.register_fake
def _(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed, need_dx, need_da, need_dd, need_db):
    M, K = x2d.shape
    N, R = weight.shape[0], lora_A.shape[0]
    f32 = torch.float32
    return (
        x2d.new_empty((M, K) if need_dx else (0,), dtype=x2d.dtype if need_dx else f32),
        x2d.new_empty((R, K) if need_da else (0,), dtype=f32),
        x2d.new_empty((R,) if need_dd else (0,), dtype=f32),
        x2d.new_empty((N, R) if need_db else (0,), dtype=f32),
    )


# ----------------------------------------------------------------------------------------------------------------
# Backend interface (signatures of ops/torch_linear.py)


def linear_forward(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed):
    """Y = x W^T + b + s ((dropout(x) A^T) d) B^T for x2d (M, K). Returns (Y in x's dtype, H (M, r) fp32)."""
    return _linear_fwd_op(x2d, weight, bias, lora_A, lora_diag, lora_B, float(scaling), float(dropout_p),
                          seed if dropout_p > 0.0 else None, True)


def base_gemm(x2d, weight, bias=None):
    """The same GEMM kernel with the adapter switched off (benchmarks compare it with cuBLAS)."""
    r = 1
    a = weight.new_zeros((r, weight.shape[1]))
    return _linear_fwd_op(x2d, weight, bias, a, a.new_zeros((r,)), weight.new_zeros((weight.shape[0], r)),
                          1.0, 0.0, None, False)[0]


def linear_backward(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed, needs):
    """Gradients (dx, dA, dd, dB) of linear_forward; each None where `needs` says it is not wanted.

    dx is in x's dtype; dA, dd, dB are fp32 (the autograd layer casts them)."""
    need_dx, need_da, need_dd, need_db = (bool(n) for n in needs)
    dx, da, dd, db = _linear_bwd_op(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, float(scaling),
                                    float(dropout_p), seed if dropout_p > 0.0 else None,
                                    need_dx, need_da, need_dd, need_db)
    return (dx if need_dx else None, da if need_da else None, dd if need_dd else None, db if need_db else None)
