"""The fused ops, each defined once: signature, fake implementation, and the backends' kernels behind it.

    linear_forward   (x2d, W, b, A, d, B, s, p, seed)            -> (Y (M, N) in x's dtype, H (M, r))
    linear_backward  (G, x2d, W, A, d, B, H, s, p, seed, needs)  -> (dx, dA, dd, dB), None where not needed
    regularizer      (As, Bs, ds, beta, gamma, official)         -> (loss, [dA_l], [dB_l], [dd_l]), all fp32
    base_gemm        (x2d, W, b)                                  -> x W^T + b through a fused GEMM, adapter off
    qlinear_forward / qlinear_backward: linear_forward / linear_backward for a quantized W (a QuantizedWeight,
                     ops/quant_weight.py), which the two Python entry points below route there

The math is docs/math.md's. A backend supplies kernels with `register_kernel(op, backend)`; kasa_kernels._backend
imports a backend's modules (which register on import) before anything calls it, and decides which backend runs.

Backends whose kernels are opaque to torch.compile (triton, cuda) run behind one torch.library custom op per fused
op, `kasa_kernels::<op>`, which takes the backend's name as its first argument: the fake implementation below is the
only one, and torch.compile(fullgraph=True) traces a KasaLinear on any backend without graph breaks. The torch
backend is plain PyTorch, so its kernels are called directly and inductor sees (and fuses) their aten ops.

Kernel contracts (the custom ops' bodies hold the kernels to them):
- linear_forward kernels return (Y, H), H fp32 from the opaque backends (the fake implementation's); the torch
  backend's H is in its rank-r operand dtype (ops/torch_linear.py: bf16 for bf16 layers where bf16 GEMMs are native),
  and only its own backward reads it. linear_backward kernels return (dx, dA, dd, dB) with None for gradients
  not asked for; dx in x's dtype, the rest fp32 (fp64 for fp64 inputs on the torch backend).
- regularizer kernels of opaque backends return (loss, flat), flat holding the fp32 gradients of every A, then
  every B, then every d, each flattened in order (one buffer: a custom op's outputs may not alias each other, and
  views of one buffer cost no copy); the torch backend's returns the three lists.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .quant_weight import QuantizedWeight, block_scales

OPS = ("linear_forward", "linear_backward", "regularizer", "base_gemm", "qlinear_forward", "qlinear_backward")
# Backends whose kernels run inline (traced by torch.compile) instead of behind the custom ops.
INLINE_BACKENDS = ("torch",)

_KERNELS: Dict[Tuple[str, str], Callable] = {}
# op -> {inline backend: its kernel}: what inline_kernel answers, read by the autograd layer directly (one dict
# lookup per call)
INLINE: Dict[str, Dict[str, Callable]] = {op: {} for op in OPS}


def register_kernel(op: str, backend: str) -> Callable[[Callable], Callable]:
    """Decorator: `fn` computes `op` for `backend` (kernel contracts in this module's docstring)."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")

    def register(fn: Callable) -> Callable:
        _KERNELS[(op, backend)] = fn
        if backend in INLINE_BACKENDS:
            INLINE[op][backend] = fn
        return fn

    return register


def kernel(op: str, backend: str) -> Callable:
    fn = _KERNELS.get((op, backend))
    if fn is None:
        have = sorted(b for (o, b) in _KERNELS if o == op)
        raise NotImplementedError(f"backend {backend!r} has no {op} kernel (registered: {', '.join(have) or 'none'})")
    return fn


def inline_kernel(op: str, backend: str) -> Optional[Callable]:
    """`op`'s kernel on an inline backend, for a caller that has validated every argument as the entry points below
    would (kasa_kernels.autograd, whose arguments come through kasa_kernels.functional: p a float in [0, 1), seed
    given exactly when p > 0, a tensor W); None for the other backends, which run behind the custom ops. Nothing
    then runs between the autograd layer and the kernel's aten calls: a small layer's call on a CPU is mostly
    Python, and each step shows (the autograd layer reads INLINE[op] itself, the same answer without this call)."""
    return INLINE[op].get(backend)


def _dropout_args(dropout_p: float, seed: Optional[Tensor]) -> Tuple[float, Optional[Tensor]]:
    """(p, seed) as the kernels take them: the seed only when p > 0, and required then. kasa_kernels.functional has
    validated both for users; this guards direct callers of the ops, whose kernels would otherwise read a missing seed
    or divide by 1 - p = 0."""
    p = float(dropout_p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {dropout_p!r}")
    if p > 0.0 and seed is None:
        raise ValueError("seed: required when dropout_p > 0 (an int64 tensor of shape (2,), see ops/rng.make_seed)")
    return p, (seed if p > 0.0 else None)


def _empty_like_none(t: Optional[Tensor], like: Tensor) -> Tensor:
    # a fresh (0,) placeholder per missing output: a custom op cannot return None, nor tensors that alias each other
    return like.new_empty((0,), dtype=torch.float32) if t is None else t


# ----------------------------------------------------------------------------------------------------------------
# linear_forward


@torch.library.custom_op("kasa_kernels::linear_forward", mutates_args=())
def _linear_forward_op(backend: str, x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                       lora_diag: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                       seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return kernel("linear_forward", backend)(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed)


@_linear_forward_op.register_fake
def _(backend, x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed):
    m = x2d.shape[0]
    return x2d.new_empty((m, weight.shape[0])), x2d.new_empty((m, lora_A.shape[0]), dtype=torch.float32)


def linear_forward(backend: str, x2d: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                   lora_diag: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                   seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Y = x W^T + b + s ((dropout(x) A^T) d) B^T for x2d (M, K); returns (Y in x's dtype, H = dropout(x) A^T).
    weight: a tensor, or a QuantizedWeight (then qlinear_forward runs)."""
    p, seed = _dropout_args(dropout_p, seed)
    if isinstance(weight, QuantizedWeight):
        return _qlinear_forward(backend, x2d, _decoded(weight), bias, lora_A, lora_diag, lora_B, float(scaling), p,
                                seed)
    if backend in INLINE_BACKENDS:
        return kernel("linear_forward", backend)(x2d, weight, bias, lora_A, lora_diag, lora_B, float(scaling), p,
                                                 seed)
    return _linear_forward_op(backend, x2d, weight, bias, lora_A, lora_diag, lora_B, float(scaling), p, seed)


# ----------------------------------------------------------------------------------------------------------------
# linear_backward


@torch.library.custom_op("kasa_kernels::linear_backward", mutates_args=())
def _linear_backward_op(backend: str, grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor,
                        lora_diag: Tensor, lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float,
                        seed: Optional[Tensor], need_dx: bool, need_da: bool, need_dd: bool,
                        need_db: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    needs = (need_dx, need_da, need_dd, need_db)
    grads = kernel("linear_backward", backend)(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling,
                                               dropout_p, seed, needs)
    return tuple(_empty_like_none(g, x2d) for g in grads)


@_linear_backward_op.register_fake
def _(backend, grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling, dropout_p, seed,
      need_dx, need_da, need_dd, need_db):
    m, k = x2d.shape
    n, r = weight.shape[0], lora_A.shape[0]
    f32 = torch.float32
    return (
        x2d.new_empty((m, k)) if need_dx else x2d.new_empty((0,), dtype=f32),
        x2d.new_empty((r, k) if need_da else (0,), dtype=f32),
        x2d.new_empty((r,) if need_dd else (0,), dtype=f32),
        x2d.new_empty((n, r) if need_db else (0,), dtype=f32),
    )


def linear_backward(backend: str, grad_y: Tensor, x2d: Tensor, weight: Tensor, lora_A: Tensor, lora_diag: Tensor,
                    lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                    needs: Tuple[bool, bool, bool, bool]):
    """(dx, dA, dd, dB) of linear_forward, None where `needs` says a gradient is not wanted."""
    needs = (bool(needs[0]), bool(needs[1]), bool(needs[2]), bool(needs[3]))
    p, seed = _dropout_args(dropout_p, seed)
    if isinstance(weight, QuantizedWeight):
        return _qlinear_backward(backend, grad_y, x2d, _decoded(weight), lora_A, lora_diag, lora_B, h, float(scaling),
                                 p, seed, needs)
    if backend in INLINE_BACKENDS:
        return kernel("linear_backward", backend)(grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, float(scaling),
                                                  p, seed, needs)
    grads = _linear_backward_op(backend, grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, float(scaling), p, seed,
                                *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))


# ----------------------------------------------------------------------------------------------------------------
# regularizer


@torch.library.custom_op("kasa_kernels::regularizer", mutates_args=())
def _regularizer_op(backend: str, lora_As: List[Tensor], lora_Bs: List[Tensor], lora_diags: List[Tensor],
                    beta: float, gamma: float, official: bool) -> Tuple[Tensor, Tensor]:
    return kernel("regularizer", backend)(lora_As, lora_Bs, lora_diags, beta, gamma, official)


@_regularizer_op.register_fake
def _(backend, lora_As, lora_Bs, lora_diags, beta, gamma, official):
    total = sum(t.numel() for t in (*lora_As, *lora_Bs, *lora_diags))
    return lora_As[0].new_empty((), dtype=torch.float32), lora_As[0].new_empty((total,), dtype=torch.float32)


def split_flat(flat: Tensor, params: Sequence[Tensor]) -> List[Tensor]:
    """Views of `flat` shaped like each of `params`, in order (the opaque regularizer kernels' layout)."""
    out, off = [], 0
    for t in params:
        out.append(flat[off:off + t.numel()].view(t.shape))
        off += t.numel()
    return out


def regularizer(backend: str, lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor], lora_diags: Sequence[Tensor],
                beta: float, gamma: float, form: str) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """Loss (0-dim) and the gradients w.r.t. every A, B and d, for layers l = 0..L-1 (docs/math.md)."""
    if form not in ("paper", "official"):
        raise ValueError(f"form: expected 'paper' or 'official', got {form!r}")
    As, Bs, ds = list(lora_As), list(lora_Bs), list(lora_diags)
    official = form == "official"
    if backend in INLINE_BACKENDS:
        return kernel("regularizer", backend)(As, Bs, ds, float(beta), float(gamma), official)
    loss, flat = _regularizer_op(backend, As, Bs, ds, float(beta), float(gamma), official)
    grads = split_flat(flat, As + Bs + ds)
    n = len(As)
    return loss, grads[:n], grads[n:2 * n], grads[2 * n:]


# ----------------------------------------------------------------------------------------------------------------
# base_gemm (benchmarks: a fused backend's GEMM with the adapter switched off, against cuBLAS)


@torch.library.custom_op("kasa_kernels::base_gemm", mutates_args=())
def _base_gemm_op(backend: str, x2d: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return kernel("base_gemm", backend)(x2d, weight, bias)


@_base_gemm_op.register_fake
def _(backend, x2d, weight, bias):
    return x2d.new_empty((x2d.shape[0], weight.shape[0]))


def base_gemm(backend: str, x2d: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x W^T + b through `backend`'s fused GEMM kernel with the rank-r term switched off."""
    if backend in INLINE_BACKENDS:
        return kernel("base_gemm", backend)(x2d, weight, bias)
    return _base_gemm_op(backend, x2d, weight, bias)


# ----------------------------------------------------------------------------------------------------------------
# qlinear_forward, qlinear_backward: the linear ops with a quantized W (ops/quant_weight.py). The kernels get a
# QuantizedWeight whose scales are decoded (fp32, never nested: block_scales runs here, at every call, in torch) and
# compute with W = dequantize(weight, x's dtype), exactly; how they get it (a fused main loop, or dequantizing first)
# is theirs. The custom ops carry the weight as (data, scale, code, kind, blocksize, N).


def _decoded(w: QuantizedWeight) -> QuantizedWeight:
    if not w.nested:
        return w
    return w._replace(scale=block_scales(w), nested_scale=None, nested_code=None, nested_offset=None,
                      nested_blocksize=0)


def _weight_of(q_data, q_scale, q_code, q_kind, q_blocksize, n, k) -> QuantizedWeight:
    return QuantizedWeight(q_data, q_scale, q_code, None, None, None, q_kind, q_blocksize, 0, (n, k))


@torch.library.custom_op("kasa_kernels::qlinear_forward", mutates_args=())
def _qlinear_forward_op(backend: str, x2d: Tensor, q_data: Tensor, q_scale: Tensor, q_code: Optional[Tensor],
                        q_kind: str, q_blocksize: int, n: int, bias: Optional[Tensor], lora_A: Tensor,
                        lora_diag: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
                        seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    w = _weight_of(q_data, q_scale, q_code, q_kind, q_blocksize, n, x2d.shape[1])
    return kernel("qlinear_forward", backend)(x2d, w, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed)


@_qlinear_forward_op.register_fake
def _(backend, x2d, q_data, q_scale, q_code, q_kind, q_blocksize, n, bias, lora_A, lora_diag, lora_B, scaling,
      dropout_p, seed):
    m = x2d.shape[0]
    return x2d.new_empty((m, n)), x2d.new_empty((m, lora_A.shape[0]), dtype=torch.float32)


def _qlinear_forward(backend, x2d, w, bias, lora_A, lora_diag, lora_B, scaling, p, seed):
    if backend in INLINE_BACKENDS:
        return kernel("qlinear_forward", backend)(x2d, w, bias, lora_A, lora_diag, lora_B, scaling, p, seed)
    return _qlinear_forward_op(backend, x2d, w.data, w.scale, w.code, w.kind, w.blocksize, w.shape[0], bias, lora_A,
                               lora_diag, lora_B, scaling, p, seed)


@torch.library.custom_op("kasa_kernels::qlinear_backward", mutates_args=())
def _qlinear_backward_op(backend: str, grad_y: Tensor, x2d: Tensor, q_data: Tensor, q_scale: Tensor,
                         q_code: Optional[Tensor], q_kind: str, q_blocksize: int, lora_A: Tensor, lora_diag: Tensor,
                         lora_B: Tensor, h: Tensor, scaling: float, dropout_p: float, seed: Optional[Tensor],
                         need_dx: bool, need_da: bool, need_dd: bool,
                         need_db: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    w = _weight_of(q_data, q_scale, q_code, q_kind, q_blocksize, grad_y.shape[1], x2d.shape[1])
    grads = kernel("qlinear_backward", backend)(grad_y, x2d, w, lora_A, lora_diag, lora_B, h, scaling, dropout_p,
                                                seed, (need_dx, need_da, need_dd, need_db))
    return tuple(_empty_like_none(g, x2d) for g in grads)


@_qlinear_backward_op.register_fake
def _(backend, grad_y, x2d, q_data, q_scale, q_code, q_kind, q_blocksize, lora_A, lora_diag, lora_B, h, scaling,
      dropout_p, seed, need_dx, need_da, need_dd, need_db):
    weight = x2d.new_empty((grad_y.shape[1], x2d.shape[1]))  # only its shape is read
    return _linear_backward_op._abstract_fn(backend, grad_y, x2d, weight, lora_A, lora_diag, lora_B, h, scaling,
                                            dropout_p, seed, need_dx, need_da, need_dd, need_db)


def _qlinear_backward(backend, grad_y, x2d, w, lora_A, lora_diag, lora_B, h, scaling, p, seed, needs):
    if backend in INLINE_BACKENDS:
        return kernel("qlinear_backward", backend)(grad_y, x2d, w, lora_A, lora_diag, lora_B, h, scaling, p, seed,
                                                   needs)
    grads = _qlinear_backward_op(backend, grad_y, x2d, w.data, w.scale, w.code, w.kind, w.blocksize, lora_A,
                                 lora_diag, lora_B, h, scaling, p, seed, *needs)
    return tuple(g if need else None for g, need in zip(grads, needs))
