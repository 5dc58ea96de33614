"""Finding KaSA layers in a model: the one place every entry point asks (kasa_regularizer, fold_regularizer,
inject, and the PEFT and transformers integrations).

Two kinds of module carry KaSA adapters:
- a KaSA layer: KasaLinear, or any module with its parameter names (lora_A (r, K), lora_B (N, r) and lora_diag (r,)
  as nn.Parameters);
- a PEFT KaSA layer: a LoRA layer created with a KasaConfig, whose lora_diag is a ParameterDict keyed by adapter
  name (lora_A / lora_B are ModuleDicts of Linear layers).

The regularizer weights (beta, gamma) of a PEFT adapter live in its KasaConfig, held by the PeftModel (or LoraModel,
or a transformers model that got the adapter through its own add_adapter) as `peft_config[adapter_name]`.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

# KasaConfig's defaults (PEFT, and the KaSA paper's GLUE configuration): the weights of a layer without a config.
DEFAULT_BETA = 1e-4
DEFAULT_GAMMA = 1e-3


def is_kasa_layer(m: nn.Module) -> bool:
    return isinstance(getattr(m, "lora_diag", None), nn.Parameter) and isinstance(getattr(m, "lora_A", None),
                                                                                   nn.Parameter)


def is_peft_kasa_layer(m: nn.Module) -> bool:
    diag = getattr(m, "lora_diag", None)
    return isinstance(diag, nn.ParameterDict) and len(diag) > 0


def active_peft_adapters(m: nn.Module) -> List[str]:
    """The active adapters of a PEFT KaSA layer that have KaSA parameters, in PEFT's order."""
    if not is_peft_kasa_layer(m):
        return []
    active = getattr(m, "active_adapters", None)
    if active is None:
        active = list(m.lora_diag.keys())
    elif isinstance(active, str):
        active = [active]
    return [a for a in active if a in m.lora_diag]


def kasa_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The KaSA layers of a model (KasaLinear and look-alikes) by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if is_kasa_layer(m)}


def peft_kasa_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The PEFT KaSA layers of a model by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if is_peft_kasa_layer(m)}


def module_roots(model_or_modules) -> List[nn.Module]:
    """model_or_modules (an nn.Module or an iterable of them) as a list of modules, validated."""
    if isinstance(model_or_modules, nn.Module):
        return [model_or_modules]
    try:
        roots = list(model_or_modules)
    except TypeError:
        raise TypeError(f"model_or_modules: expected an nn.Module or an iterable of modules, got "
                        f"{type(model_or_modules).__name__}") from None
    for i, m in enumerate(roots):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model_or_modules[{i}]: expected an nn.Module, got {type(m).__name__}")
    return roots


def _modules_of(model_or_modules) -> Iterable[nn.Module]:
    return (sub for m in module_roots(model_or_modules) for sub in m.modules())


def check_adapter_names(adapter_names) -> Optional[List[str]]:
    """None, or adapter_names as a list of str (one str is one name)."""
    if adapter_names is None:
        return None
    if isinstance(adapter_names, str):
        return [adapter_names]
    if isinstance(adapter_names, (list, tuple)) and all(isinstance(a, str) for a in adapter_names):
        return list(adapter_names)
    raise TypeError(f"adapter_names: expected None, a str or a list of str, got {adapter_names!r}")


class AdapterEntry(NamedTuple):
    """One KaSA adapter of one layer: `adapter` is the PEFT adapter name, None for a KasaLinear."""

    module: nn.Module
    adapter: Optional[str]
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    lora_diag: torch.Tensor


def adapter_entries(model_or_modules, adapter_names: Optional[Sequence[str]] = None) -> List[AdapterEntry]:
    """Every KaSA layer and every selected adapter of every PEFT KaSA layer, each layer once, in module order.

    adapter_names None selects each PEFT layer's active adapters (as PEFT's _get_kasa_loss does with the model's
    active adapters); a list selects those names wherever a layer has them, active or not. KasaLinear layers have
    one unnamed adapter and are always included."""
    seen = set()
    out = []
    kasa_adapters = _kasa_adapter_names(model_or_modules)
    for m in _modules_of(model_or_modules):
        if id(m) in seen:
            continue
        seen.add(id(m))
        _refuse_if_plain_lora(m, kasa_adapters)  # in this walk, so the model is walked once per call
        if is_kasa_layer(m):
            out.append(AdapterEntry(m, None, m.lora_A, m.lora_B, m.lora_diag))
        elif is_peft_kasa_layer(m):
            names = active_peft_adapters(m) if adapter_names is None else [a for a in adapter_names
                                                                          if a in m.lora_diag]
            for name in names:
                out.append(AdapterEntry(m, name, m.lora_A[name].weight, m.lora_B[name].weight, m.lora_diag[name]))
    return out


def refuse_plain_lora_fallback(model_or_modules) -> None:
    """PEFT (0.21.2) builds its bitsandbytes LoRA layers (Linear4bit, Linear8bitLt) without asking for kasa_config:
    such a layer trains as plain LoRA (no truncation, no lora_diag, a regularizer of 0) without a word. Where an
    adapter configured with kasa_config has a LoRA layer without its lora_diag, raise (ValueError) instead of
    working on fewer layers."""
    kasa_adapters = _kasa_adapter_names(model_or_modules)
    if kasa_adapters:
        for m in _modules_of(model_or_modules):
            _refuse_if_plain_lora(m, kasa_adapters)


def _kasa_adapter_names(model_or_modules) -> set:
    """The names of the PEFT adapters configured with kasa_config."""
    return {a for a, c in peft_configs(model_or_modules).items() if getattr(c, "kasa_config", None)}


def _refuse_if_plain_lora(m: nn.Module, kasa_adapters: set) -> None:
    """refuse_plain_lora_fallback's check of one module."""
    lora_a = getattr(m, "lora_A", None) if kasa_adapters else None
    if not isinstance(lora_a, nn.ModuleDict):
        return
    diag = getattr(m, "lora_diag", None)
    plain = [a for a in kasa_adapters if a in lora_a and not (isinstance(diag, nn.ParameterDict) and a in diag)]
    if plain:
        base = getattr(m, "base_layer", m)
        raise ValueError(
            f"model: PEFT adapter {plain[0]!r} has kasa_config, but its {type(m).__module__}.{type(m).__name__} "
            f"layer over a {type(base).__name__} has no lora_diag: PEFT made it a plain LoRA layer (its "
            "bitsandbytes layers ignore kasa_config), so it is not KaSA. For a quantized base use "
            "kasa_kernels.inject(model, ...) on the bitsandbytes model instead of PEFT's KaSA.")


def adapter_triples(model_or_modules) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A, B, d) for every KaSA layer and every active adapter of every PEFT KaSA layer, each layer once, in module
    order. model_or_modules: an nn.Module or an iterable of them."""
    return [(e.lora_A, e.lora_B, e.lora_diag) for e in adapter_entries(model_or_modules)]


def peft_configs(model_or_modules) -> Dict[str, object]:
    """{adapter name: PEFT config} from the first module under model_or_modules that holds a `peft_config` dict
    (PeftModel, LoraModel, or a transformers model that loaded adapters itself); {} when none does."""
    for m in _modules_of(model_or_modules):
        configs = getattr(m, "peft_config", None)
        if isinstance(configs, dict) and configs:
            return configs
    return {}


def regularizer_weights(
    entries: Sequence[AdapterEntry],
    model_or_modules,
    beta: Optional[float],
    gamma: Optional[float],
) -> List[Tuple[float, float]]:
    """(beta, gamma) for each entry: the given value, else the PEFT adapter's KasaConfig, else (for a KasaLinear) a
    `kasa_regularizer_weights` attribute (set by load_peft_adapter from the adapter's kasa_config), else KasaConfig's
    defaults. A PEFT adapter whose config cannot be found is an error rather than a silent default."""
    configs = peft_configs(model_or_modules) if (beta is None or gamma is None) else {}
    out = []
    for e in entries:
        if beta is not None and gamma is not None:
            out.append((beta, gamma))
            continue
        if e.adapter is None:
            b, g = getattr(e.module, "kasa_regularizer_weights", None) or (DEFAULT_BETA, DEFAULT_GAMMA)
        else:
            kasa_config = getattr(configs.get(e.adapter), "kasa_config", None)
            if kasa_config is None:
                raise ValueError(
                    f"beta/gamma: None takes each PEFT adapter's KasaConfig from the model's peft_config, but none was "
                    f"found for adapter {e.adapter!r} under model_or_modules; pass the PeftModel (or LoraModel), or "
                    f"beta= and gamma= explicitly"
                )
            b, g = kasa_config.beta, kasa_config.gamma
        out.append((b if beta is None else beta, g if gamma is None else gamma))
    return out


def group_by(values: Sequence, keys: Sequence) -> Dict[object, List]:
    """{key: [values with that key]}, keys in first-seen order."""
    out: Dict[object, List] = {}
    for v, k in zip(values, keys):
        out.setdefault(k, []).append(v)
    return out

