"""Backend "cuda": the whole model's KaSA regularizer in one kernel launch (csrc/regularizer.cu), registered as this
backend's kernel of ops/defs.py's regularizer.

Block l of the launch handles layer l through a device table of pointers: the r x r Grams A A^T and B^T B, their
Frobenius norms, the loss term and the closed-form gradients, in the paper or the official form; the last block adds
the layers' terms in order, so the loss is deterministic. Everything is fp32; the gradients land in one flat buffer
(ops/defs.py's layout).
"""
from __future__ import annotations

from .cuda import ext
from .defs import register_kernel


@register_kernel("regularizer", "cuda")
def regularizer(lora_As, lora_Bs, lora_diags, beta, gamma, official):
    return ext().regularizer(lora_As, lora_Bs, lora_diags, beta, gamma, official)
