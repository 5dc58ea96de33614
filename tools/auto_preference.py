"""Derive `backend="auto"`'s per-architecture preference (kasa_kernels/_backend.py, AUTO_PREFERENCE) from committed
kasa-bench results, so that what `auto` picks is always backed by a measurement in benchmarks/results/.

Rule (docs/design.md: a fused backend must never be slower than the torch backend at any swept shape): for each compute
capability, a fused backend (triton, cuda) qualifies when, at every case where it and `torch_eager` were both timed
in `full` mode (forward + backward), its median is at most `torch_eager`'s times (1 + --noise). Qualifying backends
are ordered by their geometric-mean speed-up over torch_eager across those cases; the torch backend stays the
fallback. A capability with no qualifying backend gets no entry (auto stays on torch there).

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
        ranked = []
        for b in FUSED:
            ratios = []  # torch_eager / b per case: > 1 means b is faster
            worst = None
            for key, by in sorted(timed[cap].items()):
                if b not in by or BASE not in by:
                    continue
                ours, base = min(by[b]), min(by[BASE])
                ratios.append(base / ours)
                if worst is None or base / ours < worst[0]:
                    worst = (base / ours, key)
            if not ratios:
                why.append(f"sm{cap[0]}{cap[1]} {b}: no full-mode case timed beside {BASE}")
                continue
            gmean = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            ok = worst[0] >= 1.0 / (1.0 + noise)
            why.append(f"sm{cap[0]}{cap[1]} {b}: {len(ratios)} cases, geometric-mean speed-up over {BASE} "
                       f"{gmean:.3f}x, worst {worst[0]:.3f}x at (M,K,N,r,p,dtype)={worst[1]}: "
                       f"{'qualifies' if ok else 'slower than torch somewhere: not preferred'}")
            if ok:
                ranked.append((gmean, prov.provider(b).backend))
        if ranked:
            table[cap] = tuple(b for _, b in sorted(ranked, reverse=True))
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
