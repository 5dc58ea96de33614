"""Finding KaSA layers in a model: the one place every entry point asks (kasa_regularizer, fold_regularizer,
inject, and the PEFT and transformers integrations).

Two kinds of module carry KaSA adapters:
- a KaSA layer: KasaLinear, or any module with its parameter names (lora_A (r, K), lora_B (N, r) and lora_diag (r,)
  as nn.Parameters);
- a PEFT KaSA layer: a LoRA layer created with a KasaConfig, whose lora_diag is a ParameterDict keyed by adapter
  name (lora_A / lora_B are ModuleDicts of Linear layers).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn


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


def _modules_of(model_or_modules) -> Iterable[nn.Module]:
    if isinstance(model_or_modules, nn.Module):
        return model_or_modules.modules()
    try:
        roots = list(model_or_modules)
    except TypeError:
        raise TypeError(f"model_or_modules: expected an nn.Module or an iterable of modules, got "
                        f"{type(model_or_modules).__name__}") from None
    for i, m in enumerate(roots):
        if not isinstance(m, nn.Module):
            raise TypeError(f"model_or_modules[{i}]: expected an nn.Module, got {type(m).__name__}")
    return (sub for m in roots for sub in m.modules())


def adapter_triples(model_or_modules) -> List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(A, B, d) for every KaSA layer and every active adapter of every PEFT KaSA layer, each layer once, in module
    order. model_or_modules: an nn.Module or an iterable of them."""
    seen = set()
    triples = []
    for m in _modules_of(model_or_modules):
        if id(m) in seen:
            continue
        seen.add(id(m))
        if is_kasa_layer(m):
            triples.append((m.lora_A, m.lora_B, m.lora_diag))
        else:
            for name in active_peft_adapters(m):
                triples.append((m.lora_A[name].weight, m.lora_B[name].weight, m.lora_diag[name]))
    return triples
