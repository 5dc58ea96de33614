"""KasaLinear: a drop-in KaSA-adapted linear layer, and inject() to put it into a model.

Parameter names follow PEFT's KaSA layer so checkpoints map one to one: weight and bias (the frozen, SVD-truncated
base), lora_A (r, K), lora_B (N, r) and lora_diag (r,).
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _backend
from ._layers import adapter_entries, group_by, kasa_layers, regularizer_weights
from .autograd import FoldedRegularizer
from .functional import (
    REGULARIZER_FORMS,
    TRUNCATION_MODES,
    check_dropout,
    check_rank,
    kasa_linear,
    kasa_regularizer,
    svd_truncate,
)


def default_adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    # PEFT keeps adapters in fp32 when the base is fp16/bf16 (autocast_adapter_dtype=True, its default).
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D: y = x @ weight + bias with weight stored (in_features, out_features).
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


class KasaLinear(nn.Module):
    """y = x W^T + b + scaling * ((dropout(x) A^T) * lora_diag) B^T with W and b frozen.

    scaling = alpha / r (alpha / sqrt(r) with use_rslora). Adapters are initialized as PEFT does: A kaiming-uniform
    (a = sqrt(5)), B = 0, lora_diag ~ N(0, 1), so a fresh layer equals its base. The constructor initializes W like
    nn.Linear; use from_linear() to start from a pretrained layer, which applies the KaSA SVD truncation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        backend: str = "auto",
        device=None,
        dtype=None,
        use_rslora: bool = False,
        adapter_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        check_rank(r, in_features, out_features)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise TypeError(f"alpha: expected a finite number, got {alpha!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = check_dropout(dropout, "dropout")
        _backend.check_name(backend)
        self.backend = backend
        # how the frozen base was derived from a pretrained layer (from_linear); "none" for a freshly built layer
        self.truncation = "none"
        self.from_conv1d = False
        self.merged = False
        # the FoldedRegularizer handle when fold_regularizer() folded the regularizer into this layer's backward
        self.folded_regularizer = None
        # (beta, gamma) for kasa_regularizer(beta=None, gamma=None): set from a PEFT adapter's kasa_config when
        # loaded by load_peft_adapter; None means KasaConfig's defaults
        self.kasa_regularizer_weights = None
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
        if adapter_dtype is not None and not (isinstance(adapter_dtype, torch.dtype) and adapter_dtype.is_floating_point):
            raise TypeError(f"adapter_dtype: expected a floating-point torch.dtype or None, got {adapter_dtype!r}")
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
        adt = adapter_dtype or default_adapter_dtype(self.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=adt))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=adt))
        self.lora_diag = nn.Parameter(torch.empty(r, device=device, dtype=adt))
        if self.weight.device.type != "meta":
            self._reset_base()
            self.reset_adapter_parameters()

    def _reset_base(self) -> None:
        # nn.Linear's initialization, for layers not built from a pretrained one.
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                nn.init.uniform_(self.bias, -bound, bound)

    def reset_adapter_parameters(self) -> None:
        """PEFT's KaSA init: A ~ U(-1/sqrt(K), 1/sqrt(K)) (kaiming-uniform, a = sqrt(5)), B = 0, d ~ N(0, 1)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)
            nn.init.normal_(self.lora_diag)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        *,
        r: int = 8,
        alpha: float = 16,
        dropout: float = 0.0,
        truncation: str = "peft",
        backend: str = "auto",
        use_rslora: bool = False,
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "KasaLinear":
        """A KasaLinear whose frozen base is `linear`'s weight with its r smallest singular triplets removed
        (truncation "peft" | "official" | "none"; the SVD runs in fp32) and bias copied. Also accepts GPT-2's
        Conv1D, whose transposed weight is stored here in nn.Linear layout, and bitsandbytes' Linear4bit / Linear8bitLt,
        for which it returns a kasa_kernels.quant.QuantKasaLinear (truncate, then re-quantize in the same format)."""
        from .quant import QuantKasaLinear, bnb_kind

        if bnb_kind(linear) is not None:
            return QuantKasaLinear.from_quantized(linear, r=r, alpha=alpha, dropout=dropout, truncation=truncation,
                                                  backend=backend, use_rslora=use_rslora, adapter_dtype=adapter_dtype)
        if isinstance(linear, nn.Linear):
            weight = linear.weight
        elif _is_conv1d(linear):
            weight = linear.weight.t()
        else:
            raise TypeError(f"linear: expected nn.Linear or transformers Conv1D, got {type(linear).__name__}")
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation: expected one of {TRUNCATION_MODES}, got {truncation!r}")
        out_features, in_features = weight.shape
        bias = getattr(linear, "bias", None)
        layer = cls(
            in_features,
            out_features,
            bias=bias is not None,
            r=r,
            alpha=alpha,
            dropout=dropout,
            backend=backend,
            device="meta",
            dtype=weight.dtype,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
        )
        layer.weight = nn.Parameter(svd_truncate(weight, r, truncation).contiguous(), requires_grad=False)
        layer._adopt(bias, weight.device, truncation)
        layer.from_conv1d = not isinstance(linear, nn.Linear)
        return layer

    def _adopt(self, bias: Optional[torch.Tensor], device: torch.device, truncation: str) -> None:
        """The rest of a layer built on "meta" from a pretrained one: its bias copied (frozen), the adapters allocated
        on `device` and initialized, the truncation mode recorded."""
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        for name in ("lora_A", "lora_B", "lora_diag"):
            old = getattr(self, name)
            setattr(self, name, nn.Parameter(torch.empty(old.shape, device=device, dtype=old.dtype)))
        self.reset_adapter_parameters()
        self.truncation = truncation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return kasa_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_diag,
            self.lora_B,
            self.scaling,
            dropout_p=self.dropout,
            training=self.training,
            backend=self.backend,
            folded_regularizer=self.folded_regularizer,
        )

    def delta_weight(self) -> torch.Tensor:
        """s * (B * d) A in fp32, shape (N, K)."""
        b = self.lora_B.detach().float()
        return (b * self.lora_diag.detach().float()) @ self.lora_A.detach().float() * self.scaling

    def merge(self, safe_merge: bool = False) -> None:
        """W <- W + s (B * d) A, computed in fp32 and cast once; forward then is a plain linear layer.

        safe_merge: compute the merged weight first and refuse (ValueError) if it has NaN or inf."""
        if self.merged:
            warnings.warn("KasaLinear.merge: already merged; nothing done", stacklevel=2)
            return
        with torch.no_grad():
            # checked after the cast: a sum finite in fp32 can still overflow an fp16 weight
            merged = (self.weight.float() + self.delta_weight()).to(self.weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError("merge: the merged weight has NaN or inf entries; the adapter was not merged")
            self.weight.copy_(merged)
        self.merged = True

    def unmerge(self) -> None:
        """W <- W - s (B * d) A (fp32, cast once): back to the truncated base weight, up to one rounding in W's
        dtype."""
        if not self.merged:
            warnings.warn("KasaLinear.unmerge: not merged; nothing done", stacklevel=2)
            return
        with torch.no_grad():
            self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
            f"backend={self.backend!r}, merged={self.merged}"
        )


def _matches(name: str, target_modules: Union[str, Iterable[str]]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def inject(
    model: nn.Module,
    target_modules: Union[str, Iterable[str]] = ("q_proj", "v_proj"),
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    truncation: str = "peft",
    backend: str = "auto",
    *,
    use_rslora: bool = False,
    adapter_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Replace every nn.Linear (or GPT-2 Conv1D, or bitsandbytes Linear4bit / Linear8bitLt: a QuantKasaLinear)
    whose qualified name matches by a KasaLinear.from_linear, in place, and leave only the adapters (lora_A, lora_B,
    lora_diag) trainable. Returns the model.

    target_modules: a list of names matched as PEFT does (the full name, or its last dotted components), or one
    string matched as a full regular expression.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules: {target_modules!r} is not a valid regular expression ({e})") from None
    else:
        try:
            target_modules = list(target_modules)
        except TypeError:
            raise TypeError(
                f"target_modules: expected a list of names or a regex string, got {type(target_modules).__name__}"
            ) from None
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            raise ValueError(f"target_modules: expected a non-empty list of names or a regex string, got {target_modules!r}")
    replacements = []
    for name, module in list(model.named_modules()):
        if not name or not _matches(name, target_modules):
            continue
        if isinstance(module, KasaLinear):
            raise ValueError(f"target_modules: {name!r} is already a KasaLinear; inject once per model")
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            continue
        new = KasaLinear.from_linear(
            module,
            r=r,
            alpha=alpha,
            dropout=dropout,
            truncation=truncation,
            backend=backend,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
        )
        new.train(module.training)
        replacements.append((name, new))
    if not replacements:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)]
        raise ValueError(
            f"target_modules: {target_modules!r} matched no nn.Linear in the model; linear layers include "
            f"{linear_names[:8]}"
        )
    # every replacement was built before the model is touched, so an error above leaves the model as it was
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in kasa_layers(model).values():
        for p in (m.lora_A, m.lora_B, m.lora_diag):
            p.requires_grad_(True)
    return model


def fold_regularizer(
    model: nn.Module,
    beta: Optional[float] = None,
    gamma: Optional[float] = None,
    form: str = "paper",
    enable: bool = True,
    grad_scale: float = 1.0,
) -> Optional[FoldedRegularizer]:
    """Fold the KaSA regularizer's gradient into every KaSA layer's own backward: each layer's backward adds its
    closed-form dR/dA, dR/dd, dR/dB where it writes the adapter gradients, so training needs no separate regularizer
    graph (do NOT also add kasa_regularizer(model) to the loss: that would count it twice).

    Layers: every KasaLinear, and every PEFT KaSA layer patched by kasa_kernels.integrations.peft.patch_peft_model
    (its active adapter; a layer with several active adapters cannot fold each one's term and is refused). beta /
    gamma None take each adapter's weights as kasa_regularizer does (PEFT KasaConfig, else 1e-4 / 1e-3).

    The gradient is added once per backward through a layer, times the handle's grad_scale: set it to the factor the
    loss carries into backward, i.e. a GradScaler's current scale (`handle.set_grad_scale(scaler.get_scale())` before
    each backward) and 1/n for n accumulated micro-batches, exactly as that factor reaches the task gradient. A
    layer called twice in one step gets the term twice. For logging, kasa_regularizer(model, ...) under
    torch.no_grad() gives the value. Fold after moving the model to its device (grad_scale lives there).

    Returns a FoldedRegularizer handle; adapters with different (beta, gamma) get one handle each, all sharing one
    grad_scale tensor, so set_grad_scale on the returned handle scales them all. enable=False removes the folding
    and returns None.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if form not in REGULARIZER_FORMS:
        raise ValueError(f"form: expected one of {REGULARIZER_FORMS}, got {form!r}")
    entries = adapter_entries(model)
    if not entries:
        raise ValueError("model: found no KaSA layers to fold the regularizer into (KasaLinear, or PEFT KaSA layers)")
    if not enable:
        for m in model.modules():
            if isinstance(m, KasaLinear):
                m.folded_regularizer = None
            elif hasattr(m, "kasa_folded"):
                m.kasa_folded = {}
        return None
    for e in entries:
        if e.adapter is None and not isinstance(e.module, KasaLinear):
            raise ValueError(f"model: cannot fold the regularizer into a {type(e.module).__name__}; only KasaLinear "
                             "and patched PEFT KaSA layers fold it")
        if e.adapter is not None and not getattr(e.module, "kasa_fused_forward", False):
            raise ValueError("model: has PEFT KaSA layers that run PEFT's own forward, which cannot fold the "
                             "regularizer; call kasa_kernels.integrations.peft.patch_peft_model(model) first")
    per_layer = group_by(entries, [id(e.module) for e in entries])
    several = [type(es[0].module).__name__ + f" with adapters {[e.adapter for e in es]}" for es in per_layer.values()
               if len(es) > 1]
    if several:
        raise ValueError(f"model: a layer has several active KaSA adapters ({several[0]}); fused, they form one layer "
                         "whose regularizer is not the sum of theirs, so it cannot be folded; activate one adapter "
                         "per layer, or add kasa_regularizer(model) to the loss instead")
    kasa_regularizer(model, beta=beta, gamma=gamma, form=form)  # validates beta, gamma and the adapters
    if isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not math.isfinite(grad_scale):
        raise TypeError(f"grad_scale: expected a finite float, got {grad_scale!r}")
    shared_scale = torch.tensor(float(grad_scale), dtype=torch.float32, device=entries[0].lora_A.device)
    layer_scale = 1.0 / len(entries) if form == "official" else 1.0
    handles = {}
    for e, (b, g) in zip(entries, regularizer_weights(entries, model, beta, gamma)):
        key = (float(b), float(g))
        if key not in handles:
            handles[key] = FoldedRegularizer(key[0], key[1], form, layer_scale, shared_scale)
        if e.adapter is None:
            e.module.folded_regularizer = handles[key]
        else:
            e.module.kasa_folded = {e.adapter: handles[key]}
    return next(iter(handles.values()))


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every KasaLinear of `model` by a plain layer holding its merged weight W_truncated + s (B * d) A
    (computed in fp32, cast once to the weight's dtype, as merge()): nn.Linear, or transformers' Conv1D for a layer
    built from one. In place; returns the model, which no longer needs kasa_kernels (save_pretrained writes a plain
    transformers checkpoint)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    replacements = []
    for name, m in list(model.named_modules()):
        if not isinstance(m, KasaLinear):
            continue
        if m.weight is None:
            raise ValueError(f"model: {name!r} has a quantized base ({type(m).__name__}); merging would quantize the "
                             "adapter away, so merge_and_unload refuses it (keep the adapter separate)")
        with torch.no_grad():
            merged = m.weight if m.merged else (m.weight.float() + m.delta_weight()).to(m.weight.dtype)
            if m.from_conv1d:
                from transformers.pytorch_utils import Conv1D

                plain = Conv1D(m.out_features, m.in_features)
                plain.weight = nn.Parameter(merged.t().contiguous(), requires_grad=False)
            else:
                plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
                plain.weight = nn.Parameter(merged.detach().clone(), requires_grad=False)
            if m.bias is not None:
                plain.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        plain.train(m.training)
        replacements.append((name, plain))
    if not replacements:
        raise ValueError("model: found no KasaLinear layer to merge")
    for name, plain in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, plain)
    return model
