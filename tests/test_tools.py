"""The GPU-session tools run end to end on CPU (their GPU paths run in a GPU session): tools/profile_kernels.py."""
import importlib.util
import os

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_profile_kernels_writes_a_table_per_provider_and_mode(tmp_path):
    out = tmp_path / "profile.md"
    rc = _load("profile_kernels").main(["--shape", "32,48,40,4", "--providers", "frozen_linear,torch_eager,triton",
                                        "--modes", "forward,full", "--warmup", "1", "--iters", "2", "--out", str(out)])
    assert rc == 0
    md = out.read_text()
    for section in ("## frozen_linear, forward", "## torch_eager, forward", "## frozen_linear, full",
                    "## torch_eager, full"):
        assert section in md, section
    assert "triton / forward: skipped" in md  # not usable on CPU: said, not silently dropped
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel")]
    assert rows and all(float(ln.split("|")[3]) >= 0 for ln in rows)
    assert "KasaLinearFunction" in md  # the torch backend's forward shows up as its own operator


def test_profile_kernels_defaults_are_registry_providers():
    from kasa_kernels.bench.providers import PROVIDERS

    mod = _load("profile_kernels")
    assert set(mod.NOT_BY_DEFAULT) <= set(PROVIDERS)
    for default in (mod.GPU_DEFAULT, mod.CPU_DEFAULT):
        assert default and set(default.split(",")) <= set(PROVIDERS)
