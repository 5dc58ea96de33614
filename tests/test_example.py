"""examples/finetune.py: a few CPU steps of the offline configuration.

The loss curve must go down, be reproducible, equal the curve of the same training with every KasaLinear and the
regularizer replaced by python/kasa_reference's formulas, and equal the torch backend's curve on every other
backend that can run here (triton under the CPU interpreter, in a subprocess; the fused GPU backends on a GPU).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import kasa_kernels as kk  # noqa: E402
from kasa_kernels._backend import NAMES as BACKENDS  # noqa: E402
from kasa_reference import kasa_linear_ref, regularizer_ref  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "finetune.py")
SMALL = ["--steps", "8", "--batch-size", "4", "--seq-len", "24", "--hidden-size", "32", "--r", "4", "--lr", "1e-2"]


def load_example():
    spec = importlib.util.spec_from_file_location("kasa_finetune_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def losses(records):
    return [r["loss"] for r in records]


def test_loss_curve_goes_down_and_is_reproducible(capsys):
    ex = load_example()
    recs = ex.main(SMALL + ["--backend", "torch"])
    out = capsys.readouterr().out
    assert "tok/s" in out and "reg" in out
    assert len(recs) == 8
    assert all(r["tokens_per_s"] > 0 and r["regularizer"] > 0 for r in recs)
    for r in recs:
        assert r["loss"] == pytest.approx(r["task_loss"] + r["regularizer"], rel=1e-5)
    curve = losses(recs)
    print("loss curve", curve)
    assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.05
    assert losses(ex.main(SMALL + ["--backend", "torch"])) == curve


def test_loss_curve_matches_reference_formulas(monkeypatch):
    ex = load_example()
    ours = losses(ex.main(SMALL + ["--backend", "torch"]))

    def ref_forward(self, x):
        return kasa_linear_ref(x, self.weight, self.bias, self.lora_A, self.lora_diag, self.lora_B, self.scaling)

    def ref_regularizer(model, beta=1e-4, gamma=1e-3, form="paper", backend="auto"):
        layers = [(m.lora_A, m.lora_B, m.lora_diag) for m in model.modules() if isinstance(m, kk.KasaLinear)]
        return regularizer_ref(layers, beta, gamma, form)

    monkeypatch.setattr(kk.KasaLinear, "forward", ref_forward)
    monkeypatch.setattr(kk, "kasa_regularizer", ref_regularizer)
    ref = losses(ex.main(SMALL + ["--backend", "torch"]))
    print("ours", ours)
    print("ref ", ref)
    # fp32 both ways; 8 Adam steps amplify rounding differences only slightly at this size
    assert ours == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert ours != pytest.approx([ours[0]] * len(ours), abs=1e-3)  # the curve moves


def _run_subprocess(backend, extra_env, tmp_path):
    log = tmp_path / f"{backend}.jsonl"
    env = dict(os.environ, **extra_env)
    steps = ["--steps", "3"] + SMALL[2:]
    proc = subprocess.run([sys.executable, SCRIPT, *steps, "--backend", backend, "--log-json", str(log)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line)["loss"] for line in log.read_text().splitlines()]


def test_triton_interpreter_backend_gives_the_same_curve(tmp_path):
    pytest.importorskip("triton")
    if not os.path.exists(os.path.join(ROOT, "kasa_kernels", "ops", "triton_linear.py")):
        pytest.skip("no triton backend in this checkout")
    env = {"TRITON_INTERPRET": "1", "KASA_KERNELS_BACKEND": ""}
    want = _run_subprocess("torch", env, tmp_path)
    got = _run_subprocess("triton", env, tmp_path)
    print("torch ", want)
    print("triton", got)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_gpu_backends_give_the_same_curve(backend):
    if not kk.backends("cuda")[backend].available:
        pytest.skip(str(kk.backends("cuda")[backend]))
    ex = load_example()
    args = SMALL + ["--device", "cuda"]
    want = losses(ex.main(args + ["--backend", "torch"]))
    got = losses(ex.main(args + ["--backend", backend]))
    # fp32 on GPU: TF32 may be on for the base GEMM in one backend and not the other
    assert got == pytest.approx(want, rel=2e-3, abs=2e-3)
