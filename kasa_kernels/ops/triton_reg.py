"""Backend "triton": the KaSA regularizer of a whole model in one launch (docs/math.md, "Regularizer").

Every factor is viewed as a tall (n_long, r) matrix F whose r x r Gram is F^T F: F = A^T (n_long = K) for
lora_A (r, K) and F = B (n_long = N) for lora_B (N, r). With E = F^T F - I (symmetric), the gradient of ||E||_F is
2 F E / ||E||_F in that same view (2 E A for A, 2 B E for B), so one code path serves both factors.

Layout: all factors and diagonals are copied into one flat fp32 buffer; a table row per entry gives its offset,
n_long, r, the strides of the F view and the official form's extra term. One program per entry (A, B or d of a
layer) writes its loss term into a partial buffer and its gradient into a flat buffer of the same layout; the L*3
partials are summed in a fixed order. Offsets are integers added to one base pointer, never pointers loaded from
memory, so the same kernel runs under the CPU interpreter (which cannot dereference loaded pointers) and on GPU.
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .defs import register_kernel
from .triton_common import r_pad, target_of

_KIND_GRAM = 0
_KIND_DIAG = 1
TABLE_COLS = 7  # offset, n_long, r, stride_long, stride_r, kind, extra


@triton.jit
def regularizer_kernel(
    fac_ptr, grad_ptr, table_ptr, part_ptr,
    beta, gamma, inv_layers,
    BLOCK_L: tl.constexpr, R_PAD: tl.constexpr, TABLE_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    row = table_ptr + pid * TABLE_COLS
    off = tl.load(row)
    n_long = tl.load(row + 1)
    r = tl.load(row + 2)
    stride_long = tl.load(row + 3)
    stride_r = tl.load(row + 4)
    kind = tl.load(row + 5)
    extra = tl.load(row + 6).to(tl.float32)
    offs_r = tl.arange(0, R_PAD)
    r_ok = offs_r < r
    if kind == 1:
        d = tl.load(fac_ptr + off + offs_r, mask=r_ok, other=0.0)
        tl.store(part_ptr + pid, beta * tl.sum(d * d, axis=0) * inv_layers)
        tl.store(grad_ptr + off + offs_r, (2.0 * beta * inv_layers) * d, mask=r_ok)
    else:
        gram = tl.zeros((R_PAD, R_PAD), dtype=tl.float32)
        for l0 in range(0, n_long, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            f = tl.load(fac_ptr + off + offs_l[:, None] * stride_long + offs_r[None, :] * stride_r,
                        mask=(offs_l[:, None] < n_long) & r_ok[None, :], other=0.0)
            gram = tl.dot(tl.trans(f), f, gram, input_precision="ieee")
        # Padding rows/cols of the Gram are zero, so subtracting I on the valid r x r block keeps E zero there.
        eye = (offs_r[:, None] == offs_r[None, :]) & r_ok[:, None]
        e = gram - tl.where(eye, 1.0, 0.0)
        fro_sq = tl.sum(tl.sum(e * e, axis=1), axis=0)
        g = tl.sqrt(fro_sq + extra)
        tl.store(part_ptr + pid, gamma * g * inv_layers)
        # ||E|| = 0 (an exactly orthonormal factor) is not differentiable: take 0/0 as 0.
        coef = tl.where(g > 0.0, (2.0 * gamma * inv_layers) / tl.maximum(g, 1e-30), 0.0)
        for l0 in range(0, n_long, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            ptr_off = off + offs_l[:, None] * stride_long + offs_r[None, :] * stride_r
            ok = (offs_l[:, None] < n_long) & r_ok[None, :]
            f = tl.load(fac_ptr + ptr_off, mask=ok, other=0.0)
            tl.store(grad_ptr + ptr_off, tl.dot(f, e, input_precision="ieee") * coef, mask=ok)


def _layout(shapes_a, shapes_b, shapes_d, official: bool):
    """Table rows and flat sizes for factors packed in order A_0..A_L-1, B_0.., d_0.. (each row-major)."""
    rows = []
    off = 0
    for r, k in shapes_a:
        rows.append((off, k, r, 1, k, _KIND_GRAM, (k - r) if official else 0))
        off += r * k
    for n, r in shapes_b:
        rows.append((off, n, r, r, 1, _KIND_GRAM, (n - r) if official else 0))
        off += n * r
    for (r,) in shapes_d:
        rows.append((off, 1, r, 1, 1, _KIND_DIAG, 0))
        off += r
    return rows, off


@register_kernel("regularizer", "triton")
def regularizer(lora_As: List[torch.Tensor], lora_Bs: List[torch.Tensor], lora_diags: List[torch.Tensor], beta: float,
                gamma: float, official: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, flat fp32 gradients of every A, B, d in order): ops/defs.py's regularizer contract."""
    dev = lora_As[0].device
    rows, total = _layout([a.shape for a in lora_As], [b.shape for b in lora_Bs], [d.shape for d in lora_diags],
                          official)
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in (*lora_As, *lora_Bs, *lora_diags)])
    table = torch.tensor(rows, dtype=torch.int64).to(dev)
    grads = torch.empty(total, dtype=torch.float32, device=dev)
    partials = torch.empty(len(rows), dtype=torch.float32, device=dev)
    r_max = max(a.shape[0] for a in lora_As)
    target = target_of(dev)
    interpret = target is None
    regularizer_kernel[(len(rows),)](
        flat, grads, table, partials,
        float(beta), float(gamma), 1.0 / len(lora_As) if official else 1.0,
        # 64 rows a step up to R_PAD 32: 32 left 8 B/thread of stack on sm80 (AOT, triton 3.6); at R_PAD 128, 64 rows
        # spilled 1.5-9.8 KB/thread (AOT sm80/sm86/sm90, triton 3.6 and 3.8), so there 32
        BLOCK_L=64 if interpret or r_pad(r_max) <= 32 else 32, R_PAD=r_pad(r_max), TABLE_COLS=TABLE_COLS,
        num_warps=4 if r_max <= 32 else 8,
        # AOT (triton 3.8), R_PAD 128: 3 stages need 106 KB of shared memory, over sm86's 99 KB; 1 stage needs 80 KB
        # and does not spill on sm86 but spills 1.6 KB/thread on sm90, where 3 stages fit.
        num_stages=3 if interpret or target.arch[0] >= 9 else 1,
    )
    return partials.sum(), grads
