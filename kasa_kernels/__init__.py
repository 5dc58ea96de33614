"""kasa_kernels: fused kernels for KaSA (Knowledge-aware Singular-value Adaptation) fine-tuning.

    import kasa_kernels as kk
    layer = kk.KasaLinear.from_linear(linear, r=16, alpha=32)
    model = kk.inject(model, target_modules=["q_proj", "v_proj"], r=8)
    loss = task_loss + kk.kasa_regularizer(model)
"""
from ._backend import BackendInfo, BackendUnavailableError, backends
from .autograd import FoldedRegularizer
from .functional import kasa_linear, kasa_regularizer, svd_truncate
from .modules import KasaLinear, fold_regularizer, inject, merge_and_unload

__version__ = "0.1.0"

__all__ = [
    "KasaLinear",
    "kasa_linear",
    "kasa_regularizer",
    "svd_truncate",
    "inject",
    "fold_regularizer",
    "merge_and_unload",
    "FoldedRegularizer",
    "backends",
    "BackendInfo",
    "BackendUnavailableError",
    "__version__",
]
