"""kasa-bench on CPU: the CLI runs end to end, writes the documented schema, and `report` renders one file and two
devices side by side. unsloth_style is a baseline we publish numbers against, so it is held to kasa_reference."""
import json
import math
import random

import pytest
import torch

from kasa_kernels.bench.__main__ import main
from kasa_kernels.bench.peers import unsloth_style_linear
from kasa_kernels.bench.providers import GEMMS, PROVIDERS, REGISTRY, usable
from kasa_reference import kasa_linear_ref

ROW_FIELDS = {"provider", "mode", "M", "K", "N", "r", "dropout", "dtype", "ms_median", "ms_p20", "ms_p80", "tflops",
              "gbps", "peak_mem_mb"}
TOP_FIELDS = {"device", "capability", "driver", "torch", "triton", "cuda", "command", "date", "rows", "whole_model",
              "traffic"}
FAST = ["--rep-ms", "2", "--min-reps", "3", "--max-reps", "5", "--warmup", "1", "--quiet"]
# Every provider but torch_compile (inductor compiles each shape for 20-60 s on 2 cores)
ASKED = [n for n in PROVIDERS if n != "torch_compile"]
# Of those, the ones this CPU runs in every mode, and the ones it must skip (recorded with the reason)
# (the NF4 providers need bitsandbytes, a test extra: without it they are recorded as skipped, as GPU-only ones are)
ALL_MODES_HERE = [p.name for p in REGISTRY if p.name in ASKED and not p.forward_only and not p.needs_gpu
                  and usable(p.name, torch.device("cpu"))[0]]
FORWARD_ONLY_HERE = [p.name for p in REGISTRY if p.name in ASKED and p.forward_only and not p.needs_gpu]
GPU_ONLY = {p.name for p in REGISTRY if p.needs_gpu}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "cpu.json"
    rc = main(["run", "--shape", "24,40,32,4", "--dropout", "0,0.1", "--no-whole-model",
               "--providers", ",".join(ASKED),
               "--out", str(out)] + FAST)
    assert rc == 0
    with open(out) as f:
        return out, json.load(f)


def test_schema(results):
    _, data = results
    assert TOP_FIELDS <= set(data)
    assert data["command"].startswith("kasa-bench run")
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert ROW_FIELDS <= set(row), row
        for k in ("ms_median", "ms_p20", "ms_p80", "tflops", "gbps", "peak_mem_mb"):
            assert isinstance(row[k], float) and math.isfinite(row[k]) and row[k] >= 0, (k, row)
        assert row["ms_p20"] <= row["ms_median"] <= row["ms_p80"]
    got = {(r["provider"], r["mode"], r["dropout"]) for r in data["rows"]}
    assert ALL_MODES_HERE and FORWARD_ONLY_HERE
    for p in ALL_MODES_HERE:
        for mode in ("forward", "backward", "full"):
            assert (p, mode, 0.1) in got
    for p in FORWARD_ONLY_HERE:
        assert (p, "forward", 0.0) in got and (p, "full", 0.0) not in got
    skipped = {s["provider"] for s in data["skipped"]}
    assert GPU_ONLY <= skipped  # no GPU here: recorded with the reason, never silently dropped
    # which fp32 GEMM the torch backend ran on this CPU, as `python -m kasa_kernels` says it
    from kasa_kernels.ops import cpu_mask

    assert data["backends"]["torch"]["cpu_gemm"] == cpu_mask.gemm_description()


def test_run_counts_each_case_traffic_on_this_device_path(results, tmp_path):
    from kasa_kernels.ops.precision import device_path

    path, data = results
    timed = {(r["M"], r["dropout"], r["provider"]) for r in data["rows"]}
    assert len(data["traffic"]) == 2  # one entry per case
    for e in data["traffic"]:
        assert e["path"] == device_path(torch.device("cpu"))
        assert {(e["M"], e["dropout"], n) for n in e["providers"]} <= timed
        frozen = e["providers"]["frozen_linear"]
        # the frozen layer at 24 x 40 -> 32: forward reads x, W and writes y; backward reads G, W and writes dx
        assert frozen["passes"]["total"] == pytest.approx((2 * 24 * 40 + 2 * 32 * 40 + 24 * 32 + 24 * 32) / (24 * 40))
        assert e["providers"]["torch_eager"]["status"] == "counted"
    assert main(["report", str(path), "--out-dir", str(tmp_path), "--no-plots"]) == 0
    md = (tmp_path / "cpu.md").read_text()
    assert "| passes |" in md and "passes: bytes read + written" in md


def test_traffic_subcommand_writes_results_and_report(tmp_path):
    out = tmp_path / "t.json"
    rc = main(["traffic", "--shape", "64,48,40,4", "--dropout", "0,0.1", "--paths", "cuda,cpu-no-bf16-gemm",
               "--providers", "frozen_linear,peft,torch_eager,unsloth_style,triton,torch_compile", "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["kind"] == "traffic" and data["command"].startswith("kasa-bench traffic")
    assert [(e["path"], e["dropout"]) for e in data["cases"]] == [("cuda", 0.0), ("cuda", 0.1),
                                                                   ("cpu-no-bf16-gemm", 0.0), ("cpu-no-bf16-gemm", 0.1)]
    for e in data["cases"]:
        st = {n: p["status"] for n, p in e["providers"].items()}
        assert st == {"frozen_linear": "counted", "peft": "counted", "torch_eager": "counted",
                      "unsloth_style": "counted", "triton": "opaque", "torch_compile": "not counted"}
    md = (tmp_path / "t.md").read_text()
    assert "| torch_eager |" in md and "opaque: kasa_kernels.linear_forward.default" in md
    assert main(["report", str(out), "--out-dir", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "t.md").read_text() == md


def test_report_one_and_two_devices(results, tmp_path):
    path, data = results
    assert main(["report", str(path), "--out-dir", str(tmp_path / "one")]) == 0
    md = (tmp_path / "one" / "cpu.md").read_text()
    assert "CPU run" in md and "full / T_frozen" in md and "Performance targets" in md
    assert f"the torch backend's fp32 GEMM here: {data['backends']['torch']['cpu_gemm']}" in md
    assert (tmp_path / "one" / "cpu-headline.png").stat().st_size > 1000
    other = dict(data, device="NVIDIA GeForce RTX 3090 (fabricated for this test)", device_slug="rtx3090-test",
                 device_type="cuda")
    other["rows"] = [dict(r, ms_median=r["ms_median"] * 2, ms_p20=r["ms_p20"] * 2, ms_p80=r["ms_p80"] * 2)
                     for r in data["rows"]]
    second = tmp_path / "other.json"
    second.write_text(json.dumps(other))
    assert main(["report", str(path), str(second), "--out-dir", str(tmp_path / "two"), "--no-plots"]) == 0
    md2 = next((tmp_path / "two").glob("*.md")).read_text()
    assert "Side by side" in md2 and "rtx3090-test" in md2 and data["device_slug"] in md2


def test_time_budget_writes_what_ran_and_lists_what_did_not(tmp_path):
    out = tmp_path / "budget.json"
    # a zero budget is spent before the first case: nothing runs, both cases are listed, the file is still written
    rc = main(["run", "--shape", "8,16,16,2", "--shape", "8,24,16,2", "--dropout", "0", "--no-whole-model",
               "--providers", "torch_eager", "--modes", "forward", "--time-budget-s", "0", "--out", str(out)] + FAST)
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["rows"] == []
    left_out = [s["case"] for s in data["skipped"] if "time-budget" in s["reason"]]
    assert len(left_out) == 2 and "K=16" in left_out[0] and "K=24" in left_out[1]
    assert main(["report", str(out), "--out-dir", str(tmp_path / "r"), "--no-plots"]) == 0
    assert "every provider" in next((tmp_path / "r").glob("*.md")).read_text()


@pytest.mark.parametrize("gemm_ms,verdict", [(1.0, "PASS"), (1.2, "FAIL")])
@pytest.mark.parametrize("gemm", GEMMS)
def test_report_judges_our_gemm_against_cublas(results, tmp_path, gemm, gemm_ms, verdict):
    # rows at shape P as a GPU run would write them: T_mm 1.0 ms; our GEMM with the adapter off at gemm_ms
    path, data = results
    template = next(r for r in data["rows"] if r["provider"] == "cublas_linear")
    rows = [dict(template, provider=prov, mode="forward", M=8192, K=4096, N=4096, r=16, dropout=0.0, dtype="bf16",
                 ms_median=ms, ms_p20=ms, ms_p80=ms) for prov, ms in (("cublas_linear", 1.0), (gemm, gemm_ms))]
    fabricated = tmp_path / "gpu.json"
    fabricated.write_text(json.dumps(dict(data, rows=data["rows"] + rows)))
    assert main(["report", str(fabricated), "--out-dir", str(tmp_path / "out"), "--no-plots"]) == 0
    md = next((tmp_path / "out").glob("*.md")).read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith("| our GEMM with the adapter off"))
    assert f"[{gemm}]" in line, line
    assert f"{1.0 / gemm_ms:.3f}" in line and line.count(verdict) == 2, line


@pytest.mark.parametrize("gemm", GEMMS)
def test_gemm_providers_are_forward_only_and_skipped_without_a_gpu(results, gemm):
    _, data = results
    assert not any(r["provider"] == gemm for r in data["rows"])
    assert any(gemm in str(s) for s in data["skipped"])
    from kasa_kernels.bench.run import _supports

    assert _supports(gemm, "forward") and not _supports(gemm, "full")


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("adapter_dtype", [torch.float64, torch.float32])
def test_unsloth_style_matches_reference(p, adapter_dtype):
    g = torch.Generator().manual_seed(1)
    m, k, n, r, s = 13, 24, 20, 5, 1.7
    x = torch.randn(2, m, k, generator=g, dtype=torch.float64)
    w = torch.randn(n, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    a = torch.randn(r, k, generator=g, dtype=torch.float64).to(adapter_dtype)
    d = torch.randn(r, generator=g, dtype=torch.float64).to(adapter_dtype)
    bb = torch.randn(n, r, generator=g, dtype=torch.float64).to(adapter_dtype)
    mask = torch.rand(x.shape, generator=g) >= p if p > 0 else None
    dy = torch.randn(2, m, n, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, a, d, bb)]
        y = fn(*leaves)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    ours = grads(lambda x_, a_, d_, b_: unsloth_style_linear(x_, w, b, a_, d_, b_, s, p, keep_mask=mask))
    ref = grads(lambda x_, a_, d_, b_: kasa_linear_ref(x_, w, b, a_, d_, b_, s, dropout_mask=mask, dropout_p=p,
                                                       dtype=torch.float64))
    tol = 1e-10 if adapter_dtype == torch.float64 else 1e-5
    for name, o, rf in zip(("y", "dx", "dA", "dd", "dB"), ours, ref):
        assert o.dtype == (torch.float64 if name in ("y", "dx") else adapter_dtype), name
        err = (o.double() - rf.double()).abs().max().item()
        scale = rf.double().abs().max().item()
        assert err <= tol * max(scale, 1.0), f"{name}: max err {err:.2e} (scale {scale:.2e})"


def test_unsloth_style_half_runs_and_is_close():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(16, 32, generator=g).bfloat16()
    w = torch.randn(24, 32, generator=g).bfloat16()
    a, d, bb = torch.randn(4, 32, generator=g), torch.randn(4, generator=g), torch.randn(24, 4, generator=g)
    y = unsloth_style_linear(x, w, None, a, d, bb, 2.0)
    ref = kasa_linear_ref(x.double(), w.double(), None, a.double(), d.double(), bb.double(), 2.0)
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_flop_formula():
    from kasa_kernels.bench.providers import flops
    from kasa_kernels.bench.shapes import Case

    c = Case(8192, 4096, 4096, 16, 0.0, "bf16")
    base = 2 * 8192 * 4096 * 4096
    ad = 2 * 8192 * 16 * (4096 + 4096)
    assert flops("kasa", "forward", c) == base + ad
    assert flops("kasa", "full", c) == 2 * base + 3 * ad
    assert flops("linear", "full", c) == 2 * base
    assert flops("dense", "full", c) == 3 * base


def test_bad_arguments_name_the_flag():
    with pytest.raises(SystemExit, match="--providers"):
        main(["run", "--providers", "nope", "--quiet"])
    with pytest.raises(SystemExit, match="--shape"):
        main(["run", "--shape", "1,2,3", "--quiet"])
    with pytest.raises(SystemExit, match="--paths"):
        main(["traffic", "--paths", "gpu"])
    with pytest.raises(SystemExit, match="--dropout"):
        main(["traffic", "--dropout", "1.5"])


def test_nf4_pair_computes_the_same_layer():
    """The quantized-base pair times the same math: bitsandbytes' NF4 layer plus an eager adapter, and ours, on the
    same packed base and adapters, against kasa_reference on bitsandbytes' dequantization of that base."""
    pytest.importorskip("bitsandbytes")
    import helpers
    from kasa_kernels.bench import providers as prov
    from kasa_kernels.bench.shapes import Case
    from kasa_kernels.quant import weight_of
    from quant_cases import bnb_dequantize

    case = Case(24, 64, 48, 4, 0.0, "fp32")
    cpu = torch.device("cpu")
    states = {n: prov.build(n, case, cpu) for n in prov.QUANTIZED}
    t = prov.make_tensors(case, cpu)
    w = bnb_dequantize(weight_of(prov._nf4_base(t, case, cpu)))
    args = (w, None, t.lora_A, t.lora_diag, t.lora_B)
    want64 = kasa_linear_ref(t.x.double(), *(None if a is None else a.double() for a in args), t.scaling)
    want32 = kasa_linear_ref(t.x, *args, t.scaling)
    mag = helpers.kasa_linear_magnitudes(t.x, *args, t.dy, t.scaling)[0]
    for name, st in states.items():
        helpers.assert_close_to_reference(name, st.fwd(), want64, want32, torch.float32, magnitude=mag)


@pytest.mark.parametrize("path", ["cpu-bf16-gemm", "cpu-no-bf16-gemm"])
def test_cpu_subset_leaves_slow_bf16_cases_out_only_without_bf16_gemm_kernels(monkeypatch, path):
    import kasa_kernels.bench.__main__ as cli

    monkeypatch.setattr(cli, "device_path", lambda device: path)

    def cases(*argv):
        return cli._resolve_run_args(cli.build_parser().parse_args(["run", "--device", "cpu", *argv]))[1]

    default, explicit = cases(), cases("--dtype", "fp32,bf16")
    assert len(explicit) == 12 and {c.dtype for c in explicit} == {"fp32", "bf16"}
    if path == "cpu-bf16-gemm":
        assert default == explicit
    else:  # the bf16 cases beyond the small layer take hours there; fp32 and the small bf16 layer stay
        assert default == [c for c in explicit if c.dtype == "fp32" or c.tag == "cpu-small"]
        assert {c.dtype for c in default} == {"fp32", "bf16"} and len(default) == 8


def test_interleaved_rounds_shuffle_the_order_and_keep_each_providers_samples(monkeypatch):
    """Every round calls each provider once, in a new order (no provider keeps a position), and each sample lands
    in its own provider's list: with a fake clock that provider j advances by j + 1 units, every sample of j reads
    j + 1 units. Fixed seed: the same orders in every run."""
    from kasa_kernels.bench import timing

    clock = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    calls = []

    def provider(j):
        def fn():
            calls.append(j)
            clock[0] += j + 1.0
        return fn

    n, reps = 4, 40
    timer = timing.Timer(torch.device("cpu"), flush=False)
    out = timer.run_interleaved([provider(j) for j in range(n)], [None] * n, reps)
    assert [len(s) for s in out] == [reps] * n
    assert all(s == [(j + 1.0) * 1e3] * reps for j, s in enumerate(out))
    rounds = [calls[i * n:(i + 1) * n] for i in range(reps)]
    assert all(sorted(r) == list(range(n)) for r in rounds)
    firsts = {r[0] for r in rounds}
    assert firsts == set(range(n))  # each provider opens some round
    assert len({tuple(r) for r in rounds}) > n
    assert timing._round_orders(n, reps) == timing._round_orders(n, reps)
    assert "random order" in timer.method


def test_paired_ratio_is_the_median_per_round_ratio_with_an_order_statistic_interval():
    """The median of num_i / den_i over rounds, and the sign test's 95 % interval (order statistics k and n + 1 - k,
    k = floor(n/2 - 0.98 sqrt(n))): for the ratios 0.01 ... 1.00 in any round order, 0.505 within [0.40, 0.61]. A
    drift shared by both calls of a round cancels: with the machine's speed varying 2x across rounds and the true
    ratio 0.95 within 1 %, the interval is inside 0.94-0.96. Too few rounds, unpaired lists: no figure."""
    from kasa_kernels.bench.timing import PAIRED_MIN_ROUNDS, paired_ratio

    rnd = random.Random(3)
    ratios = [(i + 1) / 100 for i in range(100)]
    rnd.shuffle(ratios)
    den = [1.0 + rnd.random() for _ in ratios]
    got = paired_ratio([r * d for r, d in zip(ratios, den)], den)
    assert got == pytest.approx({"ratio": 0.505, "lo": 0.40, "hi": 0.61})
    drift = [1.0 + rnd.random() for _ in range(200)]  # the machine's speed, per round
    num = [0.95 * d * (1 + 0.01 * (2 * rnd.random() - 1)) for d in drift]
    got = paired_ratio(num, drift)
    assert 0.94 < got["lo"] <= got["ratio"] <= got["hi"] < 0.96
    assert paired_ratio(num[:PAIRED_MIN_ROUNDS - 1], drift[:PAIRED_MIN_ROUNDS - 1]) is None
    assert paired_ratio(num, drift[:-1]) is None
    assert paired_ratio(num, [0.0] + drift[1:]) is None


def test_run_pairs_every_provider_of_a_mode_with_the_others(tmp_path, monkeypatch):
    """Each row carries its per-round ratio against every other provider timed in the same case and mode, this
    provider over the other: with timings where provider j takes (j + 1) units times a drift shared by each round,
    every pair's ratio is exactly (j + 1) / (k + 1), the two directions reciprocal, the interval collapsed on it."""
    from kasa_kernels.bench import timing

    def fake(self, fns, prepares, reps):
        for f, p in zip(fns, prepares):  # the calls still run, once each
            if p is not None:
                p()
            f()
        return [[(j + 1.0) * (1.0 + i % 3) for i in range(reps)] for j in range(len(fns))]

    monkeypatch.setattr(timing.Timer, "run_interleaved", fake)
    out = tmp_path / "paired.json"
    rc = main(["run", "--shape", "24,40,32,4", "--dropout", "0", "--no-whole-model", "--modes", "full",
               "--providers", "torch_eager,unsloth_style,frozen_linear", "--out", str(out),
               "--rep-ms", "2", "--min-reps", "7", "--max-reps", "7", "--warmup", "1", "--quiet"])
    assert rc == 0
    rows = {r["provider"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"torch_eager", "unsloth_style", "frozen_linear"}
    units = {name: row["ms_median"] / 2.0 for name, row in rows.items()}  # the median round has drift 2
    assert sorted(units.values()) == [1.0, 2.0, 3.0]
    for name, row in rows.items():
        assert set(row["paired"]) == set(rows) - {name}
        for other, pr in row["paired"].items():
            want = units[name] / units[other]
            assert pr["ratio"] == pytest.approx(want) and pr["lo"] == pytest.approx(want)
            assert pr["hi"] == pytest.approx(want)


def test_report_prints_the_paired_interval_beside_the_speedup(results, tmp_path):
    """The peer table shows peer / ours with the round-by-round interval in brackets where the file has one, and the
    bare ratio for files made before "paired" existed."""
    path, data = results
    fake = {"ratio": 0.8, "lo": 0.75, "hi": 0.85}  # ours / peer: peer / ours is 1.25 within [1.176, 1.333]
    rows = [dict(r, paired={"peft": fake, "unsloth_style": fake}) if r["provider"] == "torch_eager" else r
            for r in data["rows"]]
    with_pairs = tmp_path / "with.json"
    with_pairs.write_text(json.dumps(dict(data, rows=rows)))
    assert main(["report", str(with_pairs), "--out-dir", str(tmp_path / "a"), "--no-plots"]) == 0
    assert "[1.176-1.333]" in (tmp_path / "a" / "with.md").read_text()
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(dict(data, rows=[{k: v for k, v in r.items() if k != "paired"} for r in rows])))
    assert main(["report", str(bare), "--out-dir", str(tmp_path / "b"), "--no-plots"]) == 0
    assert "[1.176-1.333]" not in (tmp_path / "b" / "bare.md").read_text()
