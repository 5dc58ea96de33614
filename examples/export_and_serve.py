"""Serve KaSA on the untouched base model with any LoRA server: export, then load through PEFT's LoRA loader.

A KaSA layer is W_truncated + s (B * d) A. export_lora_adapter writes it as the ORIGINAL weight plus one low-rank
update per layer (the KaSA update and the truncation residual W_original - W_truncated), i.e. a plain PEFT LoRA
adapter: vLLM, TGI or PEFT serve it on the base model they already hold, several tenants at once.

Offline on CPU (a small Llama built from a config, trained a few steps on the bundled examples/data/tiny.txt):

    python examples/export_and_serve.py --out /tmp/kasa_export

It trains two KaSA models (truncation "peft" and "official"), exports each as a LoRA adapter, serves both in one
mixed batch on one untouched base model through PEFT (adapter_names per row), writes a merged plain transformers
model of the first, and prints the largest difference of every served output from its KaSA model.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "tiny.txt")
MODES = ("peft", "official")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="directory for the LoRA adapters and the merged model")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--steps", type=int, default=10, help="training steps per KaSA model")
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def base_model_and_tokens(args):
    """The small Llama from a config and the byte tokens of examples/finetune.py."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from finetune import build_model_and_tokens

    model, tokens, _ = build_model_and_tokens(argparse.Namespace(model=None, data=args.data, seed=args.seed,
                                                                 hidden_size=args.hidden_size, layers=2,
                                                                 seq_len=args.seq_len))
    return model.eval(), tokens


def train_kasa(original, tokens, mode, args):
    """A few AdamW steps of task loss + KaSA regularizer on every projection of the base model (non-square layers
    included), truncation `mode`."""
    import kasa_kernels as kk

    model = kk.inject(copy.deepcopy(original), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"], r=args.r, alpha=2 * args.r, truncation=mode)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.steps):
        starts = torch.randint(0, tokens.numel() - args.seq_len, (4,), generator=g).tolist()
        batch = torch.stack([tokens[s:s + args.seq_len] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss + kk.kasa_regularizer(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    import transformers
    from peft import PeftModel

    import kasa_kernels as kk
    from kasa_kernels.integrations.peft import export_lora_adapter

    original, tokens = base_model_and_tokens(args)
    kasa_models = {mode: train_kasa(original, tokens, mode, args) for mode in MODES}
    for mode, model in kasa_models.items():
        export_lora_adapter(model, original, os.path.join(args.out, f"lora_{mode}"))

    # one untouched base model, two tenants, one mixed batch: row i uses adapter MODES[i]
    served = PeftModel.from_pretrained(copy.deepcopy(original), os.path.join(args.out, f"lora_{MODES[0]}"),
                                       adapter_name=MODES[0])
    for mode in MODES[1:]:
        served.load_adapter(os.path.join(args.out, f"lora_{mode}"), adapter_name=mode)
    served.eval()
    ids = tokens[: 2 * args.seq_len].view(len(MODES), args.seq_len)
    with torch.no_grad():
        mixed = served(ids, adapter_names=list(MODES)).logits
        kasa = {mode: m(ids).logits[i] for i, (mode, m) in enumerate(kasa_models.items())}
        kasa64 = {mode: copy.deepcopy(m).double()(ids).logits[i] for i, (mode, m) in enumerate(kasa_models.items())}

    merged_dir = os.path.join(args.out, "merged")
    kk.merge_and_unload(copy.deepcopy(kasa_models[MODES[0]])).save_pretrained(merged_dir)
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        merged_out = merged(ids).logits[0]

    served_out = {mode: mixed[i] for i, mode in enumerate(MODES)}
    for mode in MODES:
        print(f"LoRA-served tenant {mode!r}: max |served - KaSA| = "
              f"{(served_out[mode] - kasa[mode]).abs().max().item():.2e} (logits up to "
              f"{kasa[mode].abs().max().item():.2f})", file=sys.stderr)
    print(f"merged plain model ({merged_dir}): max |merged - KaSA| = "
          f"{(merged_out - kasa[MODES[0]]).abs().max().item():.2e}", file=sys.stderr)
    return {"served": served_out, "merged": merged_out, "kasa": kasa, "kasa64": kasa64}


if __name__ == "__main__":
    main()
