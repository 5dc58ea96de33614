"""Backend "torch": the fused KaSA linear op in plain PyTorch, with the closed-form backward of docs/math.md.

Runs on every device and traces under torch.compile. It never forms diag(d) and never keeps an M x N or M x K
tensor for backward: forward returns H = dropout(x) A^T (M x r, in the operand dtype below) and backward rebuilds
everything else from x, H and the dropout seed.

It is what backend="auto" runs wherever no fused backend has been measured faster, so it is written to move few
bytes (kasa-bench traffic counts them per aten op; tests/test_traffic.py holds it to the best unfused composition):
- The rank-r products take x and the output gradient in their own dtype and cast the small factors instead, except
  where precision.operand_dtype says fp32 (fp16's range; CPUs without bf16 GEMM kernels); bf16 products sum in fp32
  and come back unrounded where torch.mm has out_dtype (CUDA), else rounded once (precision.rank_r_mm).
- H is kept in that operand dtype: both of its readers (the forward GEMM's rank-r term, backward's G^T H) take it
  in that dtype, so an fp32 H would only be written, cast and read again (on CUDA, 2.5 MiB at P in bf16, more than
  unsloth_style's whole margin: kasa-bench traffic). The values are the same either way: the bf16 H is the one
  rounding of the fp32 sum that an fp32 H was cast to before each use.
- d is folded into B (an N x r product written straight in the operand dtype), s into the alpha of the GEMMs that
  take B diag(d) or H (forward's rank-r term, backward's gH and G^T H), the dropout scale 1/(1-p) into A, so the
  M x r work is the products themselves; dB and dd come from the one N x r product s G^T H: dB = (s G^T H) d,
  dd = colsum(B * (s G^T H)).
- The mask is used through ops/rng.py's kernels, one fused kernel each (inductor's on CUDA, ops/cpu_mask.c's on
  CPU): forward masks x once; backward masks dx's rank-r term and x (for dA) in one pass. Masked values are exact
  (no scale).
- On CPU, for an fp32 G of 2^14 elements or more (and fp32 adapters), backward's gH, dB and dd come from one C pass
  that reads G once (ops/cpu_rank.c, through cpu_mask.dy_grads), with d on the r-wide rows as the fused backends
  apply it: it replaces two GEMMs (BLAS runs these thin shapes far below its GEMM rate) and five small aten calls.
  Elsewhere (smaller G, other dtypes, under torch.compile or a dispatch mode) they are the torch form below.
- The base GEMMs and the M x N output stay in x's dtype, and each rank-r term is added into its GEMM's output in
  place by addmm_ (with dropout, dx's term gH A is formed, then masked and added in one pass). On CPUs without bf16
  GEMM kernels a bf16/fp16 layer runs its base GEMMs in fp32 as well ("wide"), and rounds Y and dx once at the end.
- On CPUs where ops/cpu_gemm.c measured faster than torch's GEMM (cpu_mask.gemm_preferred: AMD x86 with AVX2 at
  up to two torch threads, or $KASA_KERNELS_CPU_GEMM=1), the fp32 base GEMMs of cpu_mask.GEMM_MIN_MACS
  multiply-adds or more (the wide path's included) are that packed GEMM instead, with the rank-r term as r more
  k-steps: forward's Y takes its bias and s H (B diag(d))^T inside, backward's dx its gH A where there is no
  dropout to mask it. That is the structure of the fused GPU kernels, and it spares the addmm_'s second pass over
  the M x N output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import cpu_mask
from .defs import register_kernel
from .precision import (accumulation_dtype, cast, fp16_rebalance, lowp_gemm_native, mm_sums_to_fp32, operand_dtype,
                        rank_r_mm)
from .quant_weight import dequantizing
from .rng import add_masked_, dropout_backward_, keep_scale, masked


def _factor_a(lora_A: torch.Tensor, scale: float, dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """scale * A (r, K) in the operand dtype: the dropout's 1/(1-p) rides on A, rounded once with it."""
    if scale == 1.0:
        return lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
    return cast(cast(lora_A, acc) * scale, dtype)


def _factor_b(lora_B: torch.Tensor, lora_diag: torch.Tensor, dtype: torch.dtype, acc: torch.dtype) -> torch.Tensor:
    """B diag(d) (N, r) in the operand dtype, rounded once (s rides on the GEMMs' alpha instead). Where the operand
    dtype is narrower, the product is written in it (out=), which reads B once and writes the small result once
    instead of writing a wider product and casting it."""
    d = lora_diag if lora_diag.dtype == acc else lora_diag.to(acc)
    b = lora_B if lora_B.dtype == acc else lora_B.to(acc)
    if dtype == acc:
        return b * d
    return torch.mul(b, d, out=torch.empty(lora_B.shape, dtype=dtype, device=lora_B.device))


def _add_lowrank_(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, alpha: float = 1.0) -> None:
    """out += alpha * left @ right for a rank-r left (M, r) and right (r, cols) in the operand dtype, inside the GEMM
    (addmm_); an fp16 out takes its terms after precision.fp16_rebalance. (out is never a 16-bit tensor on a device
    without 16-bit GEMMs: there the base GEMM runs in fp32, see "wide" below.)"""
    if left.dtype != out.dtype:
        if out.dtype == torch.float16:
            left, right = fp16_rebalance(left, right)
        left, right = cast(left, out.dtype), cast(right, out.dtype)
    out.addmm_(left, right, alpha=alpha)


# "wide": a bf16/fp16 layer runs its base GEMMs in fp32 too on a CPU without GEMM kernels in its dtype
# (precision.PATHS), where torch's fallback 16-bit GEMM is 4-6x slower than converting W to fp32, multiplying and
# rounding once (1 thread, 2-core AMD EPYC, 2026-12-01: 1024 x 768 x 768 in 152 ms against 32 ms; 512 x 2048 x 2048
# in 469 ms against 100). The values are those of the 16-bit GEMM, which also sums in fp32 and rounds once, up to the
# order of the sum. Costs a transient fp32 copy of W (N x K x 4 bytes) per GEMM, nothing saved. It is the case
# exactly when the operand dtype differs from x's and the device lacks x's GEMMs.


def _dtypes(x2d: torch.Tensor):
    """(accumulation dtype, operand dtype, wide) for x2d: precision's rules, with fp32 and fp64 (x's own dtype for
    both, never wide) answered without a call."""
    xd = x2d.dtype
    if xd == torch.float32 or xd == torch.float64:
        return xd, xd, False
    dt = operand_dtype(x2d)
    return accumulation_dtype(x2d), dt, dt != xd and not lowp_gemm_native(x2d)


# The two kernels below are what every KaSA layer on the torch backend runs per call, so each is one function with
# its small steps inline: on a CPU a small layer's time is mostly Python between aten calls, and with the caches
# cold from the layer before it (as in training; kasa-bench flushes them) every further helper call showed.


@register_kernel("linear_forward", "torch")
def linear_forward(
    x2d: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Y = x W^T + b + s ((dropout(x) A^T) d) B^T for x2d (M, K). Returns (Y in x's dtype, H (M, r) in the operand
    dtype: x's own where the device has fast GEMMs in it, else fp32; fp64 for fp64)."""
    acc, dt, wide = _dtypes(x2d)
    # H = keep(x) (A / (1-p))^T, summed in fp32 by every BLAS, rounded once to the operand dtype
    if dropout_p > 0.0:
        h = masked(x2d, seed, dropout_p, dt) @ _factor_a(lora_A, keep_scale(dropout_p), dt, acc).t()
        x_op = x2d.to(dt) if wide else x2d
    else:
        x_op = x2d if x2d.dtype == dt else x2d.to(dt)
        h = x_op @ (lora_A if lora_A.dtype == dt else lora_A.to(dt)).t()
    bd = _factor_b(lora_B, lora_diag, dt, acc)  # B diag(d); s rides on the GEMM's alpha
    if dt == torch.float32 and cpu_mask.gemm_wanted(x2d, x2d.shape[0], weight.shape[0], x2d.shape[1]):
        # one packed GEMM with the rank-r term as r more k-steps (ops/cpu_gemm.c): no second pass over Y
        y = cpu_mask.gemm(x_op, weight.to(dt).t(), None if bias is None else bias.to(dt), h, bd.t(), scaling)
        if y is not None:
            return (y.to(x2d.dtype) if wide else y), h
    if wide:  # Y in fp32, its rank-r term added inside the GEMM, rounded once to x's dtype
        y = F.linear(x_op, weight.to(dt), None if bias is None else bias.to(dt))
        y.addmm_(h, bd.t(), alpha=scaling)
        return y.to(x2d.dtype), h
    y = F.linear(x2d, weight, bias)
    _add_lowrank_(y, h, bd.t(), scaling)
    return y, h


@register_kernel("linear_backward", "torch")
def linear_backward(
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
    needs: Tuple[bool, bool, bool, bool],
):
    """Gradients (dx, dA, dd, dB) of linear_forward; each None where `needs` says it is not wanted.

    dx is in x's dtype; dA, dd, dB are in the accumulation dtype (the autograd layer casts them)."""
    need_dx, need_da, need_dd, need_db = needs
    acc, dt, wide = _dtypes(x2d)
    g = grad_y if grad_y.dtype == dt else grad_y.to(dt)
    # the three rank-r gradients of G from one read of it, where ops/cpu_rank.c runs (fp32 on CPU)
    both = (need_dx or need_da) and (need_dd or need_db)
    grads = cpu_mask.dy_grads(g, lora_B, lora_diag, h, scaling) if both and dt == torch.float32 else None
    sums32 = g.dtype == torch.bfloat16 and mm_sums_to_fp32(g)
    if grads is not None:
        gh, db, dd = grads
        db, dd = db if need_db else None, dd if need_dd else None
    else:
        gh = dd = db = None
        bd = _factor_b(lora_B, lora_diag, dt, acc)  # B diag(d); s rides on the GEMMs' alpha
        if need_dx or need_da:  # gH = s G B diag(d), (M, r); beta = 0 leaves h (there for its shape) unread
            gh = torch.addmm(h, g, bd, beta=0.0, alpha=scaling)
        if need_dd or need_db:
            # s G^T H (N, r): fp32 sums where torch.mm has out_dtype (CUDA), else in the operand dtype with s applied
            # inside the GEMM (alpha; beta = 0 leaves bd unread), rounded once. Its readers take it as it comes (db's
            # product promotes to fp32) instead of a cast copy: on cpu-bf16-gemm at P the copy was the 1/256 of a
            # pass by which the backend moved more than unsloth_style (kasa-bench traffic).
            # The fp32-sum form has no alpha: there s goes on the r-sized factors instead (a pass over the N x r
            # product would be 0.008 of a pass more than unsloth_style at P).
            s_after = None
            if sums32:
                gth, s_after = rank_r_mm(g.t(), h, acc), scaling
            else:
                gth = torch.addmm(bd, g.t(), h, beta=0.0, alpha=scaling)
            if need_db:
                d = cast(lora_diag, acc)
                db = gth * (d if s_after is None else d * s_after)
            if need_dd:  # the diagonal of B^T (s G^T H): one pass over B and G^T H, the r x r product is tiny
                # (a column-wise dot product would write and read an N x r product: 0.06 of a pass at 512 x 2048)
                dd = cast(torch.mm(cast(lora_B, gth.dtype).t(), gth).diagonal(), acc)
                if s_after is not None:
                    dd = dd * s_after
    dx = x_kept = None
    if need_dx:
        a_op = None if dropout_p > 0.0 else lora_A if lora_A.dtype == dt else lora_A.to(dt)
        term_in = False  # whether dx already holds its rank-r term
        if dt == torch.float32 and cpu_mask.gemm_wanted(g, g.shape[0], weight.shape[1], g.shape[1]):
            # ops/cpu_gemm.c's packed GEMM; without dropout, dx's rank-r term rides along as r more k-steps
            dx = cpu_mask.gemm(g, weight.to(dt), left=None if a_op is None else gh, right=a_op)
            term_in = dx is not None and a_op is not None
        if dx is None:
            dx = g @ weight.to(dt) if wide else grad_y @ weight  # wide: in fp32, rounded once after the rank-r term
        if dropout_p == 0.0:
            if not term_in:
                _add_lowrank_(dx, gh, a_op)
        elif need_da:  # one mask for dx's rank-r term and for dA's input; the term's buffer then holds keep(x)
            a = _factor_a(lora_A, keep_scale(dropout_p), dt, acc)
            dx, x_kept = dropout_backward_(dx, gh @ a, x2d, seed, dropout_p)
        else:
            add_masked_(dx, gh @ _factor_a(lora_A, keep_scale(dropout_p), dt, acc), seed, dropout_p)
        if wide:
            dx = dx.to(x2d.dtype)
    da = None
    if need_da:
        if x_kept is None:
            x_kept = masked(x2d, seed, dropout_p, dt) if dropout_p > 0.0 else x2d if x2d.dtype == dt else x2d.to(dt)
        da = rank_r_mm(gh.t(), x_kept, acc) if sums32 else gh.t() @ x_kept  # (rank_r_mm's two cases, one known)
        if da.dtype != acc:
            da = da.to(acc)
        if dropout_p > 0.0:
            da *= keep_scale(dropout_p)
    return dx, da, dd, db


# A quantized base (ops/quant_weight.py): W is dequantized at each call, in x's dtype and bit for bit as bitsandbytes
# dequantizes it, and dropped after its GEMM; the autograd layer saves the packed weight, never this matrix. Backward
# reads W only for dx.
qlinear_forward, qlinear_backward = dequantizing(linear_forward, linear_backward, weight_without_dx=False)
register_kernel("qlinear_forward", "torch")(qlinear_forward)
register_kernel("qlinear_backward", "torch")(qlinear_backward)
