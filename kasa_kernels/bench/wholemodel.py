"""Whole-model runs: the regularizer of a 32-layer model, and a training step of a Llama-architecture model.

regularizer: loss + backward over 32 layers x 5 targets (q, k, v, o, up of Llama-2-7B: (K, N) = (4096, 4096) x 4 and
(4096, 11008); r = 16) on a PEFT KaSA model whose frozen base weights stay on the meta device (the regularizer reads
only lora_A, lora_B and lora_diag, so no 7B weights and no SVDs are needed). Ours is kasa_kernels.kasa_regularizer
on that same PEFT model; the peer is PEFT's LoraModel._get_kasa_loss. The two losses are checked to agree.

train_step: a transformers LlamaForCausalLM built from a LlamaConfig (no download) at real width (hidden 4096, MLP
11008, 32 heads) with 2 layers on CUDA, tiny on CPU; all 7 projections of every layer adapted with r = 16. One step
is forward with labels + regularizer + backward + AdamW step. PEFT KaSA (get_peft_model + _get_kasa_loss) against
kasa_kernels.inject (+ kasa_regularizer), for every usable backend. Reports tokens/s and peak memory.
"""
from __future__ import annotations

import copy
import gc
import math
from typing import Callable, Dict, List

import torch
import torch.nn as nn

from .timing import Timer, quantiles

REG_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj")
TRAIN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _usable_backends(device: torch.device) -> List[str]:
    import kasa_kernels as kk

    return [n for n, info in kk.backends(device).items() if info.available]


def _mem_before(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.memory_allocated(device)
    return 0


def _peak_since(device, before: int, fn: Callable[[], object]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    from .timing import LiveTensorBytes

    tr = LiveTensorBytes()
    with tr:
        fn()
    return tr.peak / 2**20


# ----------------------------------------------------------------------------------------------------------------
# Regularizer


class _Block(nn.Module):
    def __init__(self, hidden: int, mlp: int):
        super().__init__()
        for name in REG_TARGETS:
            k, n = (hidden, mlp) if name == "up_proj" else (hidden, hidden)
            setattr(self, name, nn.Linear(k, n, bias=False))


class _Stack(nn.Module):
    def __init__(self, layers: int, hidden: int, mlp: int):
        super().__init__()
        self.layers = nn.ModuleList([_Block(hidden, mlp) for _ in range(layers)])


def peft_adapter_model(layers: int, hidden: int, mlp: int, r: int, device: torch.device, seed: int = 0):
    """A PEFT KaSA model with real adapters on `device` and meta base weights."""
    from peft import KasaConfig, LoraConfig, get_peft_model

    with torch.device("meta"):
        base = _Stack(layers, hidden, mlp)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(REG_TARGETS), kasa_config=KasaConfig())
    model = get_peft_model(base, cfg, low_cpu_mem_usage=True)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        diag = getattr(m, "lora_diag", None)
        if not isinstance(diag, nn.ParameterDict):
            continue
        for name in list(diag.keys()):
            a = m.lora_A[name].weight
            b = m.lora_B[name].weight
            m.lora_A[name].weight = nn.Parameter((torch.rand(a.shape, generator=g) * 2 - 1) / math.sqrt(a.shape[1]))
            m.lora_B[name].weight = nn.Parameter(torch.randn(b.shape, generator=g) * 0.02)
            m.lora_diag[name] = nn.Parameter(torch.randn(diag[name].shape, generator=g))
            m._lora_kasa_truncation_deferred = set()  # no base weight to truncate: it is never used here
    for p_name, p in list(model.named_parameters()):
        if "lora_" in p_name:
            p.data = p.data.to(device)
    return model


def bench_regularizer(device: torch.device, small: bool, timer: Timer, log, args) -> List[Dict]:
    import kasa_kernels as kk

    layers, hidden, mlp, r = (32, 256, 688, 8) if small else (32, 4096, 11008, 16)
    model = peft_adapter_model(layers, hidden, mlp, r, device)
    params = [p for n, p in model.named_parameters() if "lora_" in n]

    def reset():
        for p in params:
            p.grad = None

    variants: Dict[str, Callable[[], object]] = {}
    variants["peft"] = lambda: model.base_model._get_kasa_loss().backward()
    for b in _usable_backends(device):
        variants[f"kasa_kernels[{b}]"] = (lambda b=b: kk.kasa_regularizer(model, backend=b).backward())
    with torch.no_grad():
        ref = float(model.base_model._get_kasa_loss())
        agree = {n: float(kk.kasa_regularizer(model, backend=n.split("[")[1][:-1])) for n in variants if n != "peft"}
    names = list(variants)
    for n in names:
        for _ in range(args.warmup):
            reset()
            variants[n]()
    timer.sync()
    est = max(timer.estimate_ms(variants[n], reset) for n in names)
    reps = int(max(args.min_reps, min(args.max_reps, args.rep_ms / max(est, 1e-3))))
    samples = timer.run_interleaved([variants[n] for n in names], [reset] * len(names), reps)
    rows = []
    for n, s in zip(names, samples):
        q = quantiles(s)
        peak = _peak_since(device, _mem_before(device), lambda: (reset(), variants[n]()))
        rows.append({
            "kind": "regularizer", "provider": n, "layers": layers, "targets_per_layer": len(REG_TARGETS),
            "hidden": hidden, "mlp": mlp, "r": r, **q, "peak_mem_mb": peak, "reps": len(s),
            "peak_mem_note": "memory allocated by loss + backward beyond the resident adapters",
            "loss": ref if n == "peft" else agree[n], "loss_rel_diff_vs_peft": 0.0 if n == "peft"
            else abs(agree[n] - ref) / max(abs(ref), 1e-30),
        })
    line = "  ".join(f"{r_['provider']} {r_['ms_median']:.3f}" for r_ in rows)
    log(f"  regularizer {layers} layers x {len(REG_TARGETS)} targets (hidden {hidden}, r {r}) ms: {line}")
    del model, params, variants
    gc.collect()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Training step


def _llama(small: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if small:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype=dtype)
    return model, cfg


def _build_variant(name: str, base: nn.Module, r: int):
    import kasa_kernels as kk

    model = copy.deepcopy(base)
    if name == "peft":
        from peft import KasaConfig, LoraConfig, get_peft_model

        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TRAIN_TARGETS), kasa_config=KasaConfig())
        model = get_peft_model(model, cfg)
        reg = model.base_model._get_kasa_loss
    else:
        backend = name.split("[")[1][:-1]
        kk.inject(model, target_modules=list(TRAIN_TARGETS), r=r, alpha=2 * r, backend=backend)
        reg = lambda: kk.kasa_regularizer(model, backend=backend)  # noqa: E731
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, reg, opt


def bench_train_step(device: torch.device, small: bool, timer: Timer, log, args) -> List[Dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, seq, r = (2, 64, 8) if small else (4, 1024, 16)
    base, cfg = _llama(small, device, dtype)
    base.requires_grad_(False)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    names = ["peft"] + [f"kasa_kernels[{b}]" for b in _usable_backends(device)]
    built = {}
    for n in names:
        try:
            built[n] = _build_variant(n, base, r)
        except Exception as e:
            log(f"  train_step {n}: skipped ({type(e).__name__}: {e})")
    del base
    gc.collect()

    def stepper(model, reg, opt):
        def step():
            opt.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss + reg()
            loss.backward()
            opt.step()
        return step

    steps = {n: stepper(*v) for n, v in built.items()}
    live = list(steps)
    for n in live:
        for _ in range(max(2, args.warmup)):
            steps[n]()
    timer.sync()
    est = max(timer.estimate_ms(steps[n], None, n=1) for n in live)
    reps = int(max(3, min(args.max_reps, args.rep_ms / max(est, 1e-3))))
    samples = timer.run_interleaved([steps[n] for n in live], [None] * len(live), reps)
    stats = {n: quantiles(s) for n, s in zip(live, samples)}
    rows = []
    # Peak memory one variant at a time, from an empty device: weights, optimizer state and activations count.
    for n in live:
        model, reg, opt = built.pop(n)
        step = steps.pop(n)
        others = sum(_resident_bytes(m, o) for m, _, o in built.values())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize(device)
            # everything this variant holds (weights, grads, optimizer state, activations) at its peak; the
            # variants not yet measured are still resident and are subtracted
            flush = timer.flush_buf.numel() * timer.flush_buf.element_size() if timer.flush_buf is not None else 0
            peak = (torch.cuda.max_memory_allocated(device) - others - flush) / 2**20
        else:
            peak = _peak_since(device, 0, step)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        q = stats[n]
        rows.append({
            "kind": "train_step", "provider": n, "model": "LlamaForCausalLM", "hidden": cfg.hidden_size,
            "mlp": cfg.intermediate_size, "layers": cfg.num_hidden_layers, "vocab": cfg.vocab_size,
            "batch": batch, "seq": seq, "r": r, "dtype": str(dtype).replace("torch.", ""),
            "targets": list(TRAIN_TARGETS), "trainable_params": trainable, **q,
            "tokens_per_s": batch * seq / (q["ms_median"] / 1e3), "peak_mem_mb": peak, "reps": len(samples[0]),
        })
        del model, reg, opt, step
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    line = "  ".join(f"{r_['provider']} {r_['tokens_per_s']:.0f} tok/s" for r_ in rows)
    log(f"  train_step Llama hidden {cfg.hidden_size} x {cfg.num_hidden_layers} layers, {batch}x{seq} tokens: {line}")
    return rows


def _resident_bytes(model: nn.Module, opt: torch.optim.Optimizer) -> int:
    ts = list(model.parameters()) + list(model.buffers())
    ts += [p.grad for p in model.parameters() if p.grad is not None]
    ts += [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in ts if t.device.type != "meta")


def run_all(device: torch.device, small: bool, timer: Timer, log, args) -> List[Dict]:
    rows: List[Dict] = []
    try:
        import peft  # noqa: F401
    except ImportError:
        log("  whole-model runs skipped: peft is not installed (they compare against PEFT KaSA)")
        return rows
    for fn in (bench_regularizer, bench_train_step):
        try:
            rows += fn(device, small, timer, log, args)
        except Exception as e:
            log(f"  {fn.__name__} failed: {type(e).__name__}: {e}")
            rows.append({"kind": fn.__name__.replace("bench_", ""), "provider": None, "error": f"{type(e).__name__}: {e}"})
    return rows
