"""A memory MODEL (arithmetic from parameter and activation bytes, not a measurement) of fine-tuning Llama-3-8B with
KaSA on q, k, v, o, up and down at sequence 2048, for a 24 GB card (RTX 3090 / 4090: 24 GiB).

    python -m kasa_kernels.bench.memory_model        # prints README.md's table

What it counts (bytes; GiB = 2^30 bytes):
- base weights: the decoder's linear layers in NF4 (a nibble per weight, a uint8 scale code per 64, an fp32 per 256
  codes: double quantization) or bf16; embeddings and lm_head in bf16 (bitsandbytes leaves them unquantized);
- adapters: r (K + N + 1) fp32 parameters per adapted layer, with their gradient and AdamW's two moments (16 B each);
- activations saved for backward per decoder layer, bf16, as transformers' Llama computes it with our layers (which
  keep x and H = dropout(x) A^T, M x r fp32, and no dequantized weight): the attention norm's input and output, q and
  k and v after RoPE, the attention output and its reshaped copy (o_proj's input), the MLP norm's input and output,
  gate and up outputs, SiLU(gate), and down_proj's input; plus H of the six KaSA layers;
- with activation checkpointing per decoder layer: each layer's input, plus one layer's activations recomputed at a
  time during backward;
- the loss: bf16 logits, their fp32 copy and the fp32 log-softmax cross-entropy keeps (T x vocab each).
Not counted: the CUDA context and allocator slack (RESERVE_GIB is held back for them), transient gradients of one
layer's activations, and a bf16 N x K dequantized weight that the torch and cuda backends (and bitsandbytes itself)
build per call (at most 4096 x 14336 x 2 B = 0.11 GiB; the triton backend dequantizes inside its GEMM instead).
"""
from __future__ import annotations

from typing import List, NamedTuple

GIB = 2.0**30
CARD_GIB = 24.0
RESERVE_GIB = 1.0  # CUDA context (~0.3-0.5 GiB) and allocator fragmentation

# Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json)
HIDDEN, INTERMEDIATE, LAYERS, KV_DIM, VOCAB = 4096, 14336, 32, 1024, 128256
# (K, N) of every linear layer of one decoder layer; KaSA on all but gate_proj
LINEARS = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, KV_DIM), "v_proj": (HIDDEN, KV_DIM),
           "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTERMEDIATE), "up_proj": (HIDDEN, INTERMEDIATE),
           "down_proj": (INTERMEDIATE, HIDDEN)}
ADAPTED = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
BF16 = 2


class Row(NamedTuple):
    base: str  # "nf4" | "bf16"
    checkpointing: bool
    batch: int
    weights_gib: float
    adapter_gib: float  # parameters, gradients and AdamW state
    activations_gib: float  # saved for backward, plus the loss
    total_gib: float

    @property
    def fits(self) -> bool:
        return self.total_gib <= CARD_GIB - RESERVE_GIB


def base_bytes(base: str) -> float:
    per_weight = NF4_BYTES if base == "nf4" else BF16
    linear = LAYERS * sum(k * n for k, n in LINEARS.values()) * per_weight
    return linear + 2 * VOCAB * HIDDEN * BF16  # embed_tokens and lm_head


def adapter_bytes(r: int) -> float:
    params = LAYERS * sum(r * (LINEARS[m][0] + LINEARS[m][1] + 1) for m in ADAPTED)
    return 16.0 * params  # fp32 parameter, gradient, AdamW exp_avg and exp_avg_sq


def layer_activation_bytes(tokens: int, r: int) -> float:
    """What one decoder layer saves for backward (module docstring), in bytes."""
    hidden_sized = 2 + 1 + 2 * KV_DIM / HIDDEN + 2 + 2  # norm in/out, q + k + v, attn out + copy, MLP norm in/out
    intermediate_sized = 4  # gate, up, SiLU(gate), down's input
    return tokens * (BF16 * (hidden_sized * HIDDEN + intermediate_sized * INTERMEDIATE) + 4 * r * len(ADAPTED))


def loss_bytes(tokens: int) -> float:
    return tokens * VOCAB * (BF16 + 4 + 4)


def row(base: str, checkpointing: bool, batch: int, seq: int = 2048, r: int = 16) -> Row:
    tokens = batch * seq
    per_layer = layer_activation_bytes(tokens, r)
    saved = LAYERS * tokens * HIDDEN * BF16 + per_layer if checkpointing else LAYERS * per_layer
    acts = saved + loss_bytes(tokens)
    weights, adapter = base_bytes(base), adapter_bytes(r)
    return Row(base, checkpointing, batch, weights / GIB, adapter / GIB, acts / GIB, (weights + adapter + acts) / GIB)


def rows() -> List[Row]:
    return [row(base, ckpt, batch) for base in ("nf4", "bf16") for ckpt in (False, True) for batch in (1, 2, 4)]


def markdown_table() -> str:
    header = ("| base | activation checkpointing | batch x 2048 tokens | weights GiB | adapters + AdamW GiB | "
              "activations + loss GiB | total GiB | fits 24 GiB (1 GiB reserve) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for x in rows():
        lines.append(f"| {x.base} | {'yes' if x.checkpointing else 'no'} | {x.batch} | {x.weights_gib:.2f} | "
                     f"{x.adapter_gib:.2f} | {x.activations_gib:.2f} | {x.total_gib:.2f} | "
                     f"{'yes' if x.fits else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
