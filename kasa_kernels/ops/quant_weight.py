"""A quantized frozen base weight as the op layer carries it, and its dequantization in plain torch.

The formats are bitsandbytes' (docs/math.md, "Quantized base"), read from its tensors without importing it:

    4-bit (nf4, fp4)  element e = n K + k of the row-major (N, K) weight is nibble e of `data` (uint8, two per byte,
                      the even element in the high nibble); W[n, k] = code[nibble] * scale[e // blocksize]
    int8              data is (N, K) int8; W[n, k] = (data[n, k] * scale[n]) * INT8_UNIT      (row-wise absmax)
    nested scales     4-bit with double quantization: scale itself is uint8 codes, one per block, decoded as
                      nested_code[scale[i]] * nested_scale[i // nested_blocksize] + nested_offset

every product and sum in fp32, in exactly that order (bitsandbytes' own), and the result rounded once to the compute
dtype. So every backend multiplies x by the same matrix: dequantize(w, dtype), bit for bit.

kasa_kernels.quant converts to and from bitsandbytes' objects; nothing here imports bitsandbytes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

KINDS = ("nf4", "fp4", "int8")
# bitsandbytes' int8 dequantization multiplies by this constant (1/127 as written in its source), in fp32.
INT8_UNIT = 7.874015718698502e-3
# The tensor fields, in the order autograd saves them (None where a format has none).
TENSOR_FIELDS = ("data", "scale", "code", "nested_scale", "nested_code", "nested_offset")


class QuantizedWeight(NamedTuple):
    """A frozen (N, K) base weight in one of bitsandbytes' formats (module docstring). `shape` is (N, K): the
    layer's (out_features, in_features)."""

    data: Optional[torch.Tensor]
    scale: Optional[torch.Tensor]  # fp32 per block (4-bit) or per row (int8); uint8 codes when nested
    code: Optional[torch.Tensor]  # the 16 fp32 values of the 4-bit type; None for int8
    nested_scale: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    nested_offset: Optional[torch.Tensor]  # 0-dim fp32
    kind: str
    blocksize: int  # 4-bit block; 0 for int8
    nested_blocksize: int  # 0 without double quantization
    shape: Tuple[int, int]

    @property
    def nested(self) -> bool:
        return self.nested_scale is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    def tensors(self) -> tuple:
        return tuple(getattr(self, f) for f in TENSOR_FIELDS)

    def without_tensors(self) -> "QuantizedWeight":
        """The format alone (autograd keeps this on its context and saves the tensors themselves)."""
        return self._replace(**{f: None for f in TENSOR_FIELDS})

    def with_tensors(self, tensors) -> "QuantizedWeight":
        return self._replace(**dict(zip(TENSOR_FIELDS, tensors)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


def _blockwise(values: torch.Tensor, scale: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values (flat, fp32) times scale[i // blocksize], the last block possibly partial."""
    n = values.numel()
    pad = (-n) % blocksize
    if pad:
        values = F.pad(values, (0, pad))
    return (values.view(-1, blocksize) * scale.view(-1, 1)).view(-1)[:n]


def block_scales(w: QuantizedWeight) -> torch.Tensor:
    """The fp32 scale per 4-bit block (per row for int8), the nested codes decoded where double quantization is on.
    Small (N K / blocksize values) and recomputed at every call, as bitsandbytes does: nothing larger is kept."""
    if not w.nested:
        return w.scale
    decoded = _blockwise(w.nested_code[w.scale.long()], w.nested_scale, w.nested_blocksize)
    return decoded + w.nested_offset


def dequantize(w: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W (N, K) in `dtype`, bit for bit what bitsandbytes' own dequantization gives in fp32, rounded once."""
    n, k = w.shape
    scales = block_scales(w)
    if w.kind == "int8":
        return ((w.data.float() * scales.view(-1, 1)) * INT8_UNIT).to(dtype)
    packed = w.data.reshape(-1).view(torch.uint8)
    nibbles = torch.stack((packed >> 4, packed & 0xF), dim=1).view(-1)[: n * k]
    return _blockwise(w.code[nibbles.long()], scales, w.blocksize).view(n, k).to(dtype)


def dequantizing(forward, backward, weight_without_dx: bool = True):
    """(qlinear_forward, qlinear_backward) kernels of a backend without a fused dequantizing path: W dequantized in
    x's dtype for this call only, then the backend's linear_forward / linear_backward kernels. Backward dequantizes
    again (nothing dequantized is kept between them); weight_without_dx=False passes None as W when dx is not wanted
    (kernels that read W only for dx)."""

    def qlinear_forward(x2d, weight, *args):
        return forward(x2d, dequantize(weight, x2d.dtype), *args)

    def qlinear_backward(grad_y, x2d, weight, *args):
        need_dx = args[-1][0]
        w = dequantize(weight, x2d.dtype) if need_dx or weight_without_dx else None
        return backward(grad_y, x2d, w, *args)

    return qlinear_forward, qlinear_backward


def check(w: QuantizedWeight, device: torch.device, name: str = "weight") -> None:
    """Refuse a QuantizedWeight whose tensors do not fit its format (argument `name`), naming what was expected."""
    n, k = w.shape
    if w.kind not in KINDS:
        raise ValueError(f"{name}: quantization kind must be one of {KINDS}, got {w.kind!r}")

    def need(field, t, numel, dtypes):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}.{field}: expected a tensor for {w.kind}, got {type(t).__name__}")
        if t.numel() != numel or t.dtype not in dtypes:
            raise ValueError(f"{name}.{field}: expected {numel} elements of {[str(d) for d in dtypes]} for a "
                             f"{w.kind} ({n}, {k}) weight, got {tuple(t.shape)} {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name}.{field}: expected x's device {device}, got {t.device}")

    f32 = (torch.float32,)
    if w.kind == "int8":
        need("data", w.data, n * k, (torch.int8,))
        need("scale", w.scale, n, f32)
        if not w.data.is_contiguous():
            raise ValueError(f"{name}.data: expected a contiguous (N, K) int8 tensor")
        return
    if w.blocksize < 16 or w.blocksize & (w.blocksize - 1):
        raise ValueError(f"{name}: blocksize must be a power of two >= 16, got {w.blocksize}")
    if not w.data.is_contiguous():
        raise ValueError(f"{name}.data: expected a contiguous packed tensor")
    packed = w.data.numel() * w.data.element_size()
    if packed != (n * k + 1) // 2:
        raise ValueError(f"{name}.data: expected {(n * k + 1) // 2} packed bytes for ({n}, {k}), got {packed}")
    if w.data.device != device:
        raise ValueError(f"{name}.data: expected x's device {device}, got {w.data.device}")
    need("code", w.code, 16, f32)
    blocks = -(-n * k // w.blocksize)
    if not w.nested:
        need("scale", w.scale, blocks, f32)
        return
    need("scale", w.scale, blocks, (torch.uint8,))
    need("nested_scale", w.nested_scale, -(-blocks // w.nested_blocksize), f32)
    need("nested_code", w.nested_code, 256, f32)
    need("nested_offset", w.nested_offset, 1, f32)
