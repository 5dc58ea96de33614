"""The autograd.Functions: the one place that owns saved tensors and the dtype/autocast policy.

Policy:
- Under autocast, x, W and b are cast to the autocast dtype, as F.linear would; the adapters keep their dtype
  (fp32 adapters beside bf16/fp16 activations are the PEFT default). The op itself then runs with autocast off.
- The output is in x's dtype; every gradient is returned in its parameter's dtype.
- Saved for backward: x as the caller passed it (no reshaped copy), the parameters, H (M x r: fp32 from the fused
  backends, the rank-r operand dtype from the torch backend, bf16 for bf16 layers where GEMMs in it are native) and
  the dropout seed. Nothing of size M x N or M x K. A quantized base W (ops/quant_weight.QuantizedWeight) is saved
  as its packed tensors: no dequantized copy is kept.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import torch

from .ops import defs
from .ops.quant_weight import QuantizedWeight


def _cast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class KasaLinearFunction(torch.autograd.Function):
    # A 2-D x (or output gradient) is used as it is, not through a view op: on a CPU a small layer's call is mostly
    # host time, and each aten call shows in it (as does each step between this layer and the kernel: on an inline
    # backend the kernel is called directly, see defs.inline_kernel).
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_diag, lora_B, seed, scaling, dropout_p, backend, folded_reg,
                folded_grad_scale):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        quantized = isinstance(weight, QuantizedWeight)
        fwd = None if quantized else defs.INLINE["linear_forward"].get(backend)  # defs.inline_kernel
        if fwd is not None:
            y2d, h = fwd(x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p, seed)
        else:
            y2d, h = defs.linear_forward(backend, x2d, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p,
                                         seed)
        # a quantized W is saved as its packed tensors (the format on ctx): never a dequantized copy
        ctx.quant_format = weight.without_tensors() if quantized else None
        weights = weight.tensors() if quantized else (weight,)
        # x itself, not x2d: where reshape had to copy (a strided 3-D x), saving x2d would keep an M x K copy
        ctx.save_for_backward(x, lora_A, lora_diag, lora_B, h, seed, folded_grad_scale, *weights)
        ctx.scaling = scaling
        ctx.dropout_p = dropout_p
        ctx.backend = backend
        ctx.folded_reg = folded_reg
        return y2d if x2d is x else y2d.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_A, lora_diag, lora_B, h, seed, folded_grad_scale, *weights = ctx.saved_tensors
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        quant = ctx.quant_format
        weight = weights[0] if quant is None else quant.with_tensors(weights)
        need = ctx.needs_input_grad
        needs = (need[0], need[3], need[4], need[5])
        g = grad_y if grad_y.dim() == 2 else grad_y.reshape(-1, grad_y.shape[-1])
        bwd = None if quant is not None else defs.INLINE["linear_backward"].get(ctx.backend)  # defs.inline_kernel
        args = (g, x2d, weight, lora_A, lora_diag, lora_B, h, ctx.scaling, ctx.dropout_p, seed, needs)
        if bwd is None:
            bwd = functools.partial(defs.linear_backward, ctx.backend)
        # a backward called inside an autocast block runs with autocast on; the op runs with it off, as forward does
        if torch._C._is_any_autocast_enabled() and autocasting(grad_y.device.type):
            with torch.autocast(grad_y.device.type, enabled=False):
                dx, da, dd, db = bwd(*args)
        else:
            dx, da, dd, db = bwd(*args)
        if dx is not None:
            if x2d is not x:
                dx = dx.view(x.shape)
            if dx.dtype != x.dtype:
                dx = dx.to(x.dtype)
        if ctx.folded_reg is not None and any(needs[1:]):
            da, dd, db = _add_folded_regularizer(
                ctx.folded_reg, folded_grad_scale, ctx.backend, lora_A, lora_diag, lora_B, da, dd, db
            )
        if da is not None and da.dtype != lora_A.dtype:
            da = da.to(lora_A.dtype)
        if dd is not None and dd.dtype != lora_diag.dtype:
            dd = dd.to(lora_diag.dtype)
        if db is not None and db.dtype != lora_B.dtype:
            db = db.to(lora_B.dtype)
        return dx, None, None, da, dd, db, None, None, None, None, None, None


@dataclasses.dataclass
class FoldedRegularizer:
    """The regularizer folded into each layer's backward (see kasa_kernels.fold_regularizer).

    beta, gamma, form: as kasa_regularizer. layer_scale: 1/L for the official form (L = layers in the model), else 1.
    grad_scale: a 0-dim fp32 tensor on the adapters' device holding the factor the training loop puts on the loss
    before backward (a GradScaler's scale, 1/accumulation steps); backward multiplies the regularizer gradient by it,
    as autograd does for the task gradient. A tensor, so updating it (set_grad_scale) neither recompiles nor syncs.
    """

    beta: float
    gamma: float
    form: str
    layer_scale: float
    grad_scale: torch.Tensor

    def set_grad_scale(self, value: float) -> None:
        self.grad_scale.fill_(float(value))


def _add_folded_regularizer(folded_reg, grad_scale, backend, lora_A, lora_diag, lora_B, da, dd, db):
    """Add this layer's closed-form regularizer gradient (docs/math.md) to the gradients its backward writes, so a
    model trained with fold_regularizer() needs no separate regularizer graph. folded_reg = (beta, gamma, form,
    layer_scale); grad_scale is FoldedRegularizer.grad_scale."""
    beta, gamma, form, layer_scale = folded_reg
    _, (ga,), (gb,), (gd,) = defs.regularizer(backend, [lora_A], [lora_B], [lora_diag], beta, gamma, form)
    # the op's official form averages over the one layer it was given; the model-wide 1/L is layer_scale
    scale = grad_scale * layer_scale
    da = None if da is None else da + (scale * ga).to(da.dtype)
    dd = None if dd is None else dd + (scale * gd).to(dd.dtype)
    db = None if db is None else db + (scale * gb).to(db.dtype)
    return da, dd, db


def autocasting(device_type: str) -> bool:
    # torch._C._is_any_autocast_enabled answers for every device type at once, in one call (dynamo folds it to a
    # constant as it does is_autocast_enabled); the callers on the hot path ask it before reading a device type.
    # Devices without autocast (meta, ...) make is_autocast_enabled raise, so eager code asks first. Dynamo in
    # torch 2.11 (the GPU machines' torch) cannot trace is_autocast_available: a graph break under fullgraph=True.
    # A traced device is a real one (cuda, cpu, ...), and all of those have autocast.
    if not torch._C._is_any_autocast_enabled():
        return False
    if device_type in _AUTOCAST_DEVICES or torch.compiler.is_compiling():
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_inputs(x, weight, bias):
    """Under autocast, cast x, W and b as F.linear would (floating tensors other than fp64 go to the autocast
    dtype); otherwise return them unchanged. The adapters are left alone: fp32 adapters are the PEFT default."""
    if not autocasting(x.device.type):
        return x, weight, bias
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        # a QuantizedWeight is not cast: the kernels dequantize it in x's (by then the autocast) dtype
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == torch.float64:
            return t
        return _cast(t, dtype)

    return cast(x), cast(weight), cast(bias)


def kasa_linear_autograd(
    x, weight, bias, lora_A, lora_diag, lora_B, seed, scaling, dropout_p, backend,
    folded: Optional[FoldedRegularizer] = None, autocast: Optional[bool] = None,
):
    """Apply KasaLinearFunction (inputs already validated and passed through autocast_inputs) with autocast off
    inside, so the op's own dtype policy holds. autocast: whether autocast is on for x's device, when the caller has
    already asked (None: ask)."""
    # the constants travel as a tuple, the grad-scale tensor as an input of its own (traceable by torch.compile)
    consts = None if folded is None else (folded.beta, folded.gamma, folded.form, folded.layer_scale)
    grad_scale = None if folded is None else folded.grad_scale
    args = (x, weight, bias, lora_A, lora_diag, lora_B, seed, scaling, dropout_p, backend, consts, grad_scale)
    device_type = x.device.type
    if autocasting(device_type) if autocast is None else autocast:
        with torch.autocast(device_type, enabled=False):
            return KasaLinearFunction.apply(*args)
    return KasaLinearFunction.apply(*args)


class KasaRegularizerFunction(torch.autograd.Function):
    """Loss of all layers in one call; backward scales the closed-form gradients saved by forward."""

    @staticmethod
    def forward(ctx, beta, gamma, form, backend, n_layers, *params):
        a_s = params[:n_layers]
        b_s = params[n_layers : 2 * n_layers]
        d_s = params[2 * n_layers :]
        loss, ga, gb, gd = defs.regularizer(backend, a_s, b_s, d_s, beta, gamma, form)
        grads = [_cast(g, p.dtype) for g, p in zip(list(ga) + list(gb) + list(gd), params)]
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return (None,) * 5 + tuple(g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)


def kasa_regularizer_autograd(
    lora_As: Sequence[torch.Tensor],
    lora_Bs: Sequence[torch.Tensor],
    lora_diags: Sequence[torch.Tensor],
    beta: float,
    gamma: float,
    form: str,
    backend: str,
) -> torch.Tensor:
    return KasaRegularizerFunction.apply(beta, gamma, form, backend, len(lora_As), *lora_As, *lora_Bs, *lora_diags)
