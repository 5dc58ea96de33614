"""kasa_kernels.bench: the microbenchmark harness behind `kasa-bench` (python -m kasa_kernels.bench).

run      time every provider (PROVIDERS, from the registry in providers.py) in forward / backward / full mode over
         a preset of shapes, plus the whole-model regularizer and training-step runs, and write
         benchmarks/results/<device>/<date>.json
report   render one or more results files as markdown ratio tables and PNG plots, devices side by side
"""
from .providers import MODES, PROVIDERS

__all__ = ["MODES", "PROVIDERS", "main"]


def main(argv=None) -> int:
    from .__main__ import main as _main

    return _main(argv)
