"""Derive `backend="auto"`'s per-architecture preference (kasa_kernels/_backend.py, AUTO_PREFERENCE) from committed
kasa-bench results, so that what `auto` picks is always backed by a measurement in benchmarks/results/.

Rule (docs/design.md: a fused backend must never be slower than the torch backend at any swept shape): for each compute
capability, a fused backend (triton, cuda) qualifies when, at every case where it and `torch_eager` were both timed
in `full` mode (forward + backward), its median is at most `torch_eager`'s times (1 + --noise). Qualifying backends
are ordered by their geometric-mean speed-up over torch_eager across those cases; the torch backend stays the
fallback. A capability with no qualifying backend gets no entry (auto stays on torch there).

On Hopper (sm90) the cuda backend's GEMM is mma.sync, which cannot reach the rate of wgmma that the triton backend's
sm90 kernels use (csrc/README.md, "sm90"), so there triton comes first until a measurement says otherwise: cuda is
preferred on sm90 only where it was timed beside triton and its geometric-mean speed-up over triton, across the cases
they share, is above 1; timed beside the torch backend alone, it is not preferred at all.

    python tools/auto_preference.py benchmarks/results/*/*.json            # print the table and the reasons
    python tools/auto_preference.py benchmarks/results/*/*.json --write    # also rewrite AUTO_PREFERENCE
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from typing import Dict, Iterable, List, Tuple

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kasa_kernels.bench import providers as prov  # noqa: E402

# From the benchmark registry: the fused backends' providers, and the shipped torch backend's (the bar they must clear)
FUSED = prov.FUSED
(BASE,) = prov.names(prov.OURS_TORCH)
BACKEND_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kasa_kernels", "_backend.py")


def _capability(data: Dict) -> Tuple[int, int]:
    cap = data.get("capability")
    if isinstance(cap, (list, tuple)) and len(cap) == 2:
        return int(cap[0]), int(cap[1])
    m = re.fullmatch(r"\s*(?:sm_?)?(\d+)[.,](\d+)\s*", str(cap))
    if not m:
        raise ValueError(f"capability: expected like '9.0' or [9, 0], got {cap!r}")
    return int(m.group(1)), int(m.group(2))


# Architectures where the mma.sync cuda backend must beat triton side by side before auto prefers it (see above).
WGMMA_MAJOR = 9


def _ratios(cases: dict[tuple, dict[str, list[float]]], b: str, ref: str) -> list[tuple[float, tuple]]:
    """(ref's best time / b's best time, case) at every case where both were timed: > 1 means b is faster."""
    return [(min(by[ref]) / min(by[b]), key) for key, by in sorted(cases.items()) if b in by and ref in by]


def _gmean(ratios: list[tuple[float, tuple]]) -> float:
    return math.exp(sum(math.log(x) for x, _ in ratios) / len(ratios))


def decide(files: Iterable[Tuple[str, Dict]], noise: float = 0.02):
    """({capability: ordered fused backends}, [lines explaining each decision])."""
    # (cap) -> (case key) -> provider -> [median ms, ...] (several files of one architecture pool their cases)
    timed: Dict[Tuple[int, int], Dict[tuple, Dict[str, List[float]]]] = defaultdict(lambda: defaultdict(dict))
    sources: Dict[Tuple[int, int], List[str]] = defaultdict(list)
    for path, data in files:
        if data.get("device_type") != "cuda":
            continue
        cap = _capability(data)
        sources[cap].append(path)
        for row in data.get("rows", []):
            if row.get("mode") != "full" or row.get("provider") not in FUSED + (BASE,):
                continue
            key = (row["M"], row["K"], row["N"], row["r"], row["dropout"], row["dtype"])
            timed[cap][key].setdefault(row["provider"], []).append(float(row["ms_median"]))
    table: Dict[Tuple[int, int], Tuple[str, ...]] = {}
    why: List[str] = []
    for cap in sorted(timed):
        ranked = {}  # backend -> geometric-mean speed-up over torch_eager
        for b in FUSED:
            ratios = _ratios(timed[cap], b, BASE)
            if not ratios:
                why.append(f"sm{cap[0]}{cap[1]} {b}: no full-mode case timed beside {BASE}")
                continue
            gmean, worst = _gmean(ratios), min(ratios)
            ok = worst[0] >= 1.0 / (1.0 + noise)
            why.append(f"sm{cap[0]}{cap[1]} {b}: {len(ratios)} cases, geometric-mean speed-up over {BASE} "
                       f"{gmean:.3f}x, worst {worst[0]:.3f}x at (M,K,N,r,p,dtype)={worst[1]}: "
                       f"{'qualifies' if ok else 'slower than torch somewhere: not preferred'}")
            if ok:
                ranked[prov.provider(b).backend] = gmean
        order = sorted(ranked, key=ranked.get, reverse=True)
        if cap[0] == WGMMA_MAJOR and "cuda" in ranked:
            (tri,) = [b for b in FUSED if prov.provider(b).backend == "triton"]
            (cud,) = [b for b in FUSED if prov.provider(b).backend == "cuda"]
            side = _ratios(timed[cap], cud, tri)
            if not side:
                order.remove("cuda")
                why.append(f"sm{cap[0]}{cap[1]} cuda: never timed beside {tri}; on sm90 triton comes first until a "
                           "measurement says otherwise: not preferred")
            elif _gmean(side) <= 1.0 and "triton" in order:
                order.remove("cuda")
                order.insert(order.index("triton") + 1, "cuda")
                why.append(f"sm{cap[0]}{cap[1]} cuda: geometric-mean speed-up over {tri} {_gmean(side):.3f}x "
                           f"({len(side)} cases): after triton")
        if order:
            table[cap] = tuple(order)
        why.append(f"sm{cap[0]}{cap[1]}: {table.get(cap, ())} from {', '.join(sources[cap])}")
    return table, why


def render(table: Dict[Tuple[int, int], Tuple[str, ...]]) -> str:
    if not table:
        return "AUTO_PREFERENCE: Dict[Tuple[int, int], Tuple[str, ...]] = {}"
    body = "".join(f"    {cap!r}: {names!r},\n" for cap, names in sorted(table.items()))
    return "AUTO_PREFERENCE: Dict[Tuple[int, int], Tuple[str, ...]] = {\n" + body + "}"


def write(table, path: str = BACKEND_PY) -> None:
    with open(path) as f:
        src = f.read()
    pattern = re.compile(r"^AUTO_PREFERENCE: Dict\[Tuple\[int, int\], Tuple\[str, \.\.\.\]\] = \{.*?\}$", re.M | re.S)
    if len(pattern.findall(src)) != 1:
        raise SystemExit(f"{path}: expected exactly one AUTO_PREFERENCE assignment to rewrite")
    with open(path, "w") as f:
        f.write(pattern.sub(lambda _: render(table), src))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="kasa-bench results JSON files")
    ap.add_argument("--noise", type=float, default=0.02, help="relative slack against torch_eager (default 0.02)")
    ap.add_argument("--write", action="store_true", help=f"rewrite AUTO_PREFERENCE in {os.path.relpath(BACKEND_PY)}")
    args = ap.parse_args(argv)
    files = []
    for p in args.results:
        with open(p) as f:
            files.append((p, json.load(f)))
    table, why = decide(files, args.noise)
    print("\n".join(why))
    print(render(table))
    if args.write:
        write(table)
        print(f"wrote {os.path.relpath(BACKEND_PY)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
