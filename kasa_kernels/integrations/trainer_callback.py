"""KasaCallback: KaSA with its regularizer in a stock transformers Trainer or trl SFTTrainer, in one call.

Imported through kasa_kernels.integrations.transformers.KasaCallback (this module imports transformers' Trainer
machinery, which takes seconds, so it loads on first use).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from transformers import TrainerCallback

from .. import _backend, _layers
from ..functional import REGULARIZER_FORMS, kasa_regularizer
from ..modules import KasaLinear

__all__ = ["KasaCallback"]


class KasaCallback(TrainerCallback):
    """Train KaSA with its regularizer in a stock transformers Trainer (or trl's SFTTrainer) in one call:

        trainer = Trainer(model, args, train_dataset=..., callbacks=[KasaCallback()])

    At train begin it patches every PEFT KaSA layer to run through kasa_kernels (patch_peft_model, `backend`) and
    gives every KasaLinear `backend` (unless it is "auto", which leaves each layer's own). At each optimizer step it
    computes the whole model's regularizer gradient once (kasa_regularizer, all layers batched) times the factor the
    task gradient carries, S / n: S the GradScaler's scale (1 without one), n the micro-batches the Trainer
    accumulates into this step (gradient_accumulation_steps, fewer in an epoch's last step). A hook on each adapter
    parameter adds that gradient to the one every micro-batch's backward produces, before it is accumulated. So each
    optimizer step gets exactly one regularizer gradient, as from the hand-written loop

        loss = task_loss + kasa_regularizer(model) / n        (task_loss as the Trainer scales it)

    and bit for bit: the term is the same fp32 product kasa_regularizer's backward forms in that loop, added to the
    same task gradient before accumulation. Whichever way the Trainer or trl computes the task loss (the model's own
    loss, a token count across the accumulated batch, SFTTrainer's fused loss), the Trainer's clipping then sees the
    full gradient. beta / gamma None take each PEFT adapter's KasaConfig values (KasaLinear: its
    kasa_regularizer_weights, else 1e-4 / 1e-3); the adapters are the active ones, several per layer included. The
    logged loss is the task loss; kasa_regularizer(model) under torch.no_grad() gives the regularizer.

    At train end the hooks and patches are removed and the backends restored. Not supported: DeepSpeed (its engine
    scales the loss itself) and FSDP-sharded adapters (their gradients do not pass the hooks). An adapter that a
    micro-batch does not run (e.g. an unrouted expert) gets no term for that micro-batch.
    """

    def __init__(self, beta: Optional[float] = None, gamma: Optional[float] = None, form: str = "paper",
                 backend: str = "auto"):
        for name, v in (("beta", beta), ("gamma", gamma)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise TypeError(f"{name}: expected None or a finite float, got {v!r}")
        if form not in REGULARIZER_FORMS:
            raise ValueError(f"form: expected one of {REGULARIZER_FORMS}, got {form!r}")
        _backend.check_name(backend)
        self.beta, self.gamma, self.form, self.backend = beta, gamma, form, backend
        self.model = None
        self.factor = None  # S / n of the current optimizer step (a 0-dim fp32 tensor), for logging
        self._undo = []

    # -- training begins: route every KaSA layer through kasa_kernels, hook every trainable adapter parameter

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("KasaCallback: the Trainer passed no model to on_train_begin")
        # a DeepSpeed config given to TrainingArguments, or accelerate's (ACCELERATE_USE_DEEPSPEED: only the plugin)
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            raise ValueError("KasaCallback: DeepSpeed scales the loss inside its engine, where the callback cannot "
                             "read the factor; add kasa_regularizer(model) to the loss in compute_loss instead")
        try:
            self._route_layers(model)
            self._hook_adapters(model)
        except Exception:
            self.on_train_end(args, state, control)  # leave the model as it came
            raise
        self.model = model
        self._scaler = getattr(optimizer, "scaler", None)  # accelerate's AcceleratedOptimizer holds the GradScaler
        try:
            self._steps_in_epoch = len(train_dataloader)
        except TypeError:
            self._steps_in_epoch = None
        self._expected = self._seen = 0

    def _route_layers(self, model):
        if _layers.peft_kasa_layers(model):
            from .peft import fused_layer_names, patch_peft_model, unpatch_peft_model

            already = set(fused_layer_names(model))
            patch_peft_model(model, backend=self.backend)
            if not already:
                self._undo.append(lambda: unpatch_peft_model(model))
        if self.backend != "auto":
            layers = [m for m in _layers.kasa_layers(model).values() if isinstance(m, KasaLinear)]
            for m in layers:
                _backend.resolve(self.backend, m.weight.device)  # fails now, with the reason
            old = [m.backend for m in layers]

            def restore():
                for m, b in zip(layers, old):
                    m.backend = b

            for m in layers:
                m.backend = self.backend
            self._undo.append(restore)

    def _hook_adapters(self, model):
        entries = _layers.adapter_entries(model)
        if not entries:
            raise ValueError("model: found no KaSA layers (KasaLinear, or PEFT layers with an active KaSA adapter)")
        kasa_regularizer(model, beta=self.beta, gamma=self.gamma, form=self.form)  # validates weights and adapters
        unique = {id(t): t for e in entries for t in (e.lora_A, e.lora_B, e.lora_diag)}
        self._params = [t for t in unique.values() if t.requires_grad]
        if not self._params:
            raise ValueError("model: no KaSA adapter parameter requires grad; nothing to train")
        if any(_is_dtensor(t) for t in self._params):
            raise ValueError("model: KaSA adapters are FSDP-sharded DTensors, whose gradients do not pass parameter "
                             "hooks; add kasa_regularizer(model) to the loss instead")
        self._reg_grads = {}
        handles = [t.register_hook(self._hook(id(t))) for t in self._params]

        def remove():
            for h in handles:
                h.remove()
            self._reg_grads = {}

        self._undo.append(remove)

    def _hook(self, key: int):
        def add_regularizer_gradient(grad):
            extra = self._reg_grads.get(key)
            return grad if extra is None else grad + extra

        return add_regularizer_gradient

    # -- each optimizer step: the regularizer gradient, times the factor of this step's micro-batches

    def _micro_batches(self, args, state) -> int:
        """How many micro-batches the Trainer accumulates into this optimizer step: it cuts each epoch of
        steps_in_epoch micro-batches into windows of gradient_accumulation_steps, the last one holding the rest
        (steps_in_epoch is max_steps * gradient_accumulation_steps when the dataloader has no length)."""
        ga = args.gradient_accumulation_steps
        n = self._steps_in_epoch if self._steps_in_epoch is not None else state.max_steps * ga
        per_epoch = max(-(-n // ga), 1)
        if state.global_step % per_epoch < per_epoch - 1:
            return ga
        return n - (per_epoch - 1) * ga

    def on_step_begin(self, args, state, control, **kwargs):
        if self.model is None:
            return
        self._expected = self._micro_batches(args, state)
        self._seen = 0
        scale = self._scaler.get_scale() if self._scaler is not None and self._scaler.is_enabled() else 1.0
        # (S / n) in fp32, as autograd forms it for the regularizer of `task + reg / n` scaled by S; the adapters do
        # not change within the step, so one regularizer backward serves all n micro-batches
        self.factor = torch.tensor(scale, dtype=torch.float32, device=self._params[0].device) / self._expected
        with torch.enable_grad():
            reg = kasa_regularizer(self.model, beta=self.beta, gamma=self.gamma, form=self.form)
            grads = torch.autograd.grad(reg, self._params, grad_outputs=self.factor)
        self._reg_grads = {id(t): g for t, g in zip(self._params, grads)}

    def on_substep_end(self, args, state, control, **kwargs):
        self._seen += 1

    def on_step_end(self, args, state, control, **kwargs):
        if self.model is None:
            return
        self._seen += 1
        self._reg_grads = {}
        if self._seen != self._expected:
            raise RuntimeError(
                f"KasaCallback: this optimizer step accumulated {self._seen} micro-batches where the Trainer's "
                f"windowing predicted {self._expected}, so each carried a regularizer factor of 1/{self._expected} "
                f"instead of 1/{self._seen}; this Trainer version or dataloader cuts accumulation windows differently"
            )

    # -- training ends: undo

    def on_train_end(self, args, state, control, **kwargs):
        while self._undo:
            self._undo.pop()()
        self.model = None


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)
