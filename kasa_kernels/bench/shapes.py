"""Benchmark cases: the primary shape P, the M / r / dropout / dtype sweeps and the (K, N) pairs of real models.

A case is one KaSA linear layer: x (M, K), W (N, K), rank r, adapter dropout p, activation dtype. Every figure the
harness prints names its case, because the adapter's relative cost grows as K and N shrink.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

DTYPES: Dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass(frozen=True)
class Case:
    M: int
    K: int
    N: int
    r: int
    dropout: float
    dtype: str  # a key of DTYPES
    tag: str = ""  # where the (K, N) pair comes from, e.g. "llama2-7b.down"

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key(self) -> Tuple:
        return (self.M, self.K, self.N, self.r, self.dropout, self.dtype)

    def __str__(self) -> str:
        t = f" [{self.tag}]" if self.tag else ""
        return f"M={self.M} K={self.K} N={self.N} r={self.r} p={self.dropout:g} {self.dtype}{t}"


# The primary shape of docs/design.md's targets table.
P = dict(M=8192, K=4096, N=4096, r=16, dropout=0.0)

# (K, N) = (in_features, out_features) of the adapted projections, nn.Linear convention.
MODEL_SHAPES: Dict[str, Dict[str, Tuple[int, int]]] = {
    # hidden 4096, MLP 11008, 32 heads, no GQA
    "llama2-7b": {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
                  "up": (4096, 11008), "down": (11008, 4096)},
    # hidden 4096, MLP 14336, 8 KV heads x 128
    "llama3-8b": {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
                  "up": (4096, 14336), "down": (14336, 4096)},
    # same widths as Llama-3-8B (hidden 4096, MLP 14336, 8 KV heads)
    "mistral-7b": {"q": (4096, 4096), "k": (4096, 1024), "v": (4096, 1024), "o": (4096, 4096),
                   "up": (4096, 14336), "down": (14336, 4096)},
    "roberta-base": {"q": (768, 768), "k": (768, 768), "v": (768, 768), "o": (768, 768),
                     "up": (768, 3072), "down": (3072, 768)},
    "roberta-large": {"q": (1024, 1024), "k": (1024, 1024), "v": (1024, 1024), "o": (1024, 1024),
                      "up": (1024, 4096), "down": (4096, 1024)},
    # GPT-2 small: fused c_attn (768 -> 2304), attention c_proj, mlp c_fc / c_proj
    "gpt2": {"c_attn": (768, 2304), "attn.c_proj": (768, 768), "c_fc": (768, 3072), "mlp.c_proj": (3072, 768)},
}

M_SWEEP = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
R_SWEEP = (4, 8, 16, 32, 64, 128)
DROPOUTS = (0.0, 0.1)
PRESETS = ("cpu", "p", "sweep", "full")


def model_pairs(models: Iterable[str] = MODEL_SHAPES) -> List[Tuple[int, int, str]]:
    """Distinct (K, N) pairs with the first model/projection that uses each, in table order."""
    seen = {}
    for model in models:
        for proj, (k, n) in MODEL_SHAPES[model].items():
            seen.setdefault((k, n), f"{model}.{proj}")
    return [(k, n, tag) for (k, n), tag in seen.items()]


def _dedupe(cases: Sequence[Case]) -> List[Case]:
    out, seen = [], set()
    for c in cases:
        if c.key() not in seen:
            seen.add(c.key())
            out.append(c)
    return out


def p_cases(dtypes: Sequence[str] = ("bf16",)) -> List[Case]:
    """P with and without dropout, plus two decode sizes (M <= 64) at P's width."""
    out = []
    for dt in dtypes:
        for p in DROPOUTS:
            out.append(Case(P["M"], P["K"], P["N"], P["r"], p, dt, "P"))
        for m in (16, 64):
            out.append(Case(m, P["K"], P["N"], P["r"], 0.0, dt, "decode"))
    return out


def sweep_cases(dtypes: Sequence[str] = ("bf16",)) -> List[Case]:
    out = p_cases(dtypes)
    for dt in dtypes:
        out += [Case(m, P["K"], P["N"], P["r"], 0.0, dt, "M-sweep") for m in M_SWEEP]
        out += [Case(P["M"], P["K"], P["N"], r, 0.0, dt, "r-sweep") for r in R_SWEEP]
        for k, n, tag in model_pairs():
            for p in DROPOUTS:
                out.append(Case(P["M"], k, n, P["r"], p, dt, tag))
    return _dedupe(out)


def full_cases(dtypes: Sequence[str] = ("bf16", "fp16", "fp32")) -> List[Case]:
    out = sweep_cases(("bf16",))
    for dt in dtypes:
        out += p_cases((dt,))
        out += [Case(m, k, n, P["r"], 0.0, dt, tag) for k, n, tag in model_pairs() for m in (512, 4096, 16384)]
        out += [Case(P["M"], P["K"], P["N"], r, 0.1, dt, "r-sweep") for r in R_SWEEP]
    return _dedupe(out)


def cpu_cases(dtypes: Sequence[str] = ("fp32", "bf16")) -> List[Case]:
    """The CPU subset: a small layer, a RoBERTa-base projection at 1024 tokens and a 2048-wide layer at 512 tokens,
    each with dropout 0 and 0.1. It shows the harness and the relative cost of the unfused compositions on CPU (the
    torch backend is what `auto` runs there), not GPU performance."""
    out = []
    for dt in dtypes:
        for p in DROPOUTS:
            out.append(Case(256, 256, 256, 16, p, dt, "cpu-small"))
            out.append(Case(1024, 768, 768, 16, p, dt, "roberta-base.q"))
            out.append(Case(512, 2048, 2048, 16, p, dt, "cpu-wide"))
    return _dedupe(out)


def preset_cases(preset: str, dtypes: Sequence[str] = ()) -> List[Case]:
    if preset == "cpu":
        return cpu_cases(dtypes or ("fp32", "bf16"))
    if preset == "p":
        return p_cases(dtypes or ("bf16",))
    if preset == "sweep":
        return sweep_cases(dtypes or ("bf16",))
    if preset == "full":
        return full_cases(dtypes or ("bf16", "fp16", "fp32"))
    raise ValueError(f"--preset: expected one of {PRESETS}, got {preset!r}")


def parse_shape(text: str, dropouts: Sequence[float], dtypes: Sequence[str]) -> List[Case]:
    """'M,K,N,r' (or 'MxKxNxr') -> one case per dropout and dtype."""
    parts = text.replace("x", ",").split(",")
    if len(parts) != 4 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--shape: expected M,K,N,r (four positive ints), got {text!r}")
    m, k, n, r = (int(p) for p in parts)
    if min(m, k, n, r) <= 0 or r >= min(k, n):
        raise ValueError(f"--shape {text!r}: expected positive sizes and r < min(K, N)")
    return [Case(m, k, n, r, p, dt, "custom") for dt in dtypes for p in dropouts]
