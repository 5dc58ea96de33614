"""transformers helpers: KaSA on a transformers model through kasa_kernels, ready for training and torch.compile.

    from kasa_kernels.integrations.transformers import KasaCallback, inject_kasa, enable_gradient_checkpointing, \
        mark_dynamic

    trainer = transformers.Trainer(model, args, ..., callbacks=[KasaCallback()])   # or trl.SFTTrainer

    model = inject_kasa(model, r=8, alpha=16)               # default targets from model.config.model_type
    enable_gradient_checkpointing(model)                    # optional
    batch = mark_dynamic(batch)                             # new sequence lengths reuse one compiled graph
    model = torch.compile(model, fullgraph=True)

Checked on Llama, Mistral, GPT-2 (Conv1D weights stored transposed; KasaLinear keeps them in nn.Linear layout),
RoBERTa and DeBERTa-v2 built from small configs (tests/test_transformers.py).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from .. import _layers
from ..modules import KasaLinear, inject

__all__ = ["DEFAULT_TARGET_MODULES", "default_target_modules", "inject_kasa", "enable_gradient_checkpointing",
           "mark_dynamic", "KasaCallback"]  # noqa: F822  (KasaCallback loads lazily: __getattr__ below)

# The attention projections the KaSA paper and PEFT's examples adapt by default, per model_type.
DEFAULT_TARGET_MODULES: Dict[str, Sequence[str]] = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "roberta": ("query", "value"),
    "bert": ("query", "value"),
    "deberta-v2": ("query_proj", "value_proj"),
}


def default_target_modules(model: nn.Module) -> List[str]:
    """KaSA target module names for a transformers model, from model.config.model_type."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(
            f"model: no default target_modules for model_type {model_type!r}; pass target_modules explicitly "
            f"(known: {sorted(DEFAULT_TARGET_MODULES)})"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def inject_kasa(
    model: nn.Module,
    target_modules: Union[None, str, Iterable[str]] = None,
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    truncation: str = "peft",
    backend: str = "auto",
    *,
    trainable: Iterable[str] = (),
    use_rslora: bool = False,
    adapter_dtype: Optional[torch.dtype] = None,
) -> nn.Module:
    """kasa_kernels.inject with transformers defaults: target_modules from the model type when None, and the
    parameters whose qualified names contain one of `trainable` (e.g. "classifier", "score" for a freshly
    initialized task head) left trainable beside the adapters. Returns the model (changed in place)."""
    if target_modules is None:
        target_modules = default_target_modules(model)
    inject(model, target_modules, r=r, alpha=alpha, dropout=dropout, truncation=truncation, backend=backend,
           use_rslora=use_rslora, adapter_dtype=adapter_dtype)
    patterns = [trainable] if isinstance(trainable, str) else list(trainable)
    if patterns:
        hit = [n for n, p in model.named_parameters() if any(t in n for t in patterns)]
        if not hit:
            raise ValueError(f"trainable: {patterns!r} matched no parameter name")
        for n, p in model.named_parameters():
            if n in hit and p.is_floating_point():
                p.requires_grad_(True)
    return model


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> nn.Module:
    """Turn on transformers' gradient checkpointing for a model whose only trainable parameters are adapters.

    With use_reentrant=True a checkpointed block only gets gradients if its input requires grad, and the embedding
    output does not (the embeddings are frozen), so the input embeddings are made to require grad as PEFT does.
    The non-reentrant default needs nothing. Dropout masks are reproduced in the recomputation: kasa_linear draws
    its seed from torch's generator, whose state checkpointing restores."""
    kwargs = {"use_reentrant": use_reentrant}
    # transformers 5.23 (CI's) deprecates gradient_checkpointing_enable for this name; older ones may lack it
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise TypeError(f"model: expected a transformers PreTrainedModel, got {type(model).__name__}")
    if use_reentrant and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    return model


def mark_dynamic(batch: Union[torch.Tensor, Mapping[str, torch.Tensor]], dims: Sequence[int] = (0, 1)):
    """Mark the batch and sequence dims of every (>= 2-D) tensor in `batch` dynamic for torch.compile, so a new
    batch size or sequence length reuses the compiled graph instead of recompiling. Returns `batch`.

    torch.compile(dynamic=True) does the same for every input (tested too)."""
    tensors = [batch] if isinstance(batch, torch.Tensor) else [v for v in batch.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        for d in dims:
            if d < t.dim():
                # maybe_: a dim of size 0 or 1 stays specialized instead of raising
                torch._dynamo.maybe_mark_dynamic(t, d)
    return batch


def kasa_layers(model: nn.Module) -> Dict[str, KasaLinear]:
    """The KasaLinear layers of a model by qualified name."""
    return {n: m for n, m in _layers.kasa_layers(model).items() if isinstance(m, KasaLinear)}



def __getattr__(name: str):
    # KasaCallback subclasses transformers.TrainerCallback, whose import costs seconds: it loads on first use
    if name == "KasaCallback":
        from .trainer_callback import KasaCallback

        return KasaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
