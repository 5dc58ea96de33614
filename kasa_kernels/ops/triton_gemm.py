"""Backend "triton": the GEMM with the rank-r term fused, for the forward and for dX.

    out (M, N) = a (M, K) @ b (K, N) + [mask(l (M, R) @ lb (R, N))] + [bias (N,)]

Forward: a = x, b = W^T, l = S, lb = B^T. dX: a = G, b = W, l = gH, lb = A, masked per element with dropout (p > 0).
Read top to bottom: the tile table per architecture, the autotuner with its pruning, the kernel, the launcher.
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .triton_common import Dropout, keep_mask, next_pow2, r_pad, sm_count, target_of
from .triton_dequant import QuantOperand, dequant_tile

# ----------------------------------------------------------------------------------------------------------------
# Tiles per architecture: (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps)

# sm86 (RTX 3090) has ~100 KB of shared memory per SM against ~164 KB (sm80) and ~228 KB (sm90), hence shallower
# pipelines there. Untuned starting points: a GPU session measures and prunes. Tiles with BLOCK_M = 32 serve decode
# sizes (M <= 64, docs/design.md's "fused forward / T_mm <= 1.30"): at N = 4096 a 64-wide BLOCK_N gives 64 programs
# per 32 rows, where 128 x 128 tiles would give 32 in all. prune_configs keeps them for small M only, and the others
# for M > 32 only, so neither side pays the other's autotuning. sm90 had a 64 x 256 tile with 4 warps: its persistent
# dX spilled 24 B/thread (AOT, triton 3.8), and 128 x 256 with 8 warps does the same work per warpgroup.
GEMM_CONFIGS = {
    (9, 0): [
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 5, 4),
        (32, 64, 128, 4, 4),
        (32, 32, 128, 4, 4),
    ],
    (8, 0): [
        (128, 256, 32, 3, 8),
        (128, 128, 32, 4, 4),
        (128, 128, 32, 4, 8),
        (256, 128, 32, 3, 8),
        (64, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 64, 32, 5, 4),
        (32, 64, 64, 4, 4),
        (32, 32, 128, 4, 4),
    ],
    (8, 6): [
        (128, 128, 32, 3, 4),
        (128, 128, 32, 3, 8),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 4, 4),
        (64, 64, 64, 3, 4),
        (32, 64, 64, 3, 4),
        (32, 32, 128, 3, 4),
    ],
}
DECODE_BLOCK_M = 32  # configs with BLOCK_M <= this are the decode tiles
# The masked dX (p > 0) adds the rank-r term in its epilogue from a second accumulator, beside the main one: most
# register-heavy tiles spilled there, so the prune keeps it to these accumulator registers per thread, by num_warps,
# and off the persistent pointer-load variant (AOT compiles, tools/aot_compile_triton.py, triton 3.6 and 3.8: 128 x 256
# with 8 warps spilled about 1.2 KB/thread; 64 registers with 4 warps spilled 8-16 B on sm86/sm90 (3.8); the
# persistent pointer-load variant 32-104 B at 64 registers on sm90, in both versions).
MASKED_MAX_ACC_REGS = {4: 32, 8: 64}
# Columns of r per k-step of the rank-r term (its fp32 operand tiles sit in shared memory beside the pipeline).
LOWRANK_CHUNK = 32
# The CPU interpreter costs per numpy op, not per flop: few, large-ish tiles keep the tests fast.
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, PERSISTENT=False, USE_TMA=False, num_stages=1,
                        num_warps=4)

# (PERSISTENT, USE_TMA) variants tried per tile: sm90 keeps whichever of plain, persistent and TMA measures faster,
# so all four combinations go to its autotuner. TMA needs sm90; sm8x keeps the plain kernel.
GEMM_VARIANTS = {
    (9, 0): [(False, False), (True, False), (False, True), (True, True)],
}

# The autotune space of a first GPU contact, chosen from the ahead-of-time SASS report
# (benchmarks/results/sass/): (tile, PERSISTENT, USE_TMA) per architecture, selected with
# KASA_KERNELS_TRITON_AUTOTUNE=shortlist (tools/gpu_session.sh sets it), so that autotuning every shape and dtype of a
# GPU session fits in its time. Each architecture keeps a large tile without spills for P, a tile the masked dX keeps
# (masked_dx_fits), and a decode tile; sm90's large tile reads through TMA (its k-step is the shortest loop body in
# the report), and its 128 x 128 pointer-load tile is what remains where TMA cannot read the operands.
AUTOTUNE_ENV = "KASA_KERNELS_TRITON_AUTOTUNE"
SHORTLIST = {
    (9, 0): [((128, 256, 64, 3, 8), False, True), ((128, 128, 64, 4, 8), False, False),
             ((32, 64, 128, 4, 4), False, False)],
    (8, 0): [((128, 256, 32, 3, 8), False, False), ((128, 128, 32, 4, 8), False, False),
             ((32, 64, 64, 4, 4), False, False)],
    (8, 6): [((128, 128, 32, 3, 8), False, False), ((64, 64, 32, 4, 4), False, False),
             ((32, 64, 64, 3, 4), False, False)],
}

# TMA_OK and B_K_CONTIG key the cache too: a config that reads through TMA must never be reused for operands that TMA
# cannot read, and the forward (b = W^T, unit stride along k) and dX (b = W, unit stride along n) read b in different
# orders even where their (M, N, K) coincide.
_AUTOTUNE_KEY = ["m_bucket", "N", "K", "R_PAD", "LOWRANK", "LOWRANK_DROPOUT", "TMA_OK", "B_K_CONTIG", "QUANT"]


def smem_bytes(major: int, bm: int, bn: int, bk: int, stages: int, elem: int, r_chunk: int, tma: bool = False) -> int:
    """Upper bound of the GEMM's shared memory, fitted to AOT compiles (tools/aot_compile_triton.py, triton 3.8):
    sm90 allocates num_stages operand buffers, sm8x num_stages - 1 (bf16/fp16; fp32 inputs took up to one buffer
    more, e.g. 160 KB for 128x256x32x3 on sm80); the rank-r step's fp32 tiles are counted on top. TMA configs add
    one 8-byte mbarrier per stage (AOT sm90, bf16 128x256x64x3: 147480 B against the pointer loads' 147456)."""
    buffers = stages if major >= 9 or elem == 4 else stages - 1
    return buffers * (bm * bk + bk * bn) * elem + (bm + bn) * r_chunk * 4 + (8 * stages if tma else 0)


def masked_dx_fits(config) -> bool:
    """Whether the masked dX's epilogue, with its two fp32 accumulators, fits this config's registers (see
    MASKED_MAX_ACC_REGS)."""
    k = config.kwargs
    acc_registers = k["BLOCK_M"] * k["BLOCK_N"] // (32 * config.num_warps)
    return (acc_registers <= MASKED_MAX_ACC_REGS.get(config.num_warps, 0)
            and not (k.get("PERSISTENT", False) and not k.get("USE_TMA", False)))


def prune_configs(configs, named_args, **kwargs):
    """Drop decode tiles (BLOCK_M <= 32) unless M <= 64 and the others unless M > 32, TMA configs where the
    launcher could not build descriptors (TMA_OK false), persistent configs where the tiles do not outnumber the SMs
    (they would launch the same programs as the plain config), masked dX configs whose epilogue would spill
    (masked_dx_fits), and configs whose shared memory exceeds this GPU's
    (sm86/sm89: 99 KB; fp32 inputs double the tiles), so the autotuner does not compile them only to fail with
    OutOfResources; keep the smallest if none fits."""
    a = named_args["a_ptr"]
    M, N = named_args["M"], named_args["N"]
    target = target_of(a.device)
    n_sms = target.n_sms

    def fits_m(c):  # constant over an autotune key: its m_bucket (next power of two) splits at 32 and 64 too
        decode_tile = c.kwargs["BLOCK_M"] <= DECODE_BLOCK_M
        return M <= 2 * DECODE_BLOCK_M if decode_tile else M > DECODE_BLOCK_M

    configs = [c for c in configs if fits_m(c)] or configs
    configs = [
        c for c in configs
        if (kwargs.get("TMA_OK", False) or not c.kwargs.get("USE_TMA", False))
        and (not c.kwargs.get("PERSISTENT", False)
             or triton.cdiv(M, c.kwargs["BLOCK_M"]) * triton.cdiv(N, c.kwargs["BLOCK_N"]) > n_sms)
    ]
    if kwargs.get("LOWRANK_DROPOUT", False):
        configs = [c for c in configs if masked_dx_fits(c)] or configs
    major, limit = target.arch[0], target.smem_limit
    r_chunk = kwargs.get("R_CHUNK", 0) if kwargs.get("LOWRANK", False) else 0

    def need(c):
        k = c.kwargs
        return smem_bytes(major, k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_stages, a.element_size(), r_chunk,
                          k.get("USE_TMA", False))

    kept = [c for c in configs if need(c) <= limit]
    return kept or [min(configs, key=need)]


def set_tma_block_shapes(nargs):
    """Config pre-hook: the host descriptors' block shapes are the config's tiles. Set for every config, TMA or not,
    because a descriptor's block shape is part of the kernel's signature: a stale one would recompile the plain
    configs for each shape left behind by the previous config."""
    a_desc, b_desc = nargs["a_desc"], nargs["b_desc"]
    if a_desc is None:
        return
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    a_desc.block_shape = [bm, bk]
    b_desc.block_shape = [bn, bk] if nargs["B_K_CONTIG"] else [bk, bn]


def autotune_configs(arch: Tuple[int, int], space: Optional[str] = None):
    """The autotuner's configs for `arch`: every tile x variant ("full"), or SHORTLIST[arch] ("shortlist").
    space defaults to the environment variable AUTOTUNE_ENV, else "full"."""
    space = space or os.environ.get(AUTOTUNE_ENV) or "full"
    if space not in ("full", "shortlist"):
        raise ValueError(f"{AUTOTUNE_ENV}: expected 'full' or 'shortlist', got {space!r}")
    variants = GEMM_VARIANTS.get(arch, [(False, False)])
    entries = SHORTLIST[arch] if space == "shortlist" else [
        (tile, persistent, tma) for tile in GEMM_CONFIGS[arch] for persistent, tma in variants]
    return [
        triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, PERSISTENT=persistent, USE_TMA=tma),
                      num_stages=st, num_warps=w, pre_hook=set_tma_block_shapes if len(variants) > 1 else None)
        for (bm, bn, bk, st, w), persistent, tma in entries
    ]


@functools.lru_cache(maxsize=None)
def autotuned_kernel(arch: Tuple[int, int]):
    """One Autotuner per architecture, built on first use (which reads AUTOTUNE_ENV)."""
    return triton.autotune(configs=autotune_configs(arch), key=_AUTOTUNE_KEY,
                           prune_configs_by={"early_config_prune": prune_configs})(gemm_lowrank_kernel)


# ----------------------------------------------------------------------------------------------------------------
# The kernel


@triton.jit
def _gemm_lowrank_tile(
    tile, a_ptr, b_ptr, a_desc, b_desc, q_scale_ptr, q_code_ptr, l_ptr, lb_ptr, bias_ptr, out_ptr, seed_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_bk, stride_bn,
    stride_lm, stride_lr, stride_lbr, stride_lbn,
    stride_om, stride_on,
    keep_scale, threshold,
    HAS_BIAS: tl.constexpr, LOWRANK: tl.constexpr, LOWRANK_DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, LOWRANK_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    R_CHUNK: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, B_K_CONTIG: tl.constexpr,
    QUANT: tl.constexpr, QBLOCK: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of gemm_lowrank_kernel's output (its docstring has the math)."""
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
    tl.static_assert(not (USE_TMA and QUANT != 0), "a quantized b is read through pointers")
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
            if QUANT == 0:
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            else:  # b_ptr is the packed weight: its elements dequantized in the activation dtype (triton_dequant)
                b = dequant_tile(b_ptr, q_scale_ptr, q_code_ptr, k0 + offs_k, offs_n_ld, offs_k < k_left,
                                 stride_bk, stride_bn, QUANT, QBLOCK, B_K_CONTIG).to(a.dtype)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

    if LOWRANK:
        # Without dropout the rank-r k-steps add into the main accumulator; with it the term is masked per element,
        # so it gets its own (prune_configs keeps this to tiles whose two accumulators fit: masked_dx_fits).
        if LOWRANK_DROPOUT:
            lr = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            lr = acc
        for r0 in tl.range(0, R, R_CHUNK, num_stages=1):
            offs_r = r0 + tl.arange(0, R_CHUNK)
            r_ok = offs_r < R
            l_tile = tl.load(l_ptr + offs_m_ld[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                             mask=r_ok[None, :], other=0.0).to(tl.float32)
            lb_tile = tl.load(lb_ptr + offs_r[:, None] * stride_lbr + offs_n_ld[None, :] * stride_lbn,
                              mask=r_ok[:, None], other=0.0).to(tl.float32)
            lr = tl.dot(l_tile, lb_tile, lr, input_precision=LOWRANK_PRECISION)
        if LOWRANK_DROPOUT:
            keep = keep_mask(seed_ptr, offs_m, offs_n, N, threshold)
            acc += tl.where(keep, lr * keep_scale, 0.0)
        else:
            acc = lr

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n_ld).to(tl.float32)[None, :]

    out_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :].to(tl.int64) * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def gemm_lowrank_kernel(
    a_ptr, b_ptr, a_desc, b_desc, q_scale_ptr, q_code_ptr, l_ptr, lb_ptr, bias_ptr, out_ptr, seed_ptr,
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
    QUANT: tl.constexpr, QBLOCK: tl.constexpr,
):
    """out (M, N) = a (M, K) @ b (K, N) + [l (M, R) @ lb (R, N)] + [bias (N,)], every operand through its strides.

    The rank-r term enters as k-steps after the main loop, so the pipeline's first copies are a tile's first memory
    operations. As k-steps before the loop, its synchronous loads, a wgmma waited on to completion and, with dropout,
    about 3,200 mask instructions per thread delayed the first copy on every tile; inside the loop's first iteration
    they made every main-loop wgmma wait for completion (AOT sm90, 128 x 256, triton 3.8).

    With dropout (LOWRANK_DROPOUT) the rank-r term is masked per output element (m, n), which in dX is exactly
    element (m, k) of x, so it is accumulated apart and masked before it is added. The rank-r operands stay fp32 (l is
    H-sized: it can exceed fp16's 65504 while the output does not) and run at LOWRANK_PRECISION (tf32 for fp16/bf16 x:
    fp16's mantissa with fp32's range), R_CHUNK columns of r at a time: whole fp32 (BLOCK_M + BLOCK_N) x R_PAD tiles
    added 196 KB of shared memory at r = 128 (AOT, sm90).

    Variants (sm90 autotunes over them): PERSISTENT launches min(tiles, SMs) programs that stride over the tiles;
    USE_TMA reads a and b through host tensor descriptors a_desc (BLOCK_M, BLOCK_K) and b_desc, which is
    (BLOCK_N, BLOCK_K) over b's transpose when B_K_CONTIG (forward: W itself) and (BLOCK_K, BLOCK_N) otherwise (dX).
    TMA_OK (the launcher built both descriptors) only keys the autotuner; a_desc/b_desc are None without it."""
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _gemm_lowrank_tile(
                tile, a_ptr, b_ptr, a_desc, b_desc, q_scale_ptr, q_code_ptr, l_ptr, lb_ptr, bias_ptr, out_ptr,
                seed_ptr, M, N, K, R,
                stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_lbr, stride_lbn,
                stride_om, stride_on, keep_scale, threshold,
                HAS_BIAS, LOWRANK, LOWRANK_DROPOUT, INPUT_PRECISION, LOWRANK_PRECISION,
                BLOCK_M, BLOCK_N, BLOCK_K, R_CHUNK, GROUP_M, USE_TMA, B_K_CONTIG, QUANT, QBLOCK,
            )
    else:
        _gemm_lowrank_tile(
            tl.program_id(0), a_ptr, b_ptr, a_desc, b_desc, q_scale_ptr, q_code_ptr, l_ptr, lb_ptr, bias_ptr, out_ptr,
            seed_ptr, M, N, K, R,
            stride_am, stride_ak, stride_bk, stride_bn, stride_lm, stride_lr, stride_lbr, stride_lbn,
            stride_om, stride_on, keep_scale, threshold,
            HAS_BIAS, LOWRANK, LOWRANK_DROPOUT, INPUT_PRECISION, LOWRANK_PRECISION,
            BLOCK_M, BLOCK_N, BLOCK_K, R_CHUNK, GROUP_M, USE_TMA, B_K_CONTIG, QUANT, QBLOCK,
        )


# ----------------------------------------------------------------------------------------------------------------
# The launcher


class KNView(NamedTuple):
    """A tensor read as a logical (K, N) matrix through two strides, so W^T and W need no copy."""

    tensor: torch.Tensor
    stride_k: int
    stride_n: int


class LowRank(NamedTuple):
    """The rank-r term l (M, R) @ lb, lb read as (R, N) (stride_k of the view steps over r)."""

    l: torch.Tensor
    lb: KNView


def tma_descriptors(a, b: KNView, M, N, K):
    """Host tensor descriptors (a over (M, K), b over (N, K) when its unit stride is along k, else over (K, N)), or
    (None, None) when TMA cannot read both: it needs a unit last-dim stride and 16-byte aligned base pointer and row
    stride (odd K or N in fp16/bf16, strided views of x and offset slices fail that). Rows that overlap (a broadcast
    grad_y has row stride 0) stay on pointer loads too: no GPU run has tried TMA on them. The block shapes are
    placeholders until set_tma_block_shapes fills in the config's tiles."""

    def readable(t, row_stride, cols):
        return t.data_ptr() % 16 == 0 and (row_stride * t.element_size()) % 16 == 0 and row_stride >= cols

    if a.stride(1) != 1 or not readable(a, a.stride(0), K):
        return None, None
    if b.stride_k == 1:
        b_shape, b_row_stride = [N, K], b.stride_n
    elif b.stride_n == 1:
        b_shape, b_row_stride = [K, N], b.stride_k
    else:
        return None, None
    if not readable(b.tensor, b_row_stride, b_shape[1]):
        return None, None
    return (TensorDescriptor(a, [M, K], [a.stride(0), 1], [16, 16]),
            TensorDescriptor(b.tensor, b_shape, [b_row_stride, 1], [16, 16]))


def gemm_lowrank(a: torch.Tensor, b: KNView, out: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                 lowrank: Optional[LowRank] = None, dropout: Optional[Dropout] = None, precision: str,
                 lowrank_precision: str, config: Optional[dict] = None,
                 quant: Optional[QuantOperand] = None) -> torch.Tensor:
    """out = a @ b [+ mask(l @ lb)] [+ bias], written into `out` (M, N) and returned.

    quant: b is a quantized weight (ops/triton_dequant.py): b.tensor its packed data, b's strides those of the
    row-major (N, K) weight's elements, dequantized in the main loop (read through pointers, never TMA).

    precision / lowrank_precision: tl.dot's input_precision for the main loop and the rank-r k-steps. dropout masks
    the rank-r term (dX only). config: fixed meta-parameters (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, PERSISTENT, USE_TMA,
    num_stages, num_warps) instead of the autotuner's choice (tests use it to run each variant); USE_TMA is honoured
    only where TMA can read the operands, as the autotuner's prune does."""
    M, K = a.shape
    N = out.shape[1]
    R = lowrank.l.shape[1] if lowrank is not None else 0
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()  # the kernel reads b with unit stride (N elements, cheap)
    target = target_of(a.device)
    arch = target.arch if target is not None else None
    if config is not None:
        kernel, meta = gemm_lowrank_kernel, dict(config)
        want_tma = bool(meta.get("USE_TMA")) and arch in (None, (9, 0))
    elif arch is None:
        kernel, meta, want_tma = gemm_lowrank_kernel, dict(INTERPRET_CONFIG), False
    else:
        kernel, meta = autotuned_kernel(arch), {}
        want_tma = any(tma for _, tma in GEMM_VARIANTS.get(arch, ()))
    a_desc, b_desc = tma_descriptors(a, b, M, N, K) if want_tma and quant is None else (None, None)
    tma_ok = a_desc is not None
    b_k_contig = b.stride_k == 1
    if config is not None:
        meta["USE_TMA"] = tma_ok
        set_tma_block_shapes(dict(meta, a_desc=a_desc, b_desc=b_desc, B_K_CONTIG=b_k_contig))
    n_sms = sm_count(target)

    def grid(m):
        tiles = triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"])
        return (min(tiles, n_sms) if m["PERSISTENT"] else tiles,)

    if lowrank is not None:
        l, lb = lowrank.l, lowrank.lb
        l_args = (l, lb.tensor)
        l_strides = (l.stride(0), l.stride(1), lb.stride_k, lb.stride_n)
    else:
        l_args = (a, b.tensor)  # never read: LOWRANK is off
        l_strides = (0, 0, 0, 0)
    rp = r_pad(R) if lowrank is not None else 16
    kernel[grid](
        a, b.tensor, a_desc, b_desc, *((quant.scale, quant.code) if quant is not None else (a, a)),
        *l_args, bias if bias is not None else a, out,
        dropout.seed if dropout is not None else a,
        M, N, K, R, next_pow2(M),
        a.stride(0), a.stride(1), b.stride_k, b.stride_n,
        *l_strides,
        out.stride(0), out.stride(1),
        dropout.keep_scale if dropout is not None else 1.0, dropout.threshold if dropout is not None else 0,
        HAS_BIAS=bias is not None, LOWRANK=lowrank is not None,
        LOWRANK_DROPOUT=lowrank is not None and dropout is not None,
        INPUT_PRECISION=precision, LOWRANK_PRECISION=lowrank_precision, R_PAD=rp,
        R_CHUNK=min(rp, LOWRANK_CHUNK), TMA_OK=tma_ok, B_K_CONTIG=b_k_contig,
        QUANT=quant.quant if quant is not None else 0, QBLOCK=quant.blocksize if quant is not None else 1, **meta,
    )
    return out
