"""PEFT integration: run PEFT's KaSA layers through kasa_kernels, and move KaSA checkpoints between the two.

    from kasa_kernels.integrations import peft as kk_peft

    kk_peft.patch_peft_model(peft_model, backend="auto")   # KaSA LoRA layers now call kasa_kernels.kasa_linear
    kk_peft.unpatch_peft_model(peft_model)                 # back to PEFT's own forward

    kk_peft.save_peft_adapter(kk_model, "adapter/")        # a kasa_kernels.inject model -> PEFT adapter files
    kk_model = kk_peft.load_peft_adapter(base_model, "adapter/")   # PEFT adapter files -> KasaLinear layers

Patching swaps the class of each `peft.tuners.lora.layer.Linear` for a subclass whose forward computes
x W^T + b + s ((dropout(x) A^T) * d) B^T in one `kasa_linear` call (base GEMM included) from PEFT's own parameters
(base_layer.weight / .bias, lora_A[name].weight, lora_diag[name], lora_B[name].weight, scaling[name], the
lora_dropout[name] p). No parameter is moved, copied or renamed, so state dicts and `save_pretrained` output are
unchanged. Whenever a call is outside what the fused op computes, the layer runs PEFT's forward instead:
merged or disabled adapters, zero or several active adapters, mixed-batch `adapter_names` (or any other extra
argument), a non-KaSA adapter, a pending (meta-device) KaSA truncation, lora_bias, a base layer that is not a plain
hook-free nn.Linear, a dropout module that is not nn.Dropout / nn.Identity, a trainable base weight, or adapter
dtypes other than the compute dtype or fp32.

Dropout differs from PEFT in one way: the mask comes from kasa_kernels' counter-based hash (one seed drawn from
torch's generator per call), not from nn.Dropout's RNG stream; the distribution is the same, the draws are not.

Checkpoints: both sides truncate the ORIGINAL base weight when the adapter is created (PEFT keeps min(N, K) - r
singular triplets, kasa_kernels' truncation="peft" does the same), so an adapter file is applied to an untouched
base model on either side and gives the same function.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import _backend
from .._layers import kasa_layers, peft_kasa_layers
from ..autograd import autocasting
from ..functional import kasa_linear
from ..modules import KasaLinear, _is_conv1d, inject

try:
    from peft.tuners.lora.layer import Linear as _PeftLoraLinear
    from peft.tuners.lora.variants import KasaLinearVariant as _PeftKasaVariant
except ImportError:  # the checkpoint functions below work without peft; patching needs it
    _PeftLoraLinear = None
    _PeftKasaVariant = None

__all__ = [
    "patch_peft_model",
    "unpatch_peft_model",
    "fused_layer_names",
    "save_peft_adapter",
    "load_peft_adapter",
    "kasa_to_peft_state_dict",
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
# PeftModel -> LoraModel (.base_model) -> the wrapped model (.model): every saved key starts with this.
PEFT_KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_diag)$")


def _require_peft() -> None:
    if _PeftLoraLinear is None:
        raise ImportError("kasa_kernels.integrations.peft: patching PEFT layers needs peft>=0.21 (pip install peft)")


# ----------------------------------------------------------------------------------------------------------------
# Running PEFT KaSA layers through kasa_linear


def _adapter_dtype_ok(t: torch.Tensor, compute_dtype: torch.dtype) -> bool:
    return t.dtype == compute_dtype or t.dtype == torch.float32


def _fused_call_args(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """The kasa_linear arguments for this call, or None when PEFT's own forward must run (see module docstring)."""
    if args or any(v is not None for v in kwargs.values()):
        return None  # adapter_names (mixed batch), aLoRA offsets, or base-layer extras: PEFT handles them
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    diag_dict = getattr(layer, "lora_diag", None)
    if diag_dict is None or name not in diag_dict or not isinstance(layer.lora_variant.get(name), _PeftKasaVariant):
        return None
    if name in getattr(layer, "_lora_kasa_truncation_deferred", ()):
        return None  # PEFT applies the deferred SVD truncation on its first forward
    base = layer.base_layer
    if type(base) is not nn.Linear or "forward" in base.__dict__ or base._forward_hooks or base._forward_pre_hooks:
        return None  # quantized / wrapped / hooked (e.g. accelerate offload) base layers
    if layer.fan_in_fan_out:
        return None
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None or lora_B.bias is not None:
        return None
    dropout = layer.lora_dropout[name]
    if type(dropout) is nn.Identity:
        p, training = 0.0, False
    elif type(dropout) is nn.Dropout and not dropout.inplace:
        p, training = float(dropout.p), dropout.training
    else:
        return None
    weight, bias = base.weight, base.bias
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None  # a trainable base is outside KaSA; PEFT's path gives it a gradient
    if autocasting(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute_dtype = x.dtype
        if weight.dtype != x.dtype:
            return None  # PEFT raises its own error (or handles it) here
    diag = diag_dict[name]
    if not all(_adapter_dtype_ok(t, compute_dtype) for t in (lora_A.weight, lora_B.weight, diag)):
        return None  # e.g. bf16 adapters on an fp32 model: PEFT casts x down to the adapter dtype
    # under autocast, kasa_linear casts x, W and b to the autocast dtype itself, as F.linear does
    return (x, weight, bias, lora_A.weight, diag, lora_B.weight, float(layer.scaling[name]), p, training)


if _PeftLoraLinear is not None:

    class KasaFusedLoraLinear(_PeftLoraLinear):
        """A peft lora.Linear whose KaSA forward is one kasa_linear call. Created only by patch_peft_model, which
        swaps the class of existing layers; the parameters and state dict are PEFT's."""

        _kasa_backend: str = "auto"

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            fused = _fused_call_args(self, x, args, kwargs)
            if fused is None:
                return super().forward(x, *args, **kwargs)
            x, weight, bias, a, d, b, scaling, p, training = fused
            return kasa_linear(
                x, weight, bias, a, d, b, scaling, dropout_p=p, training=training, backend=self._kasa_backend
            )

else:  # pragma: no cover
    KasaFusedLoraLinear = None


def patch_peft_model(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every PEFT KaSA LoRA linear layer in `model` run through kasa_kernels.kasa_linear (base GEMM fused).

    Works on a PeftModel, its LoraModel or the wrapped transformers model, in place; returns `model`. Calling it
    again changes the backend. Layers fall back to PEFT's forward call by call where the fused op does not apply
    (module docstring). Undo with unpatch_peft_model. Raises ValueError if the model has no KaSA LoRA layer.
    """
    _require_peft()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    _backend.check_name(backend)
    layers = [m for m in peft_kasa_layers(model).values() if type(m) in (_PeftLoraLinear, KasaFusedLoraLinear)]
    if not layers:
        n_lora = sum(isinstance(m, _PeftLoraLinear) for m in model.modules())
        raise ValueError(
            f"model: found no PEFT KaSA LoRA linear layer (lora.Linear with a lora_diag adapter); it has {n_lora} "
            "PEFT LoRA linear layers. Create the adapter with LoraConfig(kasa_config=KasaConfig(...))."
        )
    for dev in {m.base_layer.weight.device for m in layers if m.base_layer.weight.device.type != "meta"}:
        _backend.resolve(backend, dev)  # fail now, with the reason, if the backend cannot run there
    for m in layers:
        m.__class__ = KasaFusedLoraLinear
        m._kasa_backend = backend
    return model


def unpatch_peft_model(model: nn.Module) -> nn.Module:
    """Undo patch_peft_model: every patched layer runs PEFT's forward again. Returns `model`."""
    _require_peft()
    for m in model.modules():
        if type(m) is KasaFusedLoraLinear:
            m.__class__ = _PeftLoraLinear
            m.__dict__.pop("_kasa_backend", None)
    return model


def fused_layer_names(model: nn.Module) -> List[str]:
    """Qualified names of the layers patch_peft_model has patched."""
    if KasaFusedLoraLinear is None:
        return []
    return [n for n, m in model.named_modules() if type(m) is KasaFusedLoraLinear]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: kasa_kernels model <-> PEFT adapter files


def _kasa_layers(model: nn.Module) -> Dict[str, KasaLinear]:
    layers = {n: m for n, m in kasa_layers(model).items() if isinstance(m, KasaLinear)}
    if not layers:
        raise ValueError("model: found no KasaLinear layer; inject() adapters first")
    return layers


def kasa_to_peft_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The adapter tensors of every KasaLinear under PEFT's saved key names
    (base_model.model.<module>.lora_A.weight, .lora_B.weight, .lora_diag), detached, contiguous, in their dtype."""
    out = {}
    for name, layer in _kasa_layers(model).items():
        prefix = PEFT_KEY_PREFIX + name
        out[prefix + ".lora_A.weight"] = layer.lora_A.detach().contiguous()
        out[prefix + ".lora_B.weight"] = layer.lora_B.detach().contiguous()
        out[prefix + ".lora_diag"] = layer.lora_diag.detach().contiguous()
    return out


def _most_common(values: Iterable):
    return Counter(values).most_common(1)[0][0]


def _target_modules(model: nn.Module, names: List[str]) -> List[str]:
    """The shortest PEFT target_modules list that selects exactly `names` in `model`: the distinct last components
    if they pick no other linear layer, else the full names."""
    leaves = sorted({n.rpartition(".")[2] for n in names})
    chosen = set(names)
    for n, m in model.named_modules():
        if n in chosen or not (isinstance(m, nn.Linear) or _is_conv1d(m)):
            continue
        if n.rpartition(".")[2] in leaves:
            return sorted(names)
    return leaves


def save_peft_adapter(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    *,
    beta: float = 1e-4,
    gamma: float = 1e-3,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> Tuple[str, str]:
    """Write the KasaLinear adapters of `model` as a PEFT KaSA adapter: adapter_model.safetensors with PEFT's key
    names and adapter_config.json (peft_type LORA, kasa_config {beta, gamma}, r / lora_alpha with rank_pattern /
    alpha_pattern for layers that differ). `PeftModel.from_pretrained(original_base_model, save_directory)` then
    rebuilds the same model. beta / gamma only go into kasa_config (the regularizer weights PEFT's _get_kasa_loss
    uses). Returns the two file paths.

    The adapters must have been created with truncation="peft" (PEFT truncates the original base weight that way
    when it loads the adapter). GPT-2's Conv1D layers cannot be loaded by PEFT's KaSA (it refuses fan_in_fan_out).
    """
    from safetensors.torch import save_file

    layers = _kasa_layers(model)
    for name, layer in layers.items():
        mode = getattr(layer, "truncation", "peft")
        if mode != "peft":
            raise ValueError(
                f"{name}: injected with truncation={mode!r}, but PEFT re-truncates the base weight to min(N, K) - r "
                "triplets when it loads an adapter; only truncation='peft' adapters load as the same model in PEFT"
            )
    rslora = {layer.use_rslora for layer in layers.values()}
    dropout = {layer.dropout for layer in layers.values()}
    if len(rslora) > 1 or len(dropout) > 1:
        raise ValueError(
            f"model: PEFT's adapter_config has one use_rslora and one lora_dropout for all layers; the layers have "
            f"use_rslora {sorted(rslora)} and dropout {sorted(dropout)}"
        )
    names = sorted(layers)
    r = _most_common(layers[n].r for n in names)
    alpha = _most_common(layers[n].alpha for n in names)
    # PEFT matches pattern keys with re.match(rf"(.*\.)?({key})$", module_name): an escaped full name is exact.
    rank_pattern = {re.escape(n): layers[n].r for n in names if layers[n].r != r}
    alpha_pattern = {re.escape(n): layers[n].alpha for n in names if layers[n].alpha != alpha}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout.pop(),
        "use_rslora": rslora.pop(),
        "target_modules": _target_modules(model, names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "kasa_config": {"beta": float(beta), "gamma": float(gamma)},
    }
    os.makedirs(save_directory, exist_ok=True)
    weights_path = os.path.join(save_directory, ADAPTER_WEIGHTS_NAME)
    config_path = os.path.join(save_directory, ADAPTER_CONFIG_NAME)
    save_file(kasa_to_peft_state_dict(model), weights_path, metadata={"format": "pt"})
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return weights_path, config_path


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_adapter(path: Union[str, os.PathLike]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    for p in (config_path, weights_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"adapter_path: expected {p} (a PEFT adapter directory)")
    with open(config_path) as f:
        config = json.load(f)
    return config, load_file(weights_path)


def load_peft_adapter(
    model: nn.Module,
    adapter_path: Union[str, os.PathLike],
    *,
    backend: str = "auto",
    adapter_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """Put a PEFT KaSA adapter (a directory written by PeftModel.save_pretrained or save_peft_adapter) into
    `model` as KasaLinear layers, in place, and return it.

    `model` must hold the ORIGINAL base weights (a fresh from_pretrained): every adapted layer is replaced by
    KasaLinear.from_linear(truncation="peft"), which truncates its base weight as PEFT does, then lora_A, lora_B
    and lora_diag are loaded. Ranks come from the tensors, alpha from lora_alpha / alpha_pattern, dropout and
    use_rslora from the config. Only adapter parameters stay trainable (as inject() leaves them).
    """
    config, tensors = _read_adapter(adapter_path)
    if config.get("peft_type") != "LORA" or not config.get("kasa_config"):
        raise ValueError(
            f"adapter_path: {adapter_path} is not a PEFT KaSA adapter (peft_type={config.get('peft_type')!r}, "
            f"kasa_config={config.get('kasa_config')!r}); expected peft_type 'LORA' with a kasa_config"
        )
    for key, ok in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"adapter_path: {key}={config[key]!r} is not supported by KasaLinear")
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            unknown.append(key)
            continue
        per_module.setdefault(m.group(1), {})[m.group(2)] = t
    if unknown:
        raise ValueError(
            f"adapter_path: tensors that are not KaSA adapter weights (modules_to_save / trainable tokens are not "
            f"supported): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    if not per_module:
        raise ValueError(f"adapter_path: {adapter_path} holds no adapter tensors")
    groups: Dict[Tuple[int, float], List[str]] = {}
    for name, parts in sorted(per_module.items()):
        missing = {"lora_A.weight", "lora_B.weight", "lora_diag"} - parts.keys()
        if missing:
            raise ValueError(f"adapter_path: module {name!r} lacks {sorted(missing)}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model: has no module {name!r} named in the adapter; is it the right base model?") from None
        if isinstance(module, KasaLinear):
            raise ValueError(f"model: {name!r} is already a KasaLinear; load an adapter into an untouched base model")
        r = parts["lora_A.weight"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        groups.setdefault((r, alpha), []).append(name)
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_rslora = bool(config.get("use_rslora", False))
    for (r, alpha), names in groups.items():
        inject(
            model,
            target_modules="(?:" + "|".join(re.escape(n) for n in names) + ")",
            r=r,
            alpha=alpha,
            dropout=dropout,
            truncation="peft",
            backend=backend,
            use_rslora=use_rslora,
            adapter_dtype=adapter_dtype,
        )
    with torch.no_grad():
        for name, parts in per_module.items():
            layer = model.get_submodule(name)
            for attr, key in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight"), ("lora_diag", "lora_diag")):
                dst, src = getattr(layer, attr), parts[key]
                if dst.shape != src.shape:
                    raise ValueError(f"adapter_path: {name}.{key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))
    return model
