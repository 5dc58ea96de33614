"""examples/trainer_finetune.py (Trainer / SFTTrainer with KasaCallback) and examples/export_and_serve.py (export a
KaSA model as plain LoRA, serve it through PEFT's LoRA loader), run offline on CPU at a small size."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from helpers import assert_within_ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--steps", "6", "--batch-size", "2", "--grad-accum", "2", "--seq-len", "16", "--hidden-size", "32",
         "--r", "4", "--lr", "1e-2", "--beta", "0.05", "--gamma", "0.05"]


def load(name):
    spec = importlib.util.spec_from_file_location(f"kasa_example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def without_callback():
    return load("trainer_finetune").main(SMALL + ["--no-callback"])


def check_run(run, plain, tag):
    losses = run["losses"]
    print(tag, "losses", losses, "regularizer", run["regularizer_before"], "->", run["regularizer_after"],
          "without the callback ->", plain["regularizer_after"])
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2  # it learns
    # at the start lora_B = 0 leaves lora_diag without a task gradient: only the regularizer (beta ||d||^2) moves it,
    # so with the callback the regularizer falls well below what training without it leaves
    assert run["regularizer_after"] < plain["regularizer_after"] - 0.02
    assert run["regularizer_after"] < run["regularizer_before"] - 0.02


def test_trainer_example_applies_the_regularizer(without_callback):
    check_run(load("trainer_finetune").main(SMALL), without_callback, "Trainer")


def test_sft_trainer_example_applies_the_regularizer(without_callback):
    pytest.importorskip("trl")
    check_run(load("trainer_finetune").main(SMALL + ["--trainer", "sft"]), without_callback, "SFTTrainer")


def test_export_and_serve_example(tmp_path):
    out = load("export_and_serve").main(["--out", str(tmp_path), "--steps", "3", "--seq-len", "16",
                                         "--hidden-size", "32", "--r", "4"])
    assert sorted(os.listdir(tmp_path)) == ["lora_official", "lora_peft", "merged"]
    for mode, served in out["served"].items():
        assert_within_ref(f"served {mode}", served, out["kasa64"][mode], out["kasa"][mode], torch.float32)
    assert_within_ref("merged", out["merged"], out["kasa64"]["peft"], out["kasa"]["peft"], torch.float32)
