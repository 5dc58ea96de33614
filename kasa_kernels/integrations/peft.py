"""PEFT integration: run PEFT's KaSA layers through kasa_kernels, move KaSA checkpoints between the two, and export
KaSA as a plain LoRA adapter for serving on the untouched base model.

    from kasa_kernels.integrations import peft as kk_peft

    kk_peft.patch_peft_model(peft_model, backend="auto")   # KaSA LoRA layers now call kasa_kernels.kasa_linear
    kk_peft.unpatch_peft_model(peft_model)                 # back to PEFT's own forward

    kk_peft.save_peft_adapter(kk_model, "adapter/")        # a kasa_kernels.inject model -> PEFT adapter files
    kk_model = kk_peft.load_peft_adapter(base_model, "adapter/")   # PEFT adapter files -> KasaLinear layers
    kk_peft.export_lora_adapter(kasa_model, base_model, "lora/")   # KaSA -> plain LoRA on the untouched base

Patching swaps the class of each `peft.tuners.lora.layer.Linear` for a subclass whose forward computes
x W^T + b + s ((dropout(x) A^T) * d) B^T in one `kasa_linear` call (base GEMM included) from PEFT's own parameters
(base_layer.weight / .bias, lora_A[name].weight, lora_diag[name], lora_B[name].weight, scaling[name], the
lora_dropout[name] p). No parameter is moved, copied or renamed, so state dicts and `save_pretrained` output are
unchanged. Several active adapters run as one layer of rank sum(r_i) when no dropout applies (see _fused_call).
Whenever a call is outside what the fused op computes, the layer runs PEFT's forward instead: merged or disabled
adapters, no active adapter, several active adapters with dropout in training or with different dropout or dtypes,
mixed-batch `adapter_names` (or any other extra argument), a non-KaSA adapter, a pending (meta-device) KaSA
truncation, lora_bias, a base layer that is not a plain hook-free nn.Linear, a dropout module that is not
nn.Dropout / nn.Identity, a trainable base weight, or adapter dtypes other than the compute dtype or fp32. When
fold_regularizer has folded the regularizer into the layer, such a fallback with gradients flowing is an error
rather than a silently missing regularizer term.

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
from .._layers import DEFAULT_BETA, DEFAULT_GAMMA, kasa_layers, peft_kasa_layers, refuse_plain_lora_fallback
from ..autograd import autocasting
from ..functional import kasa_linear, kept_singular_triplets
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
    "export_lora_adapter",
    "truncation_residual",
    "ADAPTER_WEIGHTS_NAME",
    "ADAPTER_CONFIG_NAME",
]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_BIN_NAME = "adapter_model.bin"
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


def _dropout_of(layer, name: str):
    """(p, training) of adapter `name`'s dropout as kasa_linear takes them, or None for a dropout module the fused
    op does not reproduce."""
    dropout = layer.lora_dropout[name]
    if type(dropout) is nn.Identity:
        return 0.0, False
    if type(dropout) is nn.Dropout and not dropout.inplace:
        return (float(dropout.p), True) if dropout.training and dropout.p > 0 else (0.0, False)
    return None


def _fused_call(layer, x: torch.Tensor, args: tuple, kwargs: dict):
    """(kasa_linear arguments, active adapter names) for this call, or a str saying why PEFT's own forward runs.

    Several active adapters are one KaSA layer of rank sum(r_i): A, d and B concatenated, each adapter's scaling
    folded into its slice of d (PEFT computes sum_i s_i B_i ((dropout_i(x) A_i^T) * d_i), the same sum). That needs
    one dropout for all: they run fused when no dropout applies (p = 0, or eval); in training with p > 0 PEFT draws
    an independent mask per adapter, which one fused call cannot, so PEFT's forward runs."""
    if args or any(v is not None for v in kwargs.values()):
        return "extra forward arguments (adapter_names for a mixed batch, aLoRA offsets, or base-layer extras)"
    if layer.disable_adapters or layer.merged:
        return "the adapters are disabled or merged"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if not active:
        return "no active adapter on this layer"
    base = layer.base_layer
    if type(base) is not nn.Linear or "forward" in base.__dict__ or base._forward_hooks or base._forward_pre_hooks:
        return "the base layer is not a plain, hook-free nn.Linear (quantized, wrapped or offloaded)"
    if layer.fan_in_fan_out:
        return "fan_in_fan_out"
    weight, bias = base.weight, base.bias
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return "the base layer is trainable (KaSA freezes it; PEFT's path gives it a gradient)"
    if autocasting(x.device.type):
        compute_dtype = torch.get_autocast_dtype(x.device.type)
    else:
        compute_dtype = x.dtype
        if weight.dtype != x.dtype:
            return "x and the base weight differ in dtype (PEFT raises or handles it)"
    diag_dict = getattr(layer, "lora_diag", None)
    deferred = getattr(layer, "_lora_kasa_truncation_deferred", ())
    parts, dropouts = [], set()
    for name in active:
        if diag_dict is None or name not in diag_dict or not isinstance(layer.lora_variant.get(name), _PeftKasaVariant):
            return f"adapter {name!r} is not a KaSA adapter"
        if name in deferred:
            return "PEFT applies the deferred SVD truncation on its first forward"
        lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
        if (type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or lora_A.bias is not None
                or lora_B.bias is not None):
            return "lora_A / lora_B are not bias-free nn.Linear (lora_bias, or a wrapped adapter)"
        dropout = _dropout_of(layer, name)
        if dropout is None:
            return "a dropout module other than nn.Dropout / nn.Identity"
        diag = diag_dict[name]
        if not all(_adapter_dtype_ok(t, compute_dtype) for t in (lora_A.weight, lora_B.weight, diag)):
            return "adapter dtype is neither the compute dtype nor fp32 (PEFT casts x to the adapter dtype)"
        parts.append((lora_A.weight, diag, lora_B.weight, float(layer.scaling[name])))
        dropouts.add(dropout)
    if len(dropouts) > 1:
        return "the active adapters differ in dropout"
    p, training = dropouts.pop()
    if len(parts) == 1:
        a, d, b, scaling = parts[0]
    else:
        if training:
            return "several active adapters with dropout while training (PEFT draws one mask per adapter)"
        if any(len({pt[i].dtype for pt in parts}) > 1 for i in range(3)):
            return "the active adapters differ in dtype"
        a = torch.cat([pt[0] for pt in parts])
        d = torch.cat([pt[1] * pt[3] for pt in parts])
        b = torch.cat([pt[2] for pt in parts], dim=1)
        scaling = 1.0
    # under autocast, kasa_linear casts x, W and b to the autocast dtype itself, as F.linear does
    return (x, weight, bias, a, d, b, scaling, p, training), active


def _folded_handle(layer, names: List[str]):
    """The FoldedRegularizer for this fused call (None when nothing is folded); raises where a folded regularizer
    would silently be skipped."""
    folded = layer.__dict__.get("kasa_folded")
    if not folded:
        return None
    if len(names) > 1:
        raise RuntimeError(f"layer with adapters {names}: the regularizer is folded into this layer's backward, but "
                           "several active adapters run as one fused layer, whose regularizer is not theirs; fold "
                           "with one active adapter, or unfold and add kasa_regularizer(model) to the loss")
    handle = folded.get(names[0])
    if handle is None and torch.is_grad_enabled():
        raise RuntimeError(f"the regularizer was folded for adapter(s) {sorted(folded)} but {names[0]!r} is active; "
                           "call fold_regularizer(model) again after set_adapter")
    return handle


def _check_unfolded_fallback(layer, reason: str) -> None:
    # PEFT's forward knows nothing of the folded regularizer: with gradients flowing to the adapters it would be
    # silently left out of this step
    if layer.__dict__.get("kasa_folded") and torch.is_grad_enabled() and not (layer.disable_adapters or layer.merged):
        active = [a for a in layer.active_adapters if a in layer.lora_A]
        if any(p.requires_grad for a in active for p in layer.lora_A[a].parameters()):
            raise RuntimeError(f"the regularizer is folded into the fused forward, but this call runs PEFT's own "
                               f"forward ({reason}), which would leave it out; unfold it (fold_regularizer(model, "
                               f"enable=False)) and add kasa_regularizer(model) to the loss instead")


if _PeftLoraLinear is not None:

    class KasaFusedLoraLinear(_PeftLoraLinear):
        """A peft lora.Linear whose KaSA forward is one kasa_linear call. Created only by patch_peft_model, which
        swaps the class of existing layers; the parameters and state dict are PEFT's."""

        _kasa_backend: str = "auto"
        kasa_fused_forward = True  # fold_regularizer folds into this layer (kasa_folded: {adapter: handle})

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            fused = _fused_call(self, x, args, kwargs)
            if isinstance(fused, str):
                _check_unfolded_fallback(self, fused)
                return super().forward(x, *args, **kwargs)
            (x, weight, bias, a, d, b, scaling, p, training), names = fused
            return kasa_linear(x, weight, bias, a, d, b, scaling, dropout_p=p, training=training,
                               backend=self._kasa_backend, folded_regularizer=_folded_handle(self, names))

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
    refuse_plain_lora_fallback(model)
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
            m.__dict__.pop("kasa_folded", None)  # PEFT's forward cannot fold the regularizer
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
    quantized = [n for n, m in layers.items() if m.weight is None]
    if quantized:
        raise ValueError(f"model: {quantized[0]!r} has a quantized base (QuantKasaLinear); PEFT cannot load KaSA onto "
                         "a bitsandbytes layer (it builds plain LoRA there), so no PEFT adapter is written: save the "
                         "model's state_dict, which holds the re-quantized truncated base and the adapters")
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
    beta: Optional[float] = None,
    gamma: Optional[float] = None,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> Tuple[str, str]:
    """Write the KasaLinear adapters of `model` as a PEFT KaSA adapter: adapter_model.safetensors with PEFT's key
    names and adapter_config.json (peft_type LORA, kasa_config {beta, gamma}, r / lora_alpha with rank_pattern /
    alpha_pattern for layers that differ). `PeftModel.from_pretrained(original_base_model, save_directory)` then
    rebuilds the same model. beta / gamma only go into kasa_config (the regularizer weights PEFT's _get_kasa_loss
    uses); None takes the layers' kasa_regularizer_weights (what load_peft_adapter read), else 1e-4 / 1e-3. Returns
    the two file paths.

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
    weights = {layer.kasa_regularizer_weights or (DEFAULT_BETA, DEFAULT_GAMMA) for layer in layers.values()}
    if (beta is None or gamma is None) and len(weights) > 1:
        raise ValueError(f"model: PEFT's kasa_config has one beta and one gamma, the layers have {sorted(weights)}; "
                         "pass beta= and gamma=")
    layer_beta, layer_gamma = weights.pop()
    beta = layer_beta if beta is None else beta
    gamma = layer_gamma if gamma is None else gamma
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
    """(adapter_config.json, tensors) of a PEFT adapter directory: adapter_model.safetensors, or adapter_model.bin
    (save_pretrained(safe_serialization=False)) where no safetensors file is, as PEFT's load_peft_weights reads."""
    from safetensors.torch import load_file

    config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    weights_path = os.path.join(path, ADAPTER_WEIGHTS_NAME)
    bin_path = os.path.join(path, ADAPTER_BIN_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"adapter_path: expected {config_path} (a PEFT adapter directory)")
    if not os.path.isfile(weights_path) and not os.path.isfile(bin_path):
        raise FileNotFoundError(f"adapter_path: expected {weights_path} or {bin_path} (a PEFT adapter directory)")
    with open(config_path) as f:
        config = json.load(f)
    if os.path.isfile(weights_path):
        return config, load_file(weights_path)
    return config, torch.load(bin_path, map_location="cpu", weights_only=True)


def _split_adapter_tensors(tensors: Dict[str, torch.Tensor]):
    """({module: {"lora_A.weight" | "lora_B.weight" | "lora_diag": tensor}}, {parameter path in the base model:
    tensor}) from a PEFT adapter's tensors. The second holds trained biases (bias="all" / "lora_only"; an adapted
    layer's is saved as <module>.base_layer.bias) and modules_to_save weights (saved under the module's own path)."""
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    others: Dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY_RE.match(key)
        if m is not None:
            per_module.setdefault(m.group(1), {})[m.group(2)] = t
        elif key.startswith(PEFT_KEY_PREFIX):
            others[key[len(PEFT_KEY_PREFIX):].replace(".base_layer.", ".")] = t
        else:
            others[key] = t  # reported below as not a parameter of the model
    return per_module, others


def load_peft_adapter(
    model: nn.Module,
    adapter_path: Union[str, os.PathLike],
    *,
    backend: str = "auto",
    adapter_dtype: Optional[torch.dtype] = None,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Put a PEFT KaSA adapter (a directory written by PeftModel.save_pretrained or save_peft_adapter) into
    `model` as KasaLinear layers, in place, and return it.

    `model` must hold the ORIGINAL base weights (a fresh from_pretrained): every adapted layer is replaced by
    KasaLinear.from_linear(truncation="peft"), which truncates its base weight as PEFT does, then lora_A, lora_B
    and lora_diag are loaded. Ranks come from the tensors, alpha from lora_alpha / alpha_pattern, dropout and
    use_rslora from the config, the regularizer weights from kasa_config (kasa_regularizer's beta/gamma=None use
    them). Trained biases (bias="lora_only" / "all") and modules_to_save weights are loaded into the model's own
    parameters; the modules_to_save stay trainable beside the adapters, the biases stay frozen (KaSA's fused op
    keeps the base layer frozen). Reads adapter_model.safetensors or adapter_model.bin.

    Adapter dtype, as PeftModel.from_pretrained: autocast_adapter_dtype=True (PEFT's default) keeps fp16/bf16 base
    models' adapters in fp32; False puts them in the base weight's dtype. adapter_dtype, when given, overrides both.
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
    if not isinstance(autocast_adapter_dtype, bool):
        raise TypeError(f"autocast_adapter_dtype: expected a bool, got {autocast_adapter_dtype!r}")
    per_module, others = _split_adapter_tensors(tensors)
    if not per_module:
        raise ValueError(f"adapter_path: {adapter_path} holds no adapter tensors")
    groups: Dict[Tuple[int, float, Optional[torch.dtype]], List[str]] = {}
    for name, parts in sorted(per_module.items()):
        missing = {"lora_A.weight", "lora_B.weight", "lora_diag"} - parts.keys()
        if missing:
            raise ValueError(f"adapter_path: module {name!r} lacks {sorted(missing)}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"model: has no module {name!r} named in the adapter; is it the right base model?") \
                from None
        if isinstance(module, KasaLinear):
            raise ValueError(f"model: {name!r} is already a KasaLinear; load an adapter into an untouched base model")
        r = parts["lora_A.weight"].shape[0]
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        dtype = adapter_dtype
        if dtype is None and not autocast_adapter_dtype and isinstance(getattr(module, "weight", None), torch.Tensor):
            dtype = module.weight.dtype
        groups.setdefault((r, alpha, dtype), []).append(name)
    params = dict(model.named_parameters())
    unknown = [k for k in others if k not in params]
    if unknown:
        raise ValueError(
            f"adapter_path: tensors that are neither KaSA adapter weights nor parameters of the model (trainable "
            f"tokens are not supported): {unknown[:5]}{' ...' if len(unknown) > 5 else ''}"
        )
    dropout = float(config.get("lora_dropout", 0.0) or 0.0)
    use_rslora = bool(config.get("use_rslora", False))
    kasa_config = config["kasa_config"]
    weights = (float(kasa_config.get("beta", DEFAULT_BETA)), float(kasa_config.get("gamma", DEFAULT_GAMMA)))
    to_save = set(config.get("modules_to_save") or ())
    for (r, alpha, dtype), names in groups.items():
        inject(
            model,
            target_modules="(?:" + "|".join(re.escape(n) for n in names) + ")",
            r=r,
            alpha=alpha,
            dropout=dropout,
            truncation="peft",
            backend=backend,
            use_rslora=use_rslora,
            adapter_dtype=dtype,
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, parts in per_module.items():
            layer = model.get_submodule(name)
            layer.kasa_regularizer_weights = weights
            for attr, key in (("lora_A", "lora_A.weight"), ("lora_B", "lora_B.weight"), ("lora_diag", "lora_diag")):
                dst, src = getattr(layer, attr), parts[key]
                if dst.shape != src.shape:
                    raise ValueError(f"adapter_path: {name}.{key} has shape {tuple(src.shape)}, expected "
                                     f"{tuple(dst.shape)}")
                dst.copy_(src.to(dst.dtype))
        for key, src in others.items():
            dst = params[key]
            if dst.shape != src.shape:
                raise ValueError(f"adapter_path: {key} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src.to(dst.dtype))
            owner = key.rpartition(".")[0]
            if any(owner == m or owner.endswith("." + m) for m in to_save):
                dst.requires_grad_(True)  # a modules_to_save module is trained in full, as in PEFT
    return model


# ----------------------------------------------------------------------------------------------------------------
# Serving: a KaSA model as a plain LoRA adapter on the untouched base model


def _export_layers(kasa_model: nn.Module, adapter_name: Optional[str]) -> Dict[str, dict]:
    """{module name in the base model: the layer's truncated weight (N, K), bias, A, d, B, scaling, r, truncation
    mode and whether the base layer is a Conv1D}, from KasaLinear layers or from one adapter of PEFT KaSA layers."""
    out = {}
    for name, m in kasa_layers(kasa_model).items():
        if not isinstance(m, KasaLinear):
            continue
        if m.weight is None:
            raise ValueError(f"kasa_model: {name} has a quantized base (QuantKasaLinear), whose truncation residual "
                             "is not a low-rank term of the original weight after re-quantization; it cannot be "
                             "exported as a LoRA adapter")
        if m.merged:
            raise ValueError(f"kasa_model: {name} is merged; unmerge() it first")
        out[name.removeprefix(PEFT_KEY_PREFIX)] = dict(
            weight=m.weight, bias=m.bias, A=m.lora_A, d=m.lora_diag, B=m.lora_B, scaling=m.scaling, r=m.r,
            truncation=m.truncation, conv1d=m.from_conv1d)
    for name, m in peft_kasa_layers(kasa_model).items():
        names = [adapter_name] if adapter_name is not None else [a for a in m.active_adapters if a in m.lora_diag]
        if len(names) != 1 or names[0] not in m.lora_diag:
            raise ValueError(f"kasa_model: {name} has KaSA adapters {sorted(m.lora_diag)} with {names} selected; "
                             "pass adapter_name= to export one adapter")
        if m.merged:
            raise ValueError(f"kasa_model: {name} is merged; unmerge_adapter() first")
        a = names[0]
        if a in getattr(m, "_lora_kasa_truncation_deferred", ()):
            raise ValueError(f"kasa_model: {name}: PEFT has not truncated its base weight yet (deferred until the "
                             "first forward); run one forward first")
        out[name.removeprefix(PEFT_KEY_PREFIX)] = dict(
            weight=m.base_layer.weight, bias=m.base_layer.bias, A=m.lora_A[a].weight, d=m.lora_diag[a],
            B=m.lora_B[a].weight, scaling=float(m.scaling[a]), r=m.r[a], truncation="peft", conv1d=m.fan_in_fan_out)
    if not out:
        raise ValueError("kasa_model: found no KaSA layer (KasaLinear, or PEFT KaSA layers)")
    return out


def _plain_parameter_name(name: str) -> Optional[str]:
    """The base-model name of a kasa_model parameter, or None for adapter weights and PEFT's kept originals."""
    name = name.removeprefix(PEFT_KEY_PREFIX)
    if re.search(r"(^|\.)(lora_A|lora_B|lora_diag)(\.|$)", name) or ".original_module." in name:
        return None
    return re.sub(r"\.modules_to_save\.[^.]+\.", ".", name).replace(".base_layer.", ".")


def truncation_residual(weight: torch.Tensor, r: int, mode: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The singular triplets svd_truncate(weight, r, mode) discards, as fp32 factors (U_d S_d (N, q), V_d^T (q, K))
    with q = min(N, K) - kept_singular_triplets(...) (r for "peft"; for "official" min(N, K) - (K - r) when positive,
    else 0; 0 for "none"): weight = svd_truncate(weight, r, mode) + U_d S_d V_d^T, from the same fp32 SVD."""
    n, k_in = weight.shape
    keep = kept_singular_triplets(n, k_in, r, mode)
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return u[:, keep:] * s[keep:], vh[keep:, :]


def export_lora_adapter(
    kasa_model: nn.Module,
    original_base_model: nn.Module,
    save_directory: Union[str, os.PathLike],
    *,
    adapter_name: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    task_type: Optional[str] = None,
) -> Tuple[str, str]:
    """Write `kasa_model` as a plain PEFT LoRA adapter (no kasa_config) for the UNTOUCHED base model, so that
    `PeftModel.from_pretrained(original_base_model, save_directory)`, or any LoRA server (vLLM, TGI, PEFT, several
    tenants on one base), reproduces the KaSA model's outputs. Returns (weights path, config path).

    Each KaSA layer's weight is W_truncated + s (B * d) A, and W_truncated = W_original - R with R the singular
    triplets the truncation discarded, so the layer is W_original plus the low-rank update
        s (B * d) A - R = [s (B * d) | -U_d S_d] [A ; V_d^T],
    written as LoRA factors of rank r + rank(R) with lora_alpha equal to the rank (scaling 1): rank(R) is r for
    truncation "peft", min(N, K) - (K - r) for "official" (0 if negative), 0 for "none". Ranks differ per layer
    through rank_pattern / alpha_pattern. R comes from an fp32 SVD of the original weight, as svd_truncate's, and is
    checked against the model's truncated weight (a different base model is an error, not a wrong adapter).

    kasa_model: a model with KasaLinear layers, or a PEFT KaSA model (its active adapter, or `adapter_name`).
    Parameters that differ from original_base_model outside the KaSA layers (a trained head) are exported as
    modules_to_save. The factors are saved in fp32.
    """
    from safetensors.torch import save_file

    if not isinstance(original_base_model, nn.Module):
        raise TypeError(f"original_base_model: expected an nn.Module, got {type(original_base_model).__name__}")
    layers = _export_layers(kasa_model, adapter_name)
    conv = {spec["conv1d"] for spec in layers.values()}
    if len(conv) > 1:
        raise ValueError("kasa_model: mixes Conv1D and nn.Linear KaSA layers; a LoRA config has one fan_in_fan_out")
    tensors: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    with torch.no_grad():
        for name, spec in layers.items():
            try:
                orig = original_base_model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"original_base_model: has no module {name!r}; is it the base of kasa_model?") \
                    from None
            if not (isinstance(orig, nn.Linear) or _is_conv1d(orig)):
                raise ValueError(f"original_base_model: {name} is a {type(orig).__name__}, expected an nn.Linear or "
                                 "Conv1D (an untouched base model)")
            w0 = orig.weight.t() if _is_conv1d(orig) else orig.weight
            w_trunc = spec["weight"]
            if w0.shape != w_trunc.shape:
                raise ValueError(f"original_base_model: {name}.weight is {tuple(w0.shape)}, kasa_model's is "
                                 f"{tuple(w_trunc.shape)}")
            ur, vr = truncation_residual(w0.to(w_trunc.device), spec["r"], spec["truncation"])
            # the model's truncated weight must be the original minus exactly these triplets (up to the rounding of
            # the SVD and of the weight's dtype): anything else is another base model
            w0_32 = w0.to(device=w_trunc.device, dtype=torch.float32)
            err = torch.linalg.matrix_norm(w_trunc.float() - (w0_32 - ur @ vr)) / torch.linalg.matrix_norm(w0_32)
            tol = max(1e-5, 8 * torch.finfo(w_trunc.dtype).eps)
            if not err <= tol:
                raise ValueError(
                    f"original_base_model: {name}: kasa_model's truncated weight is not this weight minus its "
                    f"discarded singular triplets (relative error {err.item():.2e} > {tol:.1e}, truncation "
                    f"{spec['truncation']!r}, r={spec['r']}); pass the untouched base model the adapters were made on"
                )
            b_scaled = spec["B"].float() * spec["d"].float() * spec["scaling"]
            lora_b = torch.cat([b_scaled, -ur], dim=1)
            lora_a = torch.cat([spec["A"].float(), vr], dim=0)
            tensors[PEFT_KEY_PREFIX + name + ".lora_A.weight"] = lora_a.contiguous().cpu()
            tensors[PEFT_KEY_PREFIX + name + ".lora_B.weight"] = lora_b.contiguous().cpu()
            ranks[name] = lora_a.shape[0]
        # everything else must be the base model's own, or be exported in full as modules_to_save
        orig_params = dict(original_base_model.named_parameters())
        changed = set()
        for pname, p in kasa_model.named_parameters():
            plain = _plain_parameter_name(pname)
            if plain is None or (plain.endswith(".weight") and plain[: -len(".weight")] in layers):
                continue
            if plain not in orig_params:
                raise ValueError(f"kasa_model: parameter {pname} has no counterpart {plain!r} in original_base_model")
            if torch.equal(p.detach().cpu(), orig_params[plain].detach().cpu()):
                continue
            owner = plain.rpartition(".")[0]
            if owner in layers:
                raise ValueError(f"kasa_model: {pname} differs from the base model's {plain}; a LoRA adapter cannot "
                                 "carry a KaSA layer's trained bias")
            changed.add(owner)
        kasa_params = {}
        for pname, p in kasa_model.named_parameters():
            plain = _plain_parameter_name(pname)
            if plain is not None:
                kasa_params[plain] = p
        for owner in sorted(changed):
            for pname, _ in original_base_model.get_submodule(owner).named_parameters():
                key = owner + "." + pname
                tensors[PEFT_KEY_PREFIX + key] = kasa_params[key].detach().contiguous().cpu()
    names = sorted(layers)
    r = _most_common(ranks[n] for n in names)
    rank_pattern = {re.escape(n): ranks[n] for n in names if ranks[n] != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "target_modules": _target_modules(original_base_model, names),
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),  # alpha = rank everywhere: scaling 1
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": conv.pop(),
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": sorted(changed) or None,
    }
    os.makedirs(save_directory, exist_ok=True)
    weights_path = os.path.join(save_directory, ADAPTER_WEIGHTS_NAME)
    config_path = os.path.join(save_directory, ADAPTER_CONFIG_NAME)
    save_file(tensors, weights_path, metadata={"format": "pt"})
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return weights_path, config_path
