"""The providers (REGISTRY: each one's name, category, needs and builder, declared once) and the work each one does
per case, with its flop and byte counts.

A provider builds its own copy of a case's tensors (same values for every provider: one seeded generator) and
returns a zero-argument forward. The harness turns that into the three modes:
    forward   y = fwd()                               (grad mode on, as in training: autograd records the graph)
    backward  y computed once; time y.backward(dy, retain_graph=True)
    full      fwd().backward(dy)
The forward-only providers (cublas_linear, T_mm; our two GEMMs with the adapter off) time forward mode only. Baselines
come from python/kasa_reference (peft_style_eager, the PEFT-shaped eager composition used when PEFT is not
installed), from PEFT itself, and from bench/peers.py.

FLOP counts are those of the math, the same for every implementation of it (docs/math.md, "Cost model"):
    base GEMM          2 M N K                    (forward; dx = G W in backward; dW = G^T x for a dense layer)
    adapter forward    2 M r (K + N)              (H = X~ A^T and S B^T)
    adapter backward   4 M r (K + N)              (G B, G^T Z, gH^T X~, gH A)
Byte counts are compulsory traffic: every operand read once and every result written once (activations and W in
the activation dtype, adapters in their own dtype, H in fp32); GB/s = bytes / median time.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._backend import NAMES as BACKEND_NAMES
from ..modules import default_adapter_dtype
from .peers import unsloth_style_linear
from .shapes import Case

MODES = ("forward", "backward", "full")

# Provider categories (Provider.category). The lists the harness, the report and the tools use are sets of these.
BASELINE_GEMM = "baseline GEMM"  # T_mm: the plain inference GEMM every forward ratio is taken against
FROZEN_LAYER = "frozen layer"  # T_frozen: the layer without an adapter, W frozen; every fwd+bwd ratio's reference
DENSE_LAYER = "dense layer"  # no adapter, W trainable: full fine-tuning's cost
PEER = "peer"  # someone else's KaSA layer, or a composition of stock kernels we compare against
OURS_TORCH = "ours-torch"  # kasa_kernels' shipped torch backend
OURS_FUSED = "ours-fused"  # kasa_kernels' fused backends
OUR_GEMM = "our GEMM"  # the fused forward's GEMM with the adapter switched off, against cuBLAS
QUANT_BASE = "quantized base"  # KaSA on a bitsandbytes NF4 base: ours, and bitsandbytes plus an eager adapter
CATEGORIES = (BASELINE_GEMM, FROZEN_LAYER, DENSE_LAYER, PEER, OURS_TORCH, OURS_FUSED, OUR_GEMM, QUANT_BASE)

ALPHA_OVER_R = 2.0  # lora_alpha = 2 r, so s = 2 (any value times the same)


# ----------------------------------------------------------------------------------------------------------------
# Work counts


def flops(kind: str, mode: str, c: Case) -> float:
    """kind: 'linear' (no adapter, W frozen), 'dense' (W trainable), 'kasa', or 'kasa_nf4' (KaSA on an NF4 base:
    the same math; dequantization is not counted)."""
    base = 2.0 * c.M * c.N * c.K
    kasa = kind in ("kasa", "kasa_nf4")
    adapter_fwd = 2.0 * c.M * c.r * (c.K + c.N) if kasa else 0.0
    adapter_bwd = 4.0 * c.M * c.r * (c.K + c.N) if kasa else 0.0
    fwd = base + adapter_fwd
    bwd = (2 * base if kind == "dense" else base) + adapter_bwd
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# PEFT's default (autocast_adapter_dtype=True), which KasaLinear follows: fp32 adapters beside half activations.
adapter_dtype = default_adapter_dtype


# Bytes per weight element of the benchmark's NF4 base (blocksize 64, double quantization): a nibble, one uint8
# scale code per 64 elements, one fp32 per 256 scale codes (bitsandbytes' nested blocksize).
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_BYTES_PER_ELEMENT = 0.5 + 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)


def bytes_moved(kind: str, mode: str, c: Case) -> float:
    e = _elt(c.torch_dtype)
    a = _elt(adapter_dtype(c.torch_dtype))
    M, K, N, r = c.M, c.K, c.N, c.r
    w = NF4_BYTES_PER_ELEMENT * N * K if kind == "kasa_nf4" else e * N * K  # W read in forward and again for dx
    fwd = e * (M * K + M * N) + w
    bwd = e * (M * N + M * K) + w  # read G and W, write dx
    if kind == "dense":
        bwd += e * (M * K + N * K)  # read x, write dW
    if kind in ("kasa", "kasa_nf4"):
        params = a * r * (K + N + 1)
        fwd += params + 4 * M * r  # read A, d, B; write H
        bwd += e * M * K + 4 * M * r + 2 * params  # read x (for dA) and H; read params, write their grads
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


# ----------------------------------------------------------------------------------------------------------------
# Provider state


@dataclasses.dataclass
class State:
    fwd: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor]  # tensors whose .grad is reset before every timed call
    dy: Optional[torch.Tensor]
    kind: str  # for flops(): 'linear' | 'dense' | 'kasa' | 'kasa_nf4'
    impl: str  # what actually ran, in words


@dataclasses.dataclass
class Tensors:
    x: torch.Tensor
    weight: torch.Tensor
    lora_A: torch.Tensor
    lora_diag: torch.Tensor
    lora_B: torch.Tensor
    dy: torch.Tensor
    scaling: float


Builder = Callable[["Provider", Tensors, Case, torch.device, Optional[str]], State]


@dataclasses.dataclass(frozen=True)
class Provider:
    """One benchmark provider, declared once in REGISTRY below."""

    name: str
    category: str  # one of CATEGORIES
    builder: Builder  # (this provider, the case's tensors, case, device, torch.compile mode) -> State
    forward_only: bool = False  # timed in forward mode only (no adapter and no gradient: a plain GEMM)
    backend: Optional[str] = None  # the kasa_kernels backend (kasa_kernels._backend.NAMES) it runs, if any
    needs_gpu: bool = False  # its numbers mean something only on a GPU (on CPU it is skipped, or interpreted)


def make_tensors(c: Case, device: torch.device, seed: int = 0) -> Tensors:
    """The case's tensors, identical for every provider (seeded), on `device`. B is random rather than PEFT's zero
    init so no path can skip work on zeros."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dt = c.torch_dtype
    adt = adapter_dtype(dt)

    def rnd(*shape, dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    return Tensors(
        x=rnd(c.M, c.K, dtype=dt),
        weight=rnd(c.N, c.K, dtype=dt, scale=1.0 / math.sqrt(c.K)),
        lora_A=rnd(c.r, c.K, dtype=adt, scale=1.0 / math.sqrt(c.K)),
        lora_diag=rnd(c.r, dtype=adt),
        lora_B=rnd(c.N, c.r, dtype=adt, scale=0.02),
        dy=rnd(c.M, c.N, dtype=dt, scale=1.0 / math.sqrt(c.N)),
        # s = lora_alpha / r with lora_alpha = ALPHA_OVER_R * r (peft_kasa_layer's config): the rank cancels
        scaling=ALPHA_OVER_R,
    )


def _adapters_trainable(t: Tensors) -> List[torch.Tensor]:
    for p in (t.lora_A, t.lora_diag, t.lora_B):
        p.requires_grad_(True)
    t.x.requires_grad_(True)
    return [t.x, t.lora_A, t.lora_diag, t.lora_B]


# ----------------------------------------------------------------------------------------------------------------
# Providers


def _peft_version() -> Optional[str]:
    try:
        import peft
        from peft import KasaConfig  # noqa: F401
    except ImportError:
        return None
    return peft.__version__


class _OneLinear(nn.Module):
    def __init__(self, k: int, n: int, dtype, device):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=False, dtype=dtype, device=device)


_PEFT_LAYERS: Dict[Tuple, nn.Module] = {}


def peft_kasa_layer(k: int, n: int, r: int, p: float, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """PEFT's own KaSA LoRA layer (LoraConfig(kasa_config=KasaConfig())) on a one-linear wrapper, cached per
    (K, N, r, p, dtype, device) because its init runs an SVD of W."""
    key = (k, n, r, p, dtype, str(device))
    layer = _PEFT_LAYERS.get(key)
    if layer is None:
        from peft import KasaConfig, LoraConfig, get_peft_model

        torch.manual_seed(0)
        cfg = LoraConfig(r=r, lora_alpha=ALPHA_OVER_R * r, lora_dropout=p, target_modules=["proj"],
                         kasa_config=KasaConfig())
        model = get_peft_model(_OneLinear(k, n, dtype, device), cfg)
        layer = model.base_model.model.proj
        layer.train()
        _PEFT_LAYERS.clear()  # one at a time: the wrappers hold a full W each
        _PEFT_LAYERS[key] = layer
    return layer


def _kk():
    import kasa_kernels

    return kasa_kernels


def usable(name: str, device: torch.device) -> Tuple[bool, str]:
    """Whether provider `name` can run on `device`, and why (not)."""
    spec = provider(name)
    if spec.backend is not None:
        info = _kk().backends(device)[spec.backend]
        if not info.available:
            return False, info.reason
        if spec.category in (OURS_FUSED, OUR_GEMM):
            return True, info.reason  # which kernels run, e.g. "... under the CPU interpreter"
    if name == "peft":
        v = _peft_version()
        if v is None:
            return True, "peft with KaSA not installed: kasa_reference.peft_style_eager stands in"
        return True, f"peft {v} KasaLinearVariant"
    if name == "torch_compile":
        return True, f"torch.compile (inductor) of the torch backend, torch {torch.__version__}"
    if spec.category == QUANT_BASE:
        try:
            import bitsandbytes
        except ImportError:
            return False, "bitsandbytes is not installed (pip install bitsandbytes)"
        return True, f"bitsandbytes {bitsandbytes.__version__} NF4 (blocksize {NF4_BLOCKSIZE}, double quantization)"
    return True, ""


def build(name: str, c: Case, device: torch.device, compile_mode: Optional[str] = None) -> State:
    """Fresh tensors and the forward closure of provider `name` for case `c`."""
    spec = provider(name)
    return spec.builder(spec, make_tensors(c, device), c, device, compile_mode)


# The builders: (provider, the case's tensors, case, device, torch.compile mode) -> State.


def _cublas_linear(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    x, w = t.x, t.weight

    def fwd():
        return F.linear(x, w)

    return State(fwd, [], None, "linear", "torch.nn.functional.linear (cuBLAS on CUDA)")


def _our_gemm(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    from .. import _backend
    from ..ops import defs

    _backend.load(spec.backend)
    x, w = t.x, t.weight
    return State(lambda: defs.base_gemm(spec.backend, x, w, None), [], None, "linear",
                 f"kasa_kernels::base_gemm on the {spec.backend} backend (its fused GEMM, adapter off)")


def _frozen_linear(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    t.x.requires_grad_(True)
    x, w = t.x, t.weight
    return State(lambda: F.linear(x, w), [x], t.dy, "linear", "F.linear, x requires grad, W frozen")


def _dense_linear(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    t.x.requires_grad_(True)
    t.weight.requires_grad_(True)
    x, w = t.x, t.weight
    return State(lambda: F.linear(x, w), [x, w], t.dy, "dense", "F.linear, x and W require grad")


def _peft(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    if _peft_version() is not None:
        layer = peft_kasa_layer(c.K, c.N, c.r, c.dropout, c.torch_dtype, device)
        with torch.no_grad():  # the case's values, so every provider computes the same numbers
            layer.base_layer.weight.copy_(t.weight)
            layer.lora_A["default"].weight.copy_(t.lora_A)
            layer.lora_B["default"].weight.copy_(t.lora_B)
            layer.lora_diag["default"].copy_(t.lora_diag)
        x = t.x.requires_grad_(True)
        leaves = [x] + [p for p in layer.parameters() if p.requires_grad]
        return State(lambda: layer(x), leaves, t.dy, "kasa", f"peft {_peft_version()} KasaLinearVariant")
    from kasa_reference import peft_style_eager

    leaves = _adapters_trainable(t)
    drop = nn.Dropout(c.dropout) if c.dropout > 0 else None
    fwd = functools.partial(peft_style_eager, t.x, t.weight, None, t.lora_A, t.lora_diag, t.lora_B, t.scaling, drop)
    return State(fwd, leaves, t.dy, "kasa", "kasa_reference.peft_style_eager (peft not installed)")


def _unsloth_style(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    leaves = _adapters_trainable(t)
    fwd = functools.partial(unsloth_style_linear, t.x, t.weight, None, t.lora_A, t.lora_diag, t.lora_B, t.scaling,
                            c.dropout)
    return State(fwd, leaves, t.dy, "kasa", "kasa_kernels.bench.peers.unsloth_style_linear")


def _kasa_linear(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    """kasa_kernels.kasa_linear on the provider's backend."""
    leaves = _adapters_trainable(t)
    fn = functools.partial(_kk().kasa_linear, dropout_p=c.dropout, training=True, backend=spec.backend)
    args = (t.x, t.weight, None, t.lora_A, t.lora_diag, t.lora_B, t.scaling)
    return State(lambda: fn(*args), leaves, t.dy, "kasa", f"kasa_kernels.kasa_linear(backend={spec.backend!r})")


def _torch_compile(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    leaves = _adapters_trainable(t)
    args = (t.x, t.weight, None, t.lora_A, t.lora_diag, t.lora_B, t.scaling)
    compiled = torch.compile(_kasa_linear_torch, dynamic=False, mode=compile_mode)

    def fwd():
        return compiled(*args, c.dropout)

    return State(fwd, leaves, t.dy, "kasa", f"torch.compile(mode={compile_mode!r}) of kasa_linear(backend='torch')")


def _nf4_base(t: Tensors, c: Case, device) -> nn.Module:
    """The case's W as a bitsandbytes Linear4bit (NF4, blocksize 64, double quantization, computing in the case's
    dtype) on `device`; bitsandbytes quantizes it on the move there."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(c.K, c.N, bias=False, compute_dtype=c.torch_dtype, compress_statistics=True,
                              quant_type="nf4")
    layer.weight.blocksize = NF4_BLOCKSIZE
    layer.load_state_dict({"weight": t.weight.detach().float().cpu()}, strict=False)
    return layer.to(device)


def _nf4_kasa(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    """kasa_kernels' QuantKasaLinear on the NF4 base: on a GPU the triton backend (W decoded in its GEMM's main
    loop), elsewhere the torch backend. Built with truncation "none" so both quantized providers compute with the
    same base."""
    backend = "triton" if device.type == "cuda" else "torch"
    layer = _kk().KasaLinear.from_linear(_nf4_base(t, c, device), r=c.r, alpha=t.scaling * c.r, dropout=c.dropout,
                                         truncation="none", backend=backend, adapter_dtype=t.lora_A.dtype)
    with torch.no_grad():
        for name in ("lora_A", "lora_diag", "lora_B"):
            getattr(layer, name).copy_(getattr(t, name))
    layer.train()
    x = t.x.requires_grad_(True)
    leaves = [x, layer.lora_A, layer.lora_diag, layer.lora_B]
    return State(lambda: layer(x), leaves, t.dy, "kasa_nf4", f"kasa_kernels QuantKasaLinear (backend {backend!r})")


def _nf4_peft_style(spec, t: Tensors, c: Case, device, compile_mode) -> State:
    """bitsandbytes' Linear4bit plus the adapter in eager torch, as PEFT composes its LoRA layer over a bitsandbytes
    base: base(x) + s ((dropout(x) A^T) * d) B^T, the adapter in its own dtype and added in x's."""
    base = _nf4_base(t, c, device)
    leaves = _adapters_trainable(t)
    drop = nn.Dropout(c.dropout) if c.dropout > 0 else nn.Identity()
    x, a, d, b, s = t.x, t.lora_A, t.lora_diag, t.lora_B, t.scaling

    def fwd():
        h = drop(x).to(a.dtype) @ a.t()
        return base(x) + ((h * d) @ b.t() * s).to(x.dtype)

    return State(fwd, leaves, t.dy, "kasa_nf4", "bitsandbytes Linear4bit + eager KaSA adapter (PEFT's composition)")


def _kasa_linear_torch(x, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p):
    return _kk().kasa_linear(x, weight, bias, lora_A, lora_diag, lora_B, scaling, dropout_p=dropout_p,
                             training=True, backend="torch")


# ----------------------------------------------------------------------------------------------------------------
# The registry: every provider, once, in the order runs time them and reports list them. Adding a provider is one
# line here (plus its builder above, and its row in README.md's providers table, which tests/test_readme_lists.py
# holds to this registry).

REGISTRY: Tuple[Provider, ...] = (
    Provider("cublas_linear", BASELINE_GEMM, _cublas_linear, forward_only=True),
    Provider("frozen_linear", FROZEN_LAYER, _frozen_linear),
    Provider("dense_linear", DENSE_LAYER, _dense_linear),
    Provider("peft", PEER, _peft),
    Provider("torch_eager", OURS_TORCH, _kasa_linear, backend="torch"),
    Provider("torch_compile", PEER, _torch_compile, backend="torch"),
    Provider("unsloth_style", PEER, _unsloth_style),
    Provider("triton", OURS_FUSED, _kasa_linear, backend="triton", needs_gpu=True),
    Provider("cuda", OURS_FUSED, _kasa_linear, backend="cuda", needs_gpu=True),
    Provider("triton_gemm", OUR_GEMM, _our_gemm, forward_only=True, backend="triton", needs_gpu=True),
    Provider("cuda_gemm", OUR_GEMM, _our_gemm, forward_only=True, backend="cuda", needs_gpu=True),
    Provider("nf4_kasa", QUANT_BASE, _nf4_kasa),
    Provider("nf4_peft_style", QUANT_BASE, _nf4_peft_style),
)
_BY_NAME: Dict[str, Provider] = {p.name: p for p in REGISTRY}


def _check_registry() -> None:
    if len(_BY_NAME) != len(REGISTRY):
        raise ValueError("providers.REGISTRY: a provider name is declared twice")
    for p in REGISTRY:
        if p.category not in CATEGORIES:
            raise ValueError(f"providers.REGISTRY: {p.name}: category {p.category!r} is not one of {CATEGORIES}")
        if p.backend is not None and p.backend not in BACKEND_NAMES:
            raise ValueError(f"providers.REGISTRY: {p.name}: backend {p.backend!r} is not one of {BACKEND_NAMES}")


_check_registry()


def provider(name: str) -> Provider:
    """The registry entry of provider `name`; ValueError naming the known ones otherwise."""
    spec = _BY_NAME.get(name)
    if spec is None:
        raise ValueError(f"--providers: unknown provider {name!r}; expected some of {', '.join(PROVIDERS)}")
    return spec


def names(*categories: str) -> Tuple[str, ...]:
    """The providers of these categories, in registry order."""
    return tuple(p.name for p in REGISTRY if p.category in categories)


# Every list of providers elsewhere is one of these (or computed from REGISTRY where it is used).
PROVIDERS = tuple(p.name for p in REGISTRY)
FORWARD_ONLY = tuple(p.name for p in REGISTRY if p.forward_only)
# Our Triton and CUDA GEMMs with the adapter switched off (the same kernels as the fused forwards, rank-r k-steps
# disabled), timed against cublas_linear (T_mm) for docs/design.md's "our GEMM vs cuBLAS".
GEMMS = names(OUR_GEMM)
# Not KaSA layers: left out of per-provider KaSA plots and peer tables.
BASELINES = names(BASELINE_GEMM, FROZEN_LAYER, OUR_GEMM)
# Our fused backends (their provider names are their backend names).
FUSED = names(OURS_FUSED)
# KaSA on an NF4 base: ours (nf4_kasa), and bitsandbytes' layer with PEFT's eager adapter.
QUANTIZED = names(QUANT_BASE)
# Providers that are ours: the fused backends and the shipped torch backend.
OURS = names(OURS_FUSED, OURS_TORCH)
# The peer table's columns: the peers, then the torch backend (the fused backends' peer).
PEERS = names(PEER) + names(OURS_TORCH)


def prepare_compile(device: torch.device, max_recompiles: int = 64) -> None:
    """Forget earlier compiled graphs (each case compiles its own, static-shape graph) and allow one recompile per
    case so a sweep never falls back to eager silently."""
    import torch._dynamo

    torch._dynamo.reset()
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), max_recompiles))
    if device.type == "cpu":
        # 2026-11: inductor's background compile workers shared the 2 cores of the CPU machines with the timed
        # providers and put 100x outliers into their p80; compile in-process there.
        import torch._inductor.config as inductor_cfg

        inductor_cfg.compile_threads = 1
