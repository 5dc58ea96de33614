"""Fine-tune a causal LM with PEFT's KaSA in a stock transformers Trainer (or trl's SFTTrainer), regularizer included:
one callback, `callbacks=[KasaCallback()]`, runs the KaSA layers through kasa_kernels and adds each adapter's
regularizer gradient (beta, gamma from its KasaConfig) to every step. Without it, PEFT trains KaSA without its
regularizer.

Offline on CPU (a small Llama built from a config, byte-level tokens, the bundled examples/data/tiny.txt):

    python examples/trainer_finetune.py --steps 20
    python examples/trainer_finetune.py --steps 20 --trainer sft        # trl.SFTTrainer (pip install trl)
    python examples/trainer_finetune.py --steps 20 --no-callback        # PEFT alone: no regularizer

It prints the Trainer's loss log and the regularizer before and after; --save DIR writes the PEFT KaSA adapter
(PeftModel.save_pretrained), which kasa_kernels.integrations.peft.export_lora_adapter turns into a plain LoRA adapter
for serving (examples/export_and_serve.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DATA = os.path.join(HERE, "data", "tiny.txt")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainer", choices=["trainer", "sft"], default="trainer")
    p.add_argument("--model", default=None, help="hub model name or local path; default: a small Llama from config")
    p.add_argument("--data", default=DEFAULT_DATA, help="a UTF-8 text file to train on")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--beta", type=float, default=1e-4, help="KasaConfig.beta (weight of ||lora_diag||^2)")
    p.add_argument("--gamma", type=float, default=1e-3, help="KasaConfig.gamma (weight of the orthogonality terms)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-callback", action="store_true", help="train without KasaCallback (no regularizer)")
    p.add_argument("--save", default=None, help="write the trained PEFT KaSA adapter here")
    return p.parse_args(argv)


def build_peft_model_and_rows(args):
    """(PEFT KaSA model, token windows): the model and data of examples/finetune.py (a small Llama from a config and
    the bytes of --data, or --model from the hub with its tokenizer), cut into windows of --seq-len tokens."""
    from peft import KasaConfig, LoraConfig, get_peft_model

    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    from finetune import build_model_and_tokens

    model, ids, _ = build_model_and_tokens(args)
    if ids.numel() < 2 * args.seq_len:
        raise ValueError(f"--data has {ids.numel()} tokens; need at least {2 * args.seq_len}")
    rows = ids[: ids.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len).tolist()
    lora = LoraConfig(r=args.r, lora_alpha=args.alpha, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      kasa_config=KasaConfig(beta=args.beta, gamma=args.gamma))
    return get_peft_model(model, lora), rows


def tokenizer(args):
    """--model's tokenizer, or a byte-level one built in memory for the config-built model (trl's SFTTrainer wants a
    processing class; nothing is downloaded)."""
    import transformers
    from tokenizers import Tokenizer, models

    if args.model is not None:
        return transformers.AutoTokenizer.from_pretrained(args.model)
    vocab = {f"<{i}>": i for i in range(256)}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<0>")),
                                                pad_token="<0>", eos_token="<1>")


def make_trainer(args, model, rows, out_dir, callbacks):
    common = dict(output_dir=out_dir, per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.lr,
                  bf16=args.bf16, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
                  logging_steps=1, disable_tqdm=True, seed=args.seed)
    if args.trainer == "sft":
        import datasets
        import trl

        return trl.SFTTrainer(model=model, args=trl.SFTConfig(max_length=None, **common),
                              train_dataset=datasets.Dataset.from_dict({"input_ids": rows}),
                              processing_class=tokenizer(args), callbacks=callbacks)
    import transformers

    data = [{"input_ids": torch.tensor(r), "labels": torch.tensor(r)} for r in rows]
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**common), train_dataset=data,
                                callbacks=callbacks)


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    import kasa_kernels as kk
    from kasa_kernels.integrations.transformers import KasaCallback

    model, rows = build_peft_model_and_rows(args)
    with torch.no_grad():
        reg_before = kk.kasa_regularizer(model).item()  # beta/gamma from the adapter's KasaConfig
    callbacks = [] if args.no_callback else [KasaCallback()]
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = make_trainer(args, model, rows, out_dir, callbacks)
        trainer.train()
    with torch.no_grad():
        reg_after = kk.kasa_regularizer(model).item()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"{args.trainer}: {len(losses)} steps, task loss {losses[0]:.4f} -> {losses[-1]:.4f}; KaSA regularizer "
          f"{reg_before:.5f} -> {reg_after:.5f} ({'with' if callbacks else 'without'} KasaCallback)", file=sys.stderr)
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved the PEFT KaSA adapter to {args.save}", file=sys.stderr)
    return {"losses": losses, "regularizer_before": reg_before, "regularizer_after": reg_after, "model": model}


if __name__ == "__main__":
    main()
