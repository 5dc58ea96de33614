"""Fine-tune a transformers causal LM with KaSA through kasa_kernels: task loss + KaSA regularizer.

Offline on CPU (a small Llama built from a config, byte-level tokens, the bundled examples/data/tiny.txt):

    python examples/finetune.py --steps 30
    python examples/finetune.py --steps 30 --backend torch --log-json curve.jsonl

With a hub model (needs network or a local cache):

    python examples/finetune.py --model Qwen/Qwen2.5-0.5B --device cuda --dtype bf16 --targets q_proj v_proj

Each step logs the total loss, the task loss, the regularizer and tokens/s. --save DIR writes a PEFT adapter
(adapter_model.safetensors + adapter_config.json) that PeftModel.from_pretrained loads on the original model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "tiny.txt")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub model name or local path; default: a small Llama from config")
    p.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8 text file to train on")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", nargs="+", default=None, help="target module names (default: per model type)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta", type=float, default=1e-4, help="regularizer weight on ||lora_diag||^2")
    p.add_argument("--gamma", type=float, default=1e-3, help="regularizer weight on the orthogonality terms")
    p.add_argument("--backend", default="auto", help="auto | torch | triton | cuda")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="autocast compute dtype (fp16 uses a GradScaler); adapters stay fp32")
    p.add_argument("--hidden-size", type=int, default=64, help="width of the config-built model")
    p.add_argument("--layers", type=int, default=2, help="depth of the config-built model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--log-json", default=None, help="append one JSON record per logged step to this file")
    p.add_argument("--save", default=None, help="write the trained adapter here in PEFT format")
    return p.parse_args(argv)


def build_model_and_tokens(args):
    """(model, 1-D LongTensor of token ids, tokens description)."""
    import transformers

    with open(args.data, encoding="utf-8") as f:
        text = f.read()
    if args.model is None:
        torch.manual_seed(args.seed)
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=args.hidden_size, intermediate_size=2 * args.hidden_size,
            num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=max(64, args.seq_len),
        )
        model = transformers.LlamaForCausalLM(config)
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        return model, ids, "bytes"
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    return model, ids, type(tok).__name__


def batches(ids: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Random windows of the token stream, reproducible from the seed."""
    if ids.numel() <= seq_len:
        raise ValueError(f"--data has {ids.numel()} tokens; need more than --seq-len {seq_len}")
    g = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=g)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def main(argv: Optional[List[str]] = None) -> List[dict]:
    args = parse_args(argv)
    import kasa_kernels as kk
    from kasa_kernels.integrations.peft import save_peft_adapter
    from kasa_kernels.integrations.transformers import inject_kasa

    model, ids, tokens = build_model_and_tokens(args)
    model = inject_kasa(model, args.targets, r=args.r, alpha=args.alpha, dropout=args.dropout, backend=args.backend)
    device = torch.device(args.device)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_layers = sum(isinstance(m, kk.KasaLinear) for m in model.modules())
    print(f"model: {args.model or 'Llama from config'} ({tokens} tokens, {ids.numel()} in the data); "
          f"{n_layers} KaSA layers, {sum(p.numel() for p in params)} trainable parameters; backend {args.backend} "
          f"-> {kk.backends(device)}", file=sys.stderr)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    torch.manual_seed(args.seed)  # dropout seeds
    data = batches(ids, args.batch_size, args.seq_len, args.seed)
    records = []
    log = open(args.log_json, "a") if args.log_json else None
    for step in range(1, args.steps + 1):
        batch = next(data).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            task = model(input_ids=batch, labels=batch).loss
        reg = kk.kasa_regularizer(model, beta=args.beta, gamma=args.gamma, backend=args.backend)
        loss = task.float() + reg
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rec = {"step": step, "loss": loss.item(), "task_loss": task.item(), "regularizer": reg.item(),
               "tokens_per_s": batch.numel() / dt}
        if not math.isfinite(rec["loss"]):
            raise FloatingPointError(f"step {step}: loss is {rec['loss']}")
        records.append(rec)
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {rec['loss']:.4f}  task {rec['task_loss']:.4f}  "
                  f"reg {rec['regularizer']:.5f}  {rec['tokens_per_s']:.0f} tok/s", flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
    if log:
        log.close()
    if args.save:
        save_peft_adapter(model, args.save, beta=args.beta, gamma=args.gamma, base_model_name_or_path=args.model,
                          task_type="CAUSAL_LM")
        print(f"saved a PEFT adapter to {args.save}", file=sys.stderr)
    return records


if __name__ == "__main__":
    main()
