"""bitsandbytes layers and bitsandbytes' own dequantization, for the quantized-base tests (tests/test_quant.py,
tests/test_triton.py). Import after pytest.importorskip("bitsandbytes")."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from bitsandbytes.functional import QuantState

# (kind, blocksize, double quantization): nf4 and fp4 at several block sizes, nested scales on and off, and int8
FORMATS = [("nf4", 64, False), ("nf4", 128, True), ("fp4", 32, True), ("fp4", 256, False), ("int8", 0, False)]


def fmt_id(fmt):
    kind, blocksize, nested = fmt
    return kind if kind == "int8" else f"{kind}-b{blocksize}" + ("-dq" if nested else "")


def spread_weight(n, k, seed=0, top=1.0, bottom=0.5):
    """An (N, K) fp32 weight with singular values spread evenly over [bottom, top]: its r smallest triplets carry a
    few percent of its energy, more than 4-bit quantization noise, so a missing truncation shows."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, min(n, k), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, min(n, k), generator=g, dtype=torch.float64))
    s = torch.linspace(top, bottom, min(n, k), dtype=torch.float64)
    return ((u * s) @ v.T).float()


def bnb_layer(fmt, weight, bias=None):
    """A bitsandbytes Linear4bit / Linear8bitLt on the CPU holding `weight` (N, K) quantized in format `fmt`."""
    kind, blocksize, nested = fmt
    n, k = weight.shape
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(k, n, bias=bias is not None, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(k, n, bias=bias is not None, compute_dtype=torch.float32, quant_type=kind,
                                  compress_statistics=nested)
        layer.weight.blocksize = blocksize
    state = {"weight": weight.clone()}
    if bias is not None:
        state["bias"] = bias.clone()
    layer.load_state_dict(state, strict=False)
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


def bnb_dequantize(q):
    """The fp32 (N, K) matrix bitsandbytes' own functions decode from a QuantizedWeight's tensors."""
    if q.kind == "int8":
        return bnbf.int8_vectorwise_dequant(q.data, q.scale)
    state2 = None
    if q.nested:
        state2 = QuantState(absmax=q.nested_scale, code=q.nested_code, blocksize=q.nested_blocksize,
                            dtype=torch.float32)
    st = QuantState(absmax=q.scale, shape=torch.Size(q.shape), code=q.code, blocksize=q.blocksize,
                    quant_type=q.kind, dtype=torch.float32, offset=q.nested_offset, state2=state2)
    return bnbf.dequantize_4bit(q.data, st)


def quantize(fmt, weight):
    """weight quantized by bitsandbytes in format `fmt`, as a QuantizedWeight."""
    from kasa_kernels.quant import weight_of

    return weight_of(bnb_layer(fmt, weight))
