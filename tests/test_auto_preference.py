"""tools/auto_preference.py turns committed kasa-bench results into `auto`'s per-architecture preference: a fused
backend is preferred only where it was never slower than the torch backend, ordered by its speed-up."""
import dataclasses
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


def test_sm90_prefers_triton_until_cuda_measures_faster_beside_it():
    # Both beat torch everywhere; cuda more so over torch, in cases where triton was not timed.
    apart = [("h100.json", _file("9.0", {(8192, "torch_eager"): 3.0, (8192, "triton"): 2.0,
                                         (64, "torch_eager"): 0.3, (64, "cuda"): 0.1}))]
    table, why = auto_preference.decide(apart)
    assert table == {(9, 0): ("triton",)}  # never timed beside triton: not preferred on sm90
    assert any("sm90 cuda: never timed beside triton" in w for w in why)
    # The same times on sm80 rank by speed-up over torch alone.
    table, _ = auto_preference.decide([("a100.json", {**apart[0][1], "capability": "8.0"})])
    assert table == {(8, 0): ("cuda", "triton")}
    # Beside triton, cuda is slower in geometric mean; a case timed without triton gives it the larger speed-up over
    # torch, which would rank it first anywhere else: after triton.
    beside = {(8192, "torch_eager"): 3.0, (8192, "triton"): 2.0, (8192, "cuda"): 2.2,
              (64, "torch_eager"): 0.3, (64, "triton"): 0.29, (64, "cuda"): 0.28,
              (2048, "torch_eager"): 1.0, (2048, "cuda"): 0.25}
    table, why = auto_preference.decide([("h100.json", _file("9.0", beside))])
    assert table == {(9, 0): ("triton", "cuda")}
    # A measurement says otherwise: beside triton, cuda is faster in geometric mean (here at every case).
    beside[(8192, "cuda")] = 1.5
    table, _ = auto_preference.decide([("h100.json", _file("9.0", beside))])
    assert table == {(9, 0): ("cuda", "triton")}


def test_auto_resolves_by_the_table(monkeypatch):
    # `auto` on a CUDA device takes the first usable backend of AUTO_PREFERENCE[capability], else torch.
    from kasa_kernels import _backend

    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setattr(_backend, "AUTO_PREFERENCE", {(9, 0): ("triton", "cuda"), (8, 0): ("cuda", "triton")})
    usable = {"triton": True, "cuda": True, "torch": True}
    monkeypatch.setattr(_backend, "BACKENDS", {n: dataclasses.replace(b, probe=lambda d, n=n: (usable[n], "test"))
                                               for n, b in _backend.BACKENDS.items()})
    monkeypatch.setattr(_backend, "load", lambda name: None)
    cap = {}
    monkeypatch.setattr(_backend.torch.cuda, "get_device_capability", lambda device=None: cap["now"])
    picks = {}
    for c in ((9, 0), (8, 0), (8, 6)):
        cap["now"] = c
        _backend.clear_cache()
        picks[c] = _backend._resolve("auto", "cuda", 0)
    usable["triton"] = False
    cap["now"] = (9, 0)
    _backend.clear_cache()
    picks["sm90 without triton"] = _backend._resolve("auto", "cuda", 0)
    _backend.clear_cache()
    assert picks == {(9, 0): "triton", (8, 0): "cuda", (8, 6): "torch", "sm90 without triton": "cuda"}
