"""KaSA on a bitsandbytes-quantized base: QuantKasaLinear, what KasaLinear.from_linear and inject() build from a
bitsandbytes Linear4bit (nf4 or fp4, any block size, double quantization on or off) or Linear8bitLt layer.

Truncate-then-quantize: the layer's weight is dequantized in fp32 (ops/quant_weight.dequantize, bit for bit
bitsandbytes' own arithmetic), SVD-truncated (svd_truncate, "peft" or "official"), and quantized again by
bitsandbytes itself with the layer's own settings (4-bit: quant_type, blocksize, compress_statistics, quant_storage;
int8: row-wise absmax of the fp16-rounded weight, as Int8Params does). The result stays frozen and packed; every
backend dequantizes it on the fly (ops/quant_weight.py). The layer reports the relative error of that
re-quantization (`requant_error`).

Saving: the state_dict holds the re-quantized truncated base itself (buffers weight_q_*) and its format (extra
state), beside the adapters; load it into a QuantKasaLinear built by from_linear from the same original layer (or
any layer of that format and shape). This module imports bitsandbytes only when it converts a layer.
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn as nn

from .functional import TRUNCATION_MODES, kasa_linear, svd_truncate
from .modules import KasaLinear
from .ops.quant_weight import TENSOR_FIELDS, QuantizedWeight, dequantize

# the buffer holding each QuantizedWeight tensor field
BUFFERS = tuple("weight_q_" + f for f in TENSOR_FIELDS)


def bnb_kind(module: nn.Module) -> Optional[str]:
    """"4bit" or "int8" for a bitsandbytes Linear4bit / Linear8bitLt, None for anything not from bitsandbytes.
    Another bitsandbytes linear layer is refused (TypeError) rather than treated as a plain nn.Linear."""
    bnb = sys.modules.get("bitsandbytes")  # a bitsandbytes layer exists only if bitsandbytes was imported
    if bnb is None or not type(module).__module__.startswith("bitsandbytes"):
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    raise TypeError(f"linear: bitsandbytes layer {type(module).__name__} is not supported; expected Linear4bit "
                    "(nf4 / fp4) or Linear8bitLt")


def _from_quant_state(data: torch.Tensor, st, shape) -> QuantizedWeight:
    if st.nested:
        return QuantizedWeight(data, st.absmax, st.code, st.state2.absmax, st.state2.code,
                               st.offset.reshape(()).float(), st.quant_type, st.blocksize, st.state2.blocksize,
                               tuple(shape))
    return QuantizedWeight(data, st.absmax, st.code, None, None, None, st.quant_type, st.blocksize, 0, tuple(shape))


def weight_of(layer: nn.Module) -> QuantizedWeight:
    """The quantized weight of a bitsandbytes Linear4bit / Linear8bitLt as a QuantizedWeight (no copy), quantizing
    it first with the layer's own settings if bitsandbytes has not yet (it does so when the layer moves to a
    device)."""
    kind = bnb_kind(layer)
    p = layer.weight
    shape = (layer.out_features, layer.in_features)
    if kind == "4bit":
        if p.quant_state is None:
            return requantize(p.data.float(), layer)
        return _from_quant_state(p.data, p.quant_state, shape)
    if getattr(p, "has_fp16_weights", False) or getattr(layer.state, "has_fp16_weights", False):
        raise ValueError("linear: a Linear8bitLt with has_fp16_weights=True keeps a float weight that it trains; "
                         "KaSA needs a frozen int8 base (has_fp16_weights=False)")
    if p.dtype != torch.int8:  # not yet quantized: Int8Params' own recipe (requantize); fp32 holds the weight exactly
        return requantize(p.data.float(), layer)
    return QuantizedWeight(p.data, p.SCB, None, None, None, None, "int8", 0, 0, shape)


def requantize(w32: torch.Tensor, layer: nn.Module) -> QuantizedWeight:
    """w32 (N, K) quantized by bitsandbytes with `layer`'s format and settings."""
    import bitsandbytes.functional as bnbf

    if bnb_kind(layer) == "int8":
        # Int8Params' own recipe: the weight rounded to fp16, then row-wise absmax int8
        data, scb, _ = bnbf.int8_vectorwise_quant(w32.contiguous().to(torch.float16))
        return QuantizedWeight(data, scb, None, None, None, None, "int8", 0, 0, tuple(w32.shape))
    p = layer.weight
    st = p.quant_state
    blocksize = st.blocksize if st is not None else p.blocksize
    nested = st.nested if st is not None else p.compress_statistics
    quant_type = st.quant_type if st is not None else p.quant_type
    data, new_st = bnbf.quantize_4bit(w32.contiguous(), blocksize=blocksize, compress_statistics=nested,
                                      quant_type=quant_type, quant_storage=p.quant_storage)
    return _from_quant_state(data, new_st, w32.shape)


def relative_error(q: QuantizedWeight, w32: torch.Tensor) -> float:
    """||dequantize(q) - w||_F / ||w||_F in fp32 (0 for a zero w)."""
    norm = torch.linalg.matrix_norm(w32).item()
    return torch.linalg.matrix_norm(dequantize(q, torch.float32) - w32).item() / norm if norm > 0 else 0.0


class QuantKasaLinear(KasaLinear):
    """A KasaLinear whose frozen base is a quantized (bitsandbytes format), SVD-truncated weight. Built by
    KasaLinear.from_linear / inject from a Linear4bit or Linear8bitLt; forward computes in x's dtype (or autocast's)
    with W dequantized on the fly, and keeps only the packed weight for backward.

    quant_kind: "nf4" | "fp4" | "int8". requant_error: ||Q(W_t) - W_t||_F / ||W_t||_F of the truncated weight W_t
    (fp32) and its re-quantization Q(W_t). merge() is refused: merging into a quantized base would quantize the
    adapter away.
    """

    @classmethod
    def from_quantized(cls, linear: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                       truncation: str = "peft", backend: str = "auto", use_rslora: bool = False,
                       adapter_dtype: Optional[torch.dtype] = None) -> "QuantKasaLinear":
        if truncation not in TRUNCATION_MODES:
            raise ValueError(f"truncation: expected one of {TRUNCATION_MODES}, got {truncation!r}")
        if bnb_kind(linear) is None:
            raise TypeError(f"linear: expected a bitsandbytes Linear4bit or Linear8bitLt, got {type(linear).__name__}")
        original = weight_of(linear)
        bias = linear.bias
        layer = cls(linear.in_features, linear.out_features, bias=bias is not None, r=r, alpha=alpha,
                    dropout=dropout, backend=backend, device="meta", dtype=torch.float32, use_rslora=use_rslora,
                    adapter_dtype=adapter_dtype or torch.float32)
        if truncation == "none":  # the base as it came: nothing is quantized again
            q, requant_error = original, 0.0
        else:
            truncated = svd_truncate(dequantize(original, torch.float32), r, truncation)
            q = requantize(truncated, linear)
            requant_error = relative_error(q, truncated)
        layer.weight = None
        layer._set_quantized(q)
        layer.requant_error = requant_error
        layer._adopt(bias, original.device, truncation)
        return layer

    def _set_quantized(self, q: QuantizedWeight) -> None:
        for name, t in zip(BUFFERS, q.tensors()):
            self.register_buffer(name, None if t is None else t.detach(), persistent=True)
        self.quant_format = q.without_tensors()
        self.quant_kind = q.kind

    def quantized_weight(self) -> QuantizedWeight:
        return self.quant_format.with_tensors(tuple(getattr(self, b) for b in BUFFERS))

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen truncated base W_t as the kernels see it, in `dtype` (an N x K copy)."""
        return dequantize(self.quantized_weight(), dtype)

    def _apply(self, fn, recurse=True):
        # Module.half() / .to(dtype) would cast the fp32 scales and code tables; the packed weight keeps its exact
        # format and only follows device moves.
        saved = {b: self._buffers.pop(b) for b in BUFFERS}
        try:
            super()._apply(fn, recurse)
        finally:
            for b, t in saved.items():
                if t is not None:
                    moved = fn(t)
                    t = moved if moved.dtype == t.dtype else t.to(moved.device)
                self._buffers[b] = t
        return self

    def get_extra_state(self):
        f = self.quant_format
        return {"kind": f.kind, "blocksize": f.blocksize, "nested_blocksize": f.nested_blocksize,
                "shape": list(f.shape), "truncation": self.truncation, "requant_error": self.requant_error}

    def set_extra_state(self, state) -> None:
        f = self.quant_format
        mine = {"kind": f.kind, "blocksize": f.blocksize, "nested_blocksize": f.nested_blocksize,
                "shape": list(f.shape)}
        theirs = {k: state.get(k) for k in mine} if isinstance(state, dict) else state
        if theirs != mine:
            raise ValueError(f"state_dict: its quantized base has format {theirs}, this layer {mine}; build the layer "
                             "from a bitsandbytes layer of the same format and shape")
        self.truncation = state.get("truncation", self.truncation)
        self.requant_error = state.get("requant_error", self.requant_error)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and x.is_floating_point() and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)  # bitsandbytes casts its bias to the compute dtype the same way
        return kasa_linear(x, self.quantized_weight(), bias, self.lora_A, self.lora_diag, self.lora_B, self.scaling,
                           dropout_p=self.dropout, training=self.training, backend=self.backend,
                           folded_regularizer=self.folded_regularizer)

    def merge(self, safe_merge: bool = False) -> None:
        raise NotImplementedError("QuantKasaLinear.merge: the base is quantized; adding the adapter to it would "
                                  "quantize the adapter away. Keep the adapter separate, or dequantize: "
                                  "layer.dequantized_weight() + layer.delta_weight()")

    def unmerge(self) -> None:
        raise NotImplementedError("QuantKasaLinear.unmerge: a quantized base is never merged")

    def extra_repr(self) -> str:
        f = self.quant_format
        fmt = f"{f.kind}" + (f", blocksize={f.blocksize}, nested={f.nested_blocksize > 0}" if f.kind != "int8" else "")
        return super().extra_repr() + f", quant={fmt}, requant_error={self.requant_error:.3g}"
