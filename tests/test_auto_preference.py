"""tools/auto_preference.py turns committed kasa-bench results into `auto`'s per-architecture preference: a fused
backend is preferred only where it was never slower than the torch backend, ordered by its speed-up."""
import importlib.util
import os
import shutil

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_spec = importlib.util.spec_from_file_location("auto_preference", os.path.join(ROOT, "tools", "auto_preference.py"))
auto_preference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auto_preference)


def _rows(times):
    """times: {(M, provider): ms} at K = N = 4096, r = 16, p = 0, bf16, full mode."""
    return [dict(provider=p, mode="full", M=m, K=4096, N=4096, r=16, dropout=0.0, dtype="bf16", ms_median=ms)
            for (m, p), ms in times.items()]


def _file(cap, times, device_type="cuda"):
    return dict(device_type=device_type, capability=cap, rows=_rows(times))


FILES = [
    # sm90: triton 1.5x faster everywhere; cuda faster at M = 8192 but 10% slower at decode size
    ("h100.json", _file("9.0", {(8192, "torch_eager"): 3.0, (8192, "triton"): 2.0, (8192, "cuda"): 2.5,
                                (64, "torch_eager"): 0.3, (64, "triton"): 0.2, (64, "cuda"): 0.33})),
    # sm80: both faster everywhere, cuda more so
    ("a100.json", _file("8.0", {(8192, "torch_eager"): 6.0, (8192, "triton"): 5.0, (8192, "cuda"): 4.0,
                                (64, "torch_eager"): 0.6, (64, "triton"): 0.59, (64, "cuda"): 0.5})),
    # sm86: triton 1% slower at one case (inside the 2% noise), cuda never timed beside torch
    ("3090.json", _file("8.6", {(8192, "torch_eager"): 9.0, (8192, "triton"): 9.09, (64, "cuda"): 0.1})),
    # a CPU run has no say
    ("cpu.json", _file(None, {(8192, "torch_eager"): 1.0}, device_type="cpu")),
]


def test_decide_prefers_only_backends_never_slower_than_torch():
    table, why = auto_preference.decide(FILES)
    assert table == {(9, 0): ("triton",), (8, 0): ("cuda", "triton"), (8, 6): ("triton",)}
    assert any("sm90 cuda" in w and "slower than torch somewhere" in w for w in why)
    assert any("sm86 cuda: no full-mode case" in w for w in why)
    table_strict, _ = auto_preference.decide(FILES, noise=0.0)
    assert (8, 6) not in table_strict


def test_write_rewrites_only_the_table(tmp_path):
    target = tmp_path / "_backend.py"
    shutil.copy(os.path.join(ROOT, "kasa_kernels", "_backend.py"), target)
    before = target.read_text()
    table, _ = auto_preference.decide(FILES)
    auto_preference.write(table, str(target))
    after = target.read_text()
    assert "    (9, 0): ('triton',),\n" in after and "    (8, 0): ('cuda', 'triton'),\n" in after
    namespace = {}
    exec(compile(after, str(target), "exec"), namespace)  # still valid Python, with the table in it
    assert namespace["AUTO_PREFERENCE"] == table
    auto_preference.write({}, str(target))
    assert target.read_text() == before  # and back: nothing else was touched


def test_bad_capability_is_named():
    with pytest.raises(ValueError, match="capability"):
        auto_preference.decide([("x.json", _file("hopper", {(1, "torch_eager"): 1.0}))])
