"""Functional entry points: validate once at the boundary, pick a backend, call the autograd layer.

kasa_linear(x, W, b, A, d, B, s) = x W^T + b + s ((dropout(x) A^T) * d) B^T     (docs/math.md, "Forward")
kasa_regularizer(model)          = sum_l beta_l ||d||^2 + gamma_l (||B^T B - I|| + ||A A^T - I||) ("Regularizer")
svd_truncate(W, r)               = W without its r smallest singular triplets   ("Initialization")
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _backend
from ._layers import adapter_entries, check_adapter_names, group_by, module_roots, regularizer_weights
from .autograd import (FoldedRegularizer, KasaLinearFunction, autocast_inputs, autocasting, kasa_linear_autograd,
                       kasa_regularizer_autograd)
from .ops.quant_weight import QuantizedWeight
from .ops.quant_weight import check as check_quantized
from .ops.rng import make_seed

_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TORCH_ONLY_DTYPES = (torch.float64,)
TRUNCATION_MODES = ("peft", "official", "none")
REGULARIZER_FORMS = ("paper", "official")


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"


def _require_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def check_rank(r, in_features: int, out_features: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r: expected an int, got {type(r).__name__}")
    k = min(in_features, out_features)
    if r <= 0 or r >= k:
        raise ValueError(
            f"r: expected 1 <= r < min(in_features, out_features) = {k} "
            f"(in_features={in_features}, out_features={out_features}), got r={r}"
        )


def check_dropout(p, name: str = "dropout_p") -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(p).__name__}")
    p = float(p)
    if not (0.0 <= p < 1.0):
        raise ValueError(f"{name}: expected a float in [0, 1), got {p}")
    return p


def _linear_args_ok(x, weight, bias, lora_A, lora_diag, lora_B, scaling, backend_name: str) -> bool:
    """True when every check of _check_linear_args passes for a tensor weight and a Python float scaling, in one
    expression: a small layer's call is short enough on CPU for the checks' steps to show. False sends the call
    through _check_linear_args, which finds the argument to name (or accepts what this leaves to it). Traceable:
    under torch.compile(dynamic=True) scaling is symbolic, and the finiteness test is a comparison (math.isfinite
    would break the graph)."""
    T = torch.Tensor
    if not (type(scaling) is float and isinstance(x, T) and isinstance(weight, T) and isinstance(lora_A, T)
            and isinstance(lora_diag, T) and isinstance(lora_B, T) and (bias is None or isinstance(bias, T))):
        return False
    dtype, device = x.dtype, x.device
    if weight.dim() != 2 or lora_A.dim() != 2 or x.dim() < 1:
        return False
    n, k = weight.shape
    r = lora_A.shape[0]
    return (x.shape[-1] == k and lora_A.shape[1] == k and r >= 1 and lora_diag.shape == (r,)
            and lora_B.shape == (n, r) and (bias is None or (bias.shape == (n,) and bias.dtype == dtype
                                                              and bias.device == device and not bias.requires_grad))
            and (dtype in _ACT_DTYPES or (dtype in _TORCH_ONLY_DTYPES and backend_name == "torch"))
            and weight.dtype == dtype and lora_A.dtype in (dtype, torch.float32)
            and lora_diag.dtype in (dtype, torch.float32) and lora_B.dtype in (dtype, torch.float32)
            and weight.device == device and lora_A.device == device and lora_diag.device == device
            and lora_B.device == device and not weight.requires_grad and -math.inf < scaling < math.inf)


def _check_linear_args(x, weight, bias, lora_A, lora_diag, lora_B, scaling, backend_name: str) -> None:
    """Every check of the arguments, raising with the argument's name (kasa_linear runs it where _linear_args_ok
    does not pass: a quantized base, a symbolic scaling, or an error to name)."""
    quantized = isinstance(weight, QuantizedWeight)
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_diag", lora_diag), ("lora_B", lora_B)):
        _require_tensor(name, t)
    if not quantized:
        _require_tensor("weight", weight)
    if bias is not None:
        _require_tensor("bias", bias)
    if quantized:
        check_quantized(weight, x.device)
    elif weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got {_describe(weight)}")
    n, k = weight.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"x: expected last dim = in_features = {k} (from weight {tuple(weight.shape)}), got {_describe(x)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != k:
        raise ValueError(f"lora_A: expected (r, {k}), got {_describe(lora_A)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A: expected r >= 1 rows, got {_describe(lora_A)}")
    if lora_diag.shape != (r,):
        raise ValueError(f"lora_diag: expected ({r},) to match lora_A {tuple(lora_A.shape)}, got {_describe(lora_diag)}")
    if lora_B.shape != (n, r):
        raise ValueError(f"lora_B: expected ({n}, {r}) from weight and lora_A, got {_describe(lora_B)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias: expected ({n},), got {_describe(bias)}")
    dtype, device = x.dtype, x.device
    if dtype not in _ACT_DTYPES and not (backend_name == "torch" and dtype in _TORCH_ONLY_DTYPES):
        allowed = _ACT_DTYPES + (_TORCH_ONLY_DTYPES if backend_name == "torch" else ())
        raise TypeError(f"x: expected dtype in {[str(d) for d in allowed]} for backend {backend_name!r}, got {_describe(x)}")
    if not quantized and weight.dtype != dtype:
        raise TypeError(f"weight: expected x's dtype {dtype}, got {_describe(weight)}")
    if bias is not None and bias.dtype != dtype:
        raise TypeError(f"bias: expected x's dtype {dtype}, got {_describe(bias)}")
    for name, t in (("lora_A", lora_A), ("lora_diag", lora_diag), ("lora_B", lora_B)):
        if t.dtype not in (dtype, torch.float32):
            raise TypeError(f"{name}: expected x's dtype {dtype} or torch.float32, got {_describe(t)}")
    base = (("bias", bias),) if quantized else (("weight", weight), ("bias", bias))
    for name, t in base + (("lora_A", lora_A), ("lora_diag", lora_diag), ("lora_B", lora_B)):
        if t is not None and t.device != device:
            raise ValueError(f"{name}: expected x's device {device}, got {_describe(t)}")
    weight_trains = not quantized and weight.requires_grad
    if torch.is_grad_enabled() and (weight_trains or (bias is not None and bias.requires_grad)):
        name = "weight" if weight_trains else "bias"
        raise ValueError(
            f"{name}: the base layer is frozen in KaSA and gets no gradient, but {name}.requires_grad is True; "
            f"call {name}.requires_grad_(False) (inject() and KasaLinear do this)"
        )
    # Under torch.compile(dynamic=True) a module's float attribute arrives as a SymFloat, which math.isfinite would
    # turn into a graph break; it was checked when the module was built.
    if (
        isinstance(scaling, (bool, torch.Tensor))
        or not isinstance(scaling, (int, float, torch.SymFloat))
        or (not torch.compiler.is_compiling() and not math.isfinite(scaling))
    ):
        raise TypeError(f"scaling: expected a finite Python float, got {scaling!r}")


def kasa_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_diag: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    training: bool = True,
    backend: str = "auto",
    *,
    dropout_seed: Union[None, int, torch.Tensor] = None,
    folded_regularizer: Optional[FoldedRegularizer] = None,
) -> torch.Tensor:
    """y = x W^T + b + scaling * ((dropout(x) A^T) * d) B^T, with W and b frozen.

    x: (..., K), any strides; weight (N, K), or a quantized base (ops/quant_weight.QuantizedWeight: bitsandbytes'
    nf4 / fp4 / int8 formats, dequantized by the kernels in x's dtype at each call); bias (N,) or None;
    lora_A (r, K); lora_diag (r,); lora_B (N, r).
    x, bias and a tensor weight share one dtype (fp32, fp16 or bf16; fp64 on the torch backend); the adapters are in
    that dtype or fp32. Dropout (inverted, on the adapter input only) applies when training and dropout_p > 0; its mask
    is a hash of dropout_seed (drawn from torch's generator when None) and the element index, the same on every
    backend. Returns (..., N) in x's dtype.

    folded_regularizer: a FoldedRegularizer (from fold_regularizer) whose gradient of this layer's regularizer term
    backward adds to the adapter gradients; None for none.
    """
    # (the common cases take no helper call: a small layer's call on CPU is short enough for each one to show)
    if not isinstance(x, torch.Tensor):
        _require_tensor("x", x)
    device = x.device
    name = _backend.resolve(backend, device)
    autocast = torch._C._is_any_autocast_enabled() and autocasting(device.type)
    if autocast:  # passes anything not a tensor through, for the checks below
        x, weight, bias = autocast_inputs(x, weight, bias)
    if not _linear_args_ok(x, weight, bias, lora_A, lora_diag, lora_B, scaling, name):
        _check_linear_args(x, weight, bias, lora_A, lora_diag, lora_B, scaling, name)
    p = dropout_p if type(dropout_p) is float and 0.0 <= dropout_p < 1.0 else check_dropout(dropout_p)
    if not training:
        p = 0.0
    if folded_regularizer is not None and not isinstance(folded_regularizer, FoldedRegularizer):
        raise TypeError(
            f"folded_regularizer: expected None or a FoldedRegularizer from fold_regularizer(), "
            f"got {type(folded_regularizer).__name__}"
        )
    # a given seed is validated even when no dropout uses it
    seed = make_seed(dropout_seed, x.device) if (p > 0.0 or dropout_seed is not None) else None
    if p == 0.0:
        seed = None
    if folded_regularizer is None and not autocast:  # kasa_linear_autograd's common case, one call nearer
        return KasaLinearFunction.apply(x, weight, bias, lora_A, lora_diag, lora_B, seed, float(scaling), p, name,
                                        None, None)
    return kasa_linear_autograd(
        x, weight, bias, lora_A, lora_diag, lora_B, seed, float(scaling), p, name, folded_regularizer, autocast
    )


# ----------------------------------------------------------------------------------------------------------------
# Regularizer


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 keeps parameters sharded as DTensors outside forward, and the Grams need whole factors: full_tensor()
    # all-gathers differentiably, and its backward hands each rank the gradient of its own shard (every rank computes
    # the same loss, so nothing more is reduced). Every rank must call the regularizer, as with any collective.
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_weight(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
        raise TypeError(f"{name}: expected None or a finite float, got {v!r}")


def kasa_regularizer(
    model_or_modules,
    beta: Optional[float] = None,
    gamma: Optional[float] = None,
    form: str = "paper",
    backend: str = "auto",
    *,
    adapter_names: Union[None, str, Sequence[str]] = None,
) -> torch.Tensor:
    """The KaSA regularizer over every adapted layer, as a 0-dim fp32 tensor with closed-form gradients.

    form "paper" (PEFT's _get_kasa_loss): sum_l beta_l ||d||^2 + gamma_l (||B^T B - I_r||_F + ||A A^T - I_r||_F).
    form "official" (the official trainer): the K x K / N x N Gram norms, averaged over the L layers, computed
    through the exact r x r identity of docs/math.md.

    beta / gamma None: each PEFT adapter's own KasaConfig values (as _get_kasa_loss), a KasaLinear's
    `kasa_regularizer_weights` (set when loaded from a PEFT adapter), else KasaConfig's defaults 1e-4 / 1e-3.
    adapter_names: the PEFT adapters to include (None: each layer's active adapters), as _get_kasa_loss.
    A model without KaSA layers (or adapters) gives 0, as PEFT does.
    """
    if form not in REGULARIZER_FORMS:
        raise ValueError(f"form: expected one of {REGULARIZER_FORMS}, got {form!r}")
    _check_weight("beta", beta)
    _check_weight("gamma", gamma)
    adapter_names = check_adapter_names(adapter_names)
    roots = module_roots(model_or_modules)  # a one-shot iterable is read once
    entries = adapter_entries(roots, adapter_names)
    if not entries:
        _backend.check_name(backend)
        first = next((p for m in roots for p in m.parameters()), None)
        return torch.zeros((), dtype=torch.float32, device=None if first is None else first.device)
    layers = [tuple(_full_tensor(t) for t in (e.lora_A, e.lora_B, e.lora_diag)) for e in entries]
    device = layers[0][0].device
    for i, (a, b, d) in enumerate(layers):
        r, k = a.shape
        if b.dim() != 2 or b.shape[1] != r or d.shape != (r,):
            raise ValueError(
                f"layer {i}: inconsistent adapter shapes lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, "
                f"lora_diag {tuple(d.shape)}"
            )
        for t in (a, b, d):
            if t.device != device:
                raise ValueError(f"layer {i}: expected every adapter on {device}, got {t.device}")
    name = _backend.resolve(backend, device)
    allowed = _ACT_DTYPES + (_TORCH_ONLY_DTYPES if name == "torch" else ())
    for i, layer in enumerate(layers):
        for pname, t in zip(("lora_A", "lora_B", "lora_diag"), layer):
            if t.dtype not in allowed:
                raise TypeError(f"layer {i}: {pname}: expected dtype in {[str(d) for d in allowed]} for backend "
                                f"{name!r}, got {_describe(t)}")
    weights = regularizer_weights(entries, roots, beta, gamma)
    groups = group_by(layers, [(float(b), float(g)) for b, g in weights])
    total = None
    for (b, g), group in groups.items():
        a_s, b_s, d_s = (list(t) for t in zip(*group))
        loss = kasa_regularizer_autograd(a_s, b_s, d_s, b, g, form, name)
        if form == "official" and len(groups) > 1:
            loss = loss * (len(group) / len(layers))  # each group's op averages over its own layers, not all L
        total = loss if total is None else total + loss
    return total


# ----------------------------------------------------------------------------------------------------------------
# SVD truncation


def kept_singular_triplets(out_features: int, in_features: int, r: int, mode: str) -> int:
    """How many singular triplets of an (out_features, in_features) weight svd_truncate keeps: min(N, K) - r for
    "peft", min(min(N, K), K - r) for "official", all min(N, K) for "none"."""
    k = min(out_features, in_features)
    return {"peft": k - r, "official": min(k, in_features - r), "none": k}[mode]


def svd_truncate(weight: torch.Tensor, r: int, mode: str = "peft") -> torch.Tensor:
    """W (N, K) without its r smallest singular triplets, computed in fp32 and returned in W's dtype (a new tensor).

    mode "peft" keeps min(N, K) - r triplets (PEFT); "official" keeps K - r (the official code; for K > N it keeps
    min(N, K) triplets, i.e. truncates nothing unless r > K - N); "none" returns a copy of W.
    """
    _require_tensor("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got {_describe(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor, got {_describe(weight)}")
    if mode not in TRUNCATION_MODES:
        raise ValueError(f"mode: expected one of {TRUNCATION_MODES}, got {mode!r}")
    n, k_in = weight.shape
    check_rank(r, k_in, n)
    with torch.no_grad():
        if mode == "none":
            return weight.detach().clone()
        keep = kept_singular_triplets(n, k_in, r, mode)
        w32 = weight.detach().to(torch.float32)
        u, s, vh = torch.linalg.svd(w32, full_matrices=False)
        out = (u[:, :keep] * s[:keep]) @ vh[:keep, :]
        return out.to(weight.dtype)
