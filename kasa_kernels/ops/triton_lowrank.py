"""Backend "triton": the memory-bound rank-r kernels around the GEMM (docs/math.md's names).

    shrink     H = dropout(x) A^T and S = H (s d), both (M, r) fp32            forward
    dy_pass    gH = s (G B) d, dB = s G^T (H d), dd = colsum(s (G B) H)       backward, one read of G
    lowrank_da dA = gH^T dropout(x), the mask regenerated from the seed       backward

Each streams its big operand (x or G) once and keeps the r-wide tile in registers; tiles are upcast to fp32 (see
triton_common.dot_precision). Reductions over M accumulate in fp32; with torch.use_deterministic_algorithms(True)
they go through per-block partials summed in a fixed order (no atomics), so reruns are bit-identical. Otherwise they
are relaxed atomic adds: their order does not matter and nothing reads them before the kernel ends, while the
default (acq_rel) wrapped each in MEMBAR.ALL.GPU + ERRBAR + CCTL.IVALL (AOT sm80/sm90, triton 3.8). Each launcher
takes keyword arguments; `splits` overrides the split heuristic (tests force uneven splits with it).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .triton_common import Dropout, Target, dot_precision, keep_mask, r_pad, sm_count, target_of


def small_config(target: Optional[Target], rp: int) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_K, num_warps, num_stages) for the rank-r kernels (fp32 tiles)."""
    if target is None:
        return 32, 64, 4, 1
    big_smem = target.arch != (8, 6)
    block_k = 64 if rp <= 32 else 32
    stages = 3 if (big_smem or rp <= 32) else 2
    return 64, block_k, 4, stages


def shrink_splits(target: Optional[Target], M: int, K: int, block_m: int, block_k: int) -> Tuple[int, int]:
    """(splits of K, columns per split) for the shrink: about two programs per SM when the row blocks alone are
    fewer, each split at least two k-steps, at most 64 splits (the partials are splits x M x r fp32)."""
    n_mblocks = triton.cdiv(M, block_m)
    k_blocks = triton.cdiv(K, block_k)
    want = triton.cdiv(2 * sm_count(target), n_mblocks)
    n_split = max(1, min(want, k_blocks // 2, 64))
    cols = triton.cdiv(k_blocks, n_split) * block_k
    return triton.cdiv(K, cols), cols


def dy_pass_splits(target: Optional[Target], n_mblocks: int, N: int, block_n: int) -> Tuple[int, int]:
    """(slices of N's columns, columns per slice) for the dy pass: about two programs per SM, each slice at least
    two column blocks (each slice costs one M x r atomic add of its partial G B)."""
    n_nblocks = triton.cdiv(N, block_n)
    want = triton.cdiv(2 * sm_count(target), n_mblocks)
    n_split = max(1, min(want, n_nblocks // 2))
    cols = triton.cdiv(n_nblocks, n_split) * block_n
    return triton.cdiv(N, cols), cols


def da_splits(target: Optional[Target], M: int, K: int, block_m: int, block_k: int) -> int:
    """Rows per slice of dA's reduction over M: enough (k-block, row-slice) programs to fill the GPU, each slice a
    whole number of row blocks."""
    n_mblocks = triton.cdiv(M, block_m)
    want = max(1, (4 * sm_count(target)) // triton.cdiv(K, block_k))
    n_split = max(1, min(n_mblocks, want))
    return triton.cdiv(n_mblocks, n_split) * block_m


def _mask_args(dropout: Optional[Dropout], fallback: torch.Tensor):
    if dropout is None:
        return fallback, 1.0, 0
    return dropout.seed, dropout.keep_scale, dropout.threshold


# ----------------------------------------------------------------------------------------------------------------
# shrink


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
def shrink_kernel(
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
    part[pid_k] and shrink_finish_kernel adds the partials in a fixed order: no atomics, the same bits every run."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    m_ok = offs_m < M
    r_ok = offs_r < R
    # H^T = A x^T accumulates (R_PAD, BLOCK_M): x then enters as the dot's B operand, read along its rows (K-major),
    # which the sm90 pipeline copies 16 bytes at a time; as the A operand of H = x A^T its copies were 8 bytes wide
    # (AOT sm90, triton 3.8, tools/aot_compile_triton.py).
    acc_t = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
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
            x = tl.where(keep_mask(seed_ptr, offs_m, offs_k, K, threshold), x, 0.0)
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak,
            mask=r_ok[:, None] & k_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc_t = tl.dot(a, tl.trans(x), acc_t, input_precision=INPUT_PRECISION)
    acc = tl.trans(acc_t)
    if SPLIT_K:
        part_off = (pid_k.to(tl.int64) * M + offs_m[:, None].to(tl.int64)) * R + offs_r[None, :]
        tl.store(part_ptr + part_off, acc, mask=m_ok[:, None] & r_ok[None, :])
    else:
        _store_h_s(acc, d_ptr, h_ptr, s_ptr, offs_m, offs_r, m_ok, r_ok, R, stride_d, scaling, keep_scale)


@triton.jit
def shrink_finish_kernel(
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


def shrink(x2d: torch.Tensor, lora_A: torch.Tensor, lora_diag: torch.Tensor, *, scaling: float,
           dropout: Optional[Dropout] = None, splits: Optional[Tuple[int, int]] = None):
    """(H, S), both (M, r) fp32: H = dropout(x) A^T, S = H (s d). splits: (number, columns per split) of K."""
    M, K = x2d.shape
    R = lora_A.shape[0]
    dev = x2d.device
    h = torch.empty((M, R), dtype=torch.float32, device=dev)
    s = torch.empty((M, R), dtype=torch.float32, device=dev)
    if M == 0:
        return h, s
    rp = r_pad(R)
    target = target_of(dev)
    bm, bk, warps, stages = small_config(target, rp)
    n_split, k_per_split = splits or shrink_splits(target, M, K, bm, bk)
    seed, keep_scale, threshold = _mask_args(dropout, x2d)
    part = torch.empty((n_split, M, R), dtype=torch.float32, device=dev) if n_split > 1 else h
    shrink_kernel[(triton.cdiv(M, bm), n_split)](
        x2d, lora_A, lora_diag, h, s, part, seed,
        M, K, R, k_per_split,
        x2d.stride(0), x2d.stride(1), lora_A.stride(0), lora_A.stride(1), lora_diag.stride(0),
        float(scaling), keep_scale, threshold,
        DROPOUT=dropout is not None, SPLIT_K=n_split > 1, INPUT_PRECISION=dot_precision(x2d.dtype, True),
        BLOCK_M=bm, BLOCK_K=bk, R_PAD=rp, num_warps=warps, num_stages=stages,
    )
    if n_split > 1:
        shrink_finish_kernel[(triton.cdiv(M, bm),)](
            part, lora_diag, h, s, M, R, n_split, M * R, lora_diag.stride(0), float(scaling), keep_scale,
            BLOCK_M=bm, R_PAD=rp, num_warps=4,
        )
    return h, s


# ----------------------------------------------------------------------------------------------------------------
# dy_pass


@triton.jit
def dy_pass_kernel(
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
    added to the zeroed gh buffer and dy_finish_kernel turns it into gH and dd: cdiv(M, 64) programs alone are 128
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
    # G is read as two tiles that each feed one dot: g (BLOCK_M, BLOCK_N) as the B operand of gZ^T = B^T G^T, read
    # along its rows (K-major), and g_t (BLOCK_N, BLOCK_M) as the A operand of dB's slice G^T Z. The second read of
    # the same bytes hits L2, so G crosses DRAM once. One load feeding both dots in two layouts stayed a synchronous
    # load into registers, with 10 BAR.SYNC per step; this way both are 16-byte cp.async, pipelined, with 2 BAR.SYNC
    # per step (AOT sm80 and sm90, triton 3.8, tools/aot_compile_triton.py).
    gz_t = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
    n_start = pid_s * cols_per_split
    n_end = min(n_start + cols_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_end
        g_m = offs_m.to(tl.int64) * stride_gm
        g_n = offs_n.to(tl.int64) * stride_gn
        g = tl.load(g_ptr + g_m[:, None] + g_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        nr_ok = n_ok[:, None] & r_ok[None, :]
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                    mask=nr_ok, other=0.0).to(tl.float32)
        gz_t = tl.dot(tl.trans(b), tl.trans(g).to(tl.float32), gz_t, input_precision=INPUT_PRECISION)
        if NEED_DB:
            g_t = tl.load(g_ptr + g_n[:, None] + g_m[None, :], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
            db_part = tl.dot(g_t.to(tl.float32), z_scaled, input_precision=INPUT_PRECISION)
            db_off = offs_n[:, None].to(tl.int64) * R + offs_r[None, :]
            if DETERMINISTIC:
                tl.store(db_ptr + pid.to(tl.int64) * N * R + db_off, db_part, mask=nr_ok)
            else:
                tl.atomic_add(db_ptr + db_off, db_part, mask=nr_ok, sem="relaxed")
    gz = tl.trans(gz_t)
    gh_off = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    if SPLIT_N:
        tl.atomic_add(gh_ptr + gh_off, gz, mask=mr_ok, sem="relaxed")
    else:
        gz = gz * scaling
        tl.store(gh_ptr + gh_off, gz * d[None, :], mask=mr_ok)
        if NEED_DD:
            dd_part = tl.sum(gz * h, axis=0)
            if DETERMINISTIC:
                tl.store(dd_ptr + pid * R + offs_r, dd_part, mask=r_ok)
            else:
                tl.atomic_add(dd_ptr + offs_r, dd_part, mask=r_ok, sem="relaxed")


@triton.jit
def dy_finish_kernel(
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
        tl.atomic_add(dd_ptr + offs_r, tl.sum(gz * h, axis=0), mask=r_ok, sem="relaxed")


def dy_pass(grad_y: torch.Tensor, lora_B: torch.Tensor, h: torch.Tensor, lora_diag: torch.Tensor, *, scaling: float,
            need_db: bool, need_dd: bool, deterministic: bool, precision: str,
            splits: Optional[Tuple[int, int]] = None):
    """(gH (M, r), dB (N, r) or None, dd (r,) or None), all fp32, from one read of G. splits: (number, columns per
    slice) of N; never split in deterministic mode."""
    M, N = grad_y.shape
    R = lora_B.shape[1]
    dev = grad_y.device
    f32 = torch.float32
    rp = r_pad(R)
    target = target_of(dev)
    bm, bk, warps, stages = small_config(target, rp)
    n_mblocks = triton.cdiv(M, bm)
    n_split, cols_per_split = (1, N) if deterministic else (splits or dy_pass_splits(target, n_mblocks, N, bk))
    gh = (torch.zeros if n_split > 1 else torch.empty)((M, R), dtype=f32, device=dev)
    if deterministic:
        db_buf = torch.empty((n_mblocks, N, R), dtype=f32, device=dev) if need_db else None
        dd_buf = torch.empty((n_mblocks, R), dtype=f32, device=dev) if need_dd else None
    else:
        db_buf = torch.zeros((N, R), dtype=f32, device=dev) if need_db else None
        dd_buf = torch.zeros((R,), dtype=f32, device=dev) if need_dd else None
    dy_pass_kernel[(n_mblocks, n_split)](
        grad_y, lora_B, h, lora_diag, gh, db_buf if need_db else gh, dd_buf if need_dd else gh,
        M, N, R, cols_per_split,
        grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), lora_diag.stride(0),
        float(scaling),
        NEED_DB=need_db, NEED_DD=need_dd, DETERMINISTIC=deterministic, SPLIT_N=n_split > 1,
        INPUT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bk, R_PAD=rp, num_warps=warps, num_stages=stages,
    )
    if n_split > 1:
        dy_finish_kernel[(triton.cdiv(M, bm),)](
            gh, h, lora_diag, dd_buf if need_dd else gh, M, R, lora_diag.stride(0), float(scaling),
            NEED_DD=need_dd, BLOCK_M=bm, R_PAD=rp, num_warps=4,
        )
    db = (db_buf.sum(0) if deterministic else db_buf) if need_db else None
    dd = (dd_buf.sum(0) if deterministic else dd_buf) if need_dd else None
    return gh, db, dd


# ----------------------------------------------------------------------------------------------------------------
# lowrank_da


@triton.jit
def da_kernel(
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
            x = tl.where(keep_mask(seed_ptr, offs_m, offs_k, K, threshold), x, 0.0)
        gh_t = tl.load(gh_ptr + offs_m[None, :].to(tl.int64) * R + offs_r[:, None],
                       mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        acc = tl.dot(gh_t, x, acc, input_precision=INPUT_PRECISION)
    tl.store(da_ptr + pid_s.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :], acc * keep_scale,
             mask=r_ok[:, None] & k_ok[None, :])


def lowrank_da(x2d: torch.Tensor, gh: torch.Tensor, *, dropout: Optional[Dropout] = None, precision: str,
               rows_per_split: Optional[int] = None) -> torch.Tensor:
    """dA (r, K) fp32 = gH^T dropout(x), reduced over M in slices of rows_per_split rows, added in a fixed order."""
    M, K = x2d.shape
    R = gh.shape[1]
    dev = x2d.device
    rp = r_pad(R)
    target = target_of(dev)
    bm, bk, warps, stages = small_config(target, rp)
    rows = rows_per_split or da_splits(target, M, K, bm, bk)
    n_split = triton.cdiv(M, rows)
    da_buf = torch.empty((n_split, R, K), dtype=torch.float32, device=dev)
    seed, keep_scale, threshold = _mask_args(dropout, x2d)
    da_kernel[(triton.cdiv(K, bk), n_split)](
        x2d, gh, seed, da_buf,
        M, K, R, rows,
        x2d.stride(0), x2d.stride(1),
        keep_scale, threshold,
        DROPOUT=dropout is not None, INPUT_PRECISION=precision,
        BLOCK_M=bm, BLOCK_K=bk, R_PAD=rp, num_warps=warps, num_stages=stages,
    )
    return da_buf[0] if n_split == 1 else da_buf.sum(0)
