"""A small subset of kasa-bench through pytest-benchmark:  pytest benchmarks/ --benchmark-only

The providers, tensors and flop counts come from the harness (kasa_kernels.bench.providers), whose baselines come
from python/kasa_reference, PEFT and bench/peers.py; nothing is re-implemented here. pytest-benchmark times the
host, so every timed call ends with a device synchronize. Not collected by a plain `python -m pytest` (pyproject
testpaths = ["tests"]).
"""
import pytest
import torch

pytest.importorskip("pytest_benchmark")

from kasa_kernels.bench import providers as prov  # noqa: E402
from kasa_kernels.bench.shapes import Case  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# P on a GPU; a small stand-in on CPU
CASES = (
    [Case(8192, 4096, 4096, 16, 0.0, "bf16", "P"), Case(8192, 4096, 4096, 16, 0.1, "bf16", "P")]
    if ON_GPU
    else [Case(256, 256, 256, 16, 0.0, "fp32", "cpu-small"), Case(256, 256, 256, 16, 0.1, "fp32", "cpu-small")]
)
# The registry's providers but the dense layer, torch.compile (compiles per case) and our GEMMs (kasa-bench judges those)
NAMES = [p.name for p in prov.REGISTRY
         if p.category not in (prov.DENSE_LAYER, prov.OUR_GEMM) and p.name != "torch_compile"]


def _sync():
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_provider(benchmark, case, name, mode):
    ok, why = prov.usable(name, DEVICE)
    if not ok:
        pytest.skip(why)
    if prov.provider(name).forward_only and mode != "forward":
        pytest.skip(f"{name} is forward only")
    if prov.provider(name).forward_only and case.dropout > 0:
        pytest.skip("no adapter, so no dropout")
    state = prov.build(name, case, DEVICE)
    kind = state.kind

    if mode == "forward":
        def call():
            with torch.no_grad() if state.dy is None else torch.enable_grad():
                state.fwd()
            _sync()
    else:
        def call():
            for t in state.leaves:
                t.grad = None
            torch.autograd.backward(state.fwd(), state.dy)
            _sync()

    for _ in range(3):
        call()
    benchmark.extra_info.update({"provider": name, "mode": mode, "case": str(case), "device": str(DEVICE),
                                 "gflop": prov.flops(kind, mode, case) / 1e9})
    benchmark.pedantic(call, rounds=20 if ON_GPU else 5, iterations=1, warmup_rounds=1)
