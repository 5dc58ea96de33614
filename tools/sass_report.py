"""Reading SASS (cuobjdump -sass) and cuobjdump's resource usage: the facts tools/aot_compile_triton.py reports per
kernel. Plain text in, plain values out: no GPU, no triton, no torch, so tests can feed it any listing.

    MMA        matrix instructions by class and types (HGMMA = wgmma, HMMA = mma.sync)
    loads      global loads by kind and bytes per thread: cp.async (LDGSTS), TMA (UTMALDG/UBLKCP), ldg (LDG)
    STL/LDL    local-memory stores/loads: spills, in kernels without local arrays
    atomics    global atomics/reductions, and which have a GPU-scope fence (MEMBAR .GPU/.SYS, ERRBAR, CCTL.IVALL)
               within FENCE_WINDOW instructions
    loop       the hot loop: the loop whose own body holds the most MMAs
    lead       what runs before the first async copy is issued
"""
from __future__ import annotations

import collections
import dataclasses
import re
from typing import Dict, List, Optional, Tuple

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_MMA = ("HGMMA", "HMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA")
_ATOMIC = ("ATOMG", "ATOM", "RED", "REDG")
_GPU_FENCE = re.compile(r"^(MEMBAR(\.\w+)*\.(GPU|SYS)$|ERRBAR|CCTL\.IVALL)")
FENCE_WINDOW = 4  # instructions either side of an atomic that count as "beside" it


@dataclasses.dataclass
class Sass:
    n_instr: int
    mma: Dict[str, int]
    ffma: int
    loads: Dict[str, int]  # "cp.async 16B", "ldg 4B", "tma", ...
    stl: int
    ldl: int
    atomics: Dict[str, int]
    fenced_atomics: int
    gpu_fences: int
    loop: Optional[Dict[str, int]]  # the hot loop: instr, mma, bar_sync, ldg, cp_async, tma, mma_in_flight
    lead: Optional[Dict[str, int]]  # before the first async copy: instr, ldg, mma


def parse_instructions(sass: str) -> List[Tuple[int, str, str]]:
    """[(address, opcode with modifiers, operands)] in program order."""
    return [(int(m.group(1), 16), m.group(2), m.group(3).strip()) for m in _INSTR.finditer(sass)]


def _load_kind(op: str) -> Optional[str]:
    parts = op.split(".")
    head = parts[0]
    if head in ("UTMALDG", "UBLKCP"):
        return "tma"
    if head not in ("LDGSTS", "LDG"):
        return None
    width = 4
    for p, w in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if p in parts[1:]:
            width = w
            break
    return f"{'cp.async' if head == 'LDGSTS' else 'ldg'} {width}B"


def loops(instrs) -> List[Tuple[int, int]]:
    """(first, last) instruction index of every loop: a branch back to an address at or before its own, with no
    EXIT in between (ptxas places retry stubs, e.g. of an mbarrier wait, after the EXITs and branches back from
    there: those are no loop over the code they jump over)."""
    index = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    exits = [i for i, (_, op, _) in enumerate(instrs) if op.split(".")[0] == "EXIT"]
    found = []
    for i, (addr, op, operands) in enumerate(instrs):
        m = re.search(r"0x([0-9a-f]+)", operands) if op.split(".")[0] == "BRA" else None
        if m and int(m.group(1), 16) <= addr and int(m.group(1), 16) in index:
            lo = index[int(m.group(1), 16)]
            if not any(lo <= e <= i for e in exits):
                found.append((lo, i))
    return found


def hot_loop(instrs) -> Optional[List[int]]:
    """Instruction indices of the loop whose own body (nested loops left out) holds the most MMAs, ties to the
    longer body: a kernel's main loop, also when it contains a small loop of its own."""
    all_loops = loops(instrs)
    best, best_key = None, None
    for lo, hi in all_loops:
        nested = [(a, b) for a, b in all_loops if (a, b) != (lo, hi) and lo <= a and b <= hi]
        body = [j for j in range(lo, hi + 1) if not any(a <= j <= b for a, b in nested)]
        key = (sum(1 for j in body if instrs[j][1].split(".")[0] in _MMA), len(body))
        if best_key is None or key > best_key:
            best, best_key = body, key
    return best


def read_sass(sass: str) -> Sass:
    instrs = parse_instructions(sass)
    ops = [op for _, op, _ in instrs]
    heads = [op.split(".")[0] for op in ops]
    mma = collections.Counter(op for op, h in zip(ops, heads) if h in _MMA)
    loads = collections.Counter(k for k in map(_load_kind, ops) if k)
    atomics = collections.Counter(op for op, h in zip(ops, heads) if h in _ATOMIC)
    fences = [i for i, op in enumerate(ops) if _GPU_FENCE.match(op)]
    fenced = sum(1 for i, h in enumerate(heads) if h in _ATOMIC
                 and any(abs(i - f) <= FENCE_WINDOW for f in fences))

    def count(indices, pred):
        return sum(1 for j in indices if pred(j))

    copies = [i for i, op in enumerate(ops) if (_load_kind(op) or "").startswith(("cp.async", "tma"))]
    lead = None
    if copies:
        before = range(copies[0])
        lead = dict(instr=copies[0], ldg=count(before, lambda j: heads[j] == "LDG"),
                    mma=count(before, lambda j: heads[j] in _MMA))
    loop = None
    body = hot_loop(instrs)
    if body:
        # wgmma completion waits: WARPGROUP.DEPBAR.LE gsb0, N leaves N groups in flight; the smallest N in the loop
        # is how many a k-step keeps in flight across its wait (0: every wgmma is waited on before the next step)
        waits = [int(m.group(1), 16) for j in body if ops[j].startswith("WARPGROUP.DEPBAR")
                 for m in [re.search(r"0x([0-9a-f]+)", instrs[j][2])] if m]
        loop = dict(instr=len(body), mma=count(body, lambda j: heads[j] in _MMA),
                    bar_sync=count(body, lambda j: ops[j].startswith("BAR.SYNC")),
                    ldg=count(body, lambda j: heads[j] == "LDG"),
                    cp_async=count(body, lambda j: heads[j] == "LDGSTS"),
                    tma=count(body, lambda j: heads[j] in ("UTMALDG", "UBLKCP")),
                    mma_in_flight=min(waits) if waits else -1)
    return Sass(len(instrs), dict(mma), heads.count("FFMA"), dict(loads), heads.count("STL"), heads.count("LDL"),
                dict(atomics), fenced, len(fences), loop, lead)


def read_resources(text: str) -> Tuple[int, int]:
    """(registers per thread, stack bytes per thread) from cuobjdump --dump-resource-usage."""
    m = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if not m:
        raise ValueError(f"no REG/STACK in cuobjdump's resource usage: {text!r}")
    return int(m.group(1)), int(m.group(2))


def fmt_counts(counts: Dict[str, int]) -> str:
    return ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"


def mma_class(s: Sass) -> str:
    if not s.mma:
        return f"none (FFMA ×{s.ffma})" if s.ffma else "none"
    kinds = collections.Counter()
    for op, n in s.mma.items():
        parts = op.split(".")
        kinds[".".join([parts[0]] + parts[-2:])] += n
    return fmt_counts(kinds)
