"""SASS facts of csrc/'s fused GEMM, dY pass and dA kernels: what the compiled code does, read off the machine code.

Each translation unit is compiled to a cubin per architecture with the toolkit's nvcc (the flags setup.py's build
gives nvcc, plus ptxas -v for registers and spills), disassembled with cuobjdump -sass, and each kernel's main loop
(the backward branch whose body holds the most tensor-core, or else FFMA, instructions) is counted:

- GEMM: HMMA by shape, LDSM (ldmatrix) and other shared loads feeding it, generic (LD) loads, LDGSTS (cp.async);
- dY pass and dA: global loads by width, in the main loop and in the whole kernel;
- every kernel: registers, spill stores and loads (ptxas), local-memory instructions (LDL/STL).

    python tools/sass_facts.py                                   # report for sm_80 and sm_86 (markdown, stdout)
    python tools/sass_facts.py --out csrc/sass_facts.md --check  # write it; exit 1 if a fact below does not hold
    python tools/sass_facts.py --csrc OTHER/csrc --archs 80      # another tree's kernels (e.g. an older commit)

--check holds the GEMM and the rank-r backward kernels to these facts (issue #15): in every tensor-core GEMM main
loop LDSM feeds HMMA (HMMA.16816.F32 for fp16/bf16, HMMA.1688.F32.TF32 for fp32) and no generic LD appears; no
GEMM, dY-pass or dA kernel spills; the dY pass and dA stream their big operand with 16-byte cp.async
(LDGSTS.E.BYPASS.128) in the main loop. --compile-archs (default 90) are compiled and must build, without a report.
cuobjdump comes from the CUDA toolkit, from PATH, or from the copy that the triton wheel ships.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
UNITS = ("gemm_lowrank_bf16.cu", "gemm_lowrank_f16.cu", "gemm_lowrank_f32.cu", "dy_pass.cu", "lowrank_da.cu")
# torch's BuildExtension passes these to nvcc; the kernels must compile (and are measured) under them.
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
# address, predicate, opcode, operands. `@!PT` instructions never execute (ptxas's placeholders) and are skipped.
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*?);", re.MULTILINE)


def nvcc_path() -> str:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = os.path.join(home, "bin", "nvcc") if home else shutil.which("nvcc")
    if not cand or not os.path.exists(cand):
        raise SystemExit("sass_facts: nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    return cand


def cuobjdump_path(nvcc: str) -> str:
    """The toolkit's cuobjdump, else PATH's, else the one the triton wheel ships (this machine's toolkit has none)."""
    real = os.path.realpath(nvcc)
    cands = [os.path.join(os.path.dirname(real), "cuobjdump"), shutil.which("cuobjdump") or ""]
    with open(real, "rb") as f:  # a wrapper script (`exec /usr/local/cuda-X/bin/nvcc "$@"`) names the toolkit
        head = f.read(4096)
    cands += [os.path.join(os.path.dirname(m.decode()), "cuobjdump") for m in re.findall(rb"(/\S*/bin/nvcc)\b", head)]
    try:
        import triton

        cands.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    raise SystemExit("sass_facts: cuobjdump not found (CUDA toolkit, PATH, or the triton wheel)")


def compile_unit(nvcc: str, csrc: str, unit: str, arch: str, out_dir: str) -> tuple[str, str]:
    """(cubin path, ptxas -v log) of one translation unit."""
    rng = runpy.run_path(os.path.join(ROOT, "kasa_kernels", "ops", "rng_constants.py"))["cxx_defines"]()
    cubin = os.path.join(out_dir, f"{unit}.sm_{arch}.cubin")
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-lineinfo", "-I", csrc, *rng, *TORCH_NVCC_FLAGS,
           "-Xptxas", "-v", os.path.join(csrc, unit), "-o", cubin]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"sass_facts: {unit} does not compile for sm_{arch}:\n{r.stderr[-4000:]}")
    return cubin, r.stderr


def ptxas_resources(log: str) -> dict[str, dict[str, int]]:
    """mangled kernel -> {regs, spill_st, spill_ld, stack} from ptxas -v."""
    out: dict[str, dict[str, int]] = {}
    cur: dict[str, int] | None = None
    for line in log.splitlines():
        m = re.search(r"(?:Function properties for |Compiling entry function ')([^'\s]+)", line)
        if m:
            cur = out.setdefault(m.group(1), {})
        elif cur is not None and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                                                 r"spill loads", line)):
            cur.update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        elif cur is not None and (m := re.search(r"Used (\d+) registers", line)):
            cur["regs"] = int(m.group(1))
    return out


def parse_insns(body: str) -> list[tuple[int, str, str]]:
    """[(address, opcode, operands)] of one function's SASS listing, without the never-executed @!PT placeholders."""
    return [(int(a, 16), op, rest.strip()) for a, pred, op, rest in _INSN.findall(body) if pred.strip() != "@!PT"]


def sass_functions(cuobjdump: str, cubin: str) -> dict[str, list[tuple[int, str, str]]]:
    """mangled kernel -> its instructions, from cuobjdump -sass."""
    text = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"^\s*Function : (\S+)\s*$", text, flags=re.MULTILINE)
    return {name: parse_insns(body) for name, body in zip(parts[1::2], parts[2::2])}


def loops(insns: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(start, end) address ranges closed by a backward branch."""
    found = []
    for addr, op, rest in insns:
        if op.startswith("BRA"):
            m = re.match(r"\s*(0x[0-9a-f]+)", rest)
            if m and int(m.group(1), 16) < addr:
                found.append((int(m.group(1), 16), addr))
    return found


def main_loop(insns, key) -> list[tuple[int, str, str]]:
    """The instructions of the loop with the most instructions matching `key` (the innermost such loop on ties)."""
    best, best_score = [], (0, 0)
    for lo, hi in loops(insns):
        body = [i for i in insns if lo <= i[0] <= hi]
        score = (sum(1 for i in body if key(i[1])), -len(body))
        if score > best_score:
            best, best_score = body, score
    return best


def short_name(mangled: str) -> str:
    try:
        name = subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled
    name = re.sub(r"^void ", "", name)
    depth = 0
    for i in range(len(name) - 1, -1, -1):  # drop the parameter list: the parenthesis that closes at the end
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0 and name[i] == "(":
            name = name[:i]
            break
    for junk in ("kasa::", "gemm::", "(anonymous namespace)::", "__nv_"):
        name = name.replace(junk, "")
    return name.replace("(Math)0", "TC16").replace("(Math)1", "TF32").replace("(Math)2", "FFMA")


def kind_of(name: str) -> str | None:
    if "gemm_lowrank_kernel" in name:
        return "gemm"
    if "dy_pass_kernel" in name:
        return "dy"
    if "lowrank_da" in name and "kernel" in name:
        return "da"
    return None


def is_generic_load(op: str) -> bool:
    return op == "LD" or op.startswith("LD.")


def facts(insns, res, kind, name) -> dict[str, object]:
    ops = Counter(op for _, op, _ in insns)
    tensor = any(op.startswith("HMMA") for op in ops)
    loop = main_loop(insns, (lambda o: o.startswith("HMMA")) if tensor else (lambda o: o.startswith("FFMA")))
    lops = Counter(op for _, op, _ in loop)
    f: dict[str, object] = {
        "kernel": name, "kind": kind, "regs": res.get("regs"), "spill": (res.get("spill_st", 0), res.get("spill_ld", 0)),
        "local": sum(n for op, n in ops.items() if op.startswith(("LDL", "STL"))),
        "loop_insns": len(loop),
        "hmma": {op: n for op, n in lops.items() if op.startswith("HMMA")},
        "ldsm": sum(n for op, n in lops.items() if op.startswith("LDSM")),
        "lds": sum(n for op, n in lops.items() if op.startswith("LDS") and not op.startswith("LDSM")),
        "ld_generic": sum(n for op, n in lops.items() if is_generic_load(op)),
        "ffma": lops.get("FFMA", 0),
        "ldgsts128": sum(n for op, n in lops.items() if op.startswith("LDGSTS") and ".128" in op),
        "global_loads_loop": {op: n for op, n in sorted(lops.items()) if op.startswith(("LDG", "LD.", "LDGSTS"))
                              and op != "LDGDEPBAR"},
        "global_loads_kernel": {op: n for op, n in sorted(ops.items()) if op.startswith(("LDG", "LD.", "LDGSTS"))
                                and op != "LDGDEPBAR"},
    }
    return f


def is_stub(f) -> bool:
    """The wide tile's kernels outside sm80/sm87: compiled as a trap, never launched there (gemm_lowrank.cuh)."""
    return f["kind"] == "gemm" and "TileWide" in f["kernel"] and f["loop_insns"] == 0 and not f["hmma"]


def violations(f) -> list[str]:
    if is_stub(f):
        return []
    bad = []
    if f["spill"] != (0, 0) or f["local"]:
        bad.append(f"spills ({f['spill'][0]} B stored, {f['spill'][1]} B loaded, {f['local']} local-memory insts)")
    if f["kind"] == "gemm" and f["hmma"]:
        if not f["ldsm"]:
            bad.append("no LDSM in the main loop")
        if f["ld_generic"]:
            bad.append(f"{f['ld_generic']} generic LD in the main loop")
        if "TC16" in f["kernel"] and not any(op.startswith("HMMA.16816.F32") for op in f["hmma"]):
            bad.append("no HMMA.16816.F32 in the main loop")
        if "TF32" in f["kernel"] and not any(op.startswith("HMMA.1688.F32.TF32") for op in f["hmma"]):
            bad.append("no HMMA.1688.F32.TF32 in the main loop")
    if f["kind"] == "gemm" and not f["hmma"] and "FFMA" not in f["kernel"]:
        bad.append("no HMMA at all")
    if f["kind"] in ("dy", "da") and not f["ldgsts128"]:
        bad.append("no 16-byte cp.async (LDGSTS.E.BYPASS.128) in the main loop")
    return bad


def compile_units(nvcc: str, csrc: str, arch: str, out_dir: str, jobs: int) -> list[tuple[str, str]]:
    """compile_unit for every unit of UNITS, `jobs` at a time."""
    with ThreadPoolExecutor(max_workers=jobs) as ex:
        return list(ex.map(lambda u: compile_unit(nvcc, csrc, u, arch, out_dir), UNITS))


def analyse(csrc: str, arch: str, nvcc: str, cuobjdump: str, tmp: str, jobs: int) -> list[dict[str, object]]:
    rows = []
    for cubin, log in compile_units(nvcc, csrc, arch, tmp, jobs):
        res = ptxas_resources(log)
        for mangled, insns in sass_functions(cuobjdump, cubin).items():
            name = short_name(mangled)
            kind = kind_of(name)
            if kind:
                rows.append(facts(insns, res.get(mangled, {}), kind, name))
    return rows


def fmt_counts(d: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in d.items()) or "-"


def report(results: dict[str, list[dict[str, object]]], header: str) -> tuple[str, int]:
    lines = [header, ""]
    n_bad = 0
    for arch, rows in results.items():
        lines += [f"## sm_{arch}", "", "### GEMM (gemm_lowrank_kernel): main loop", "",
                  ("| kernel | regs | spill st/ld B | loop insts | HMMA | LDSM | other LDS | generic LD | LDGSTS.128 "
                   "| FFMA | facts |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
        for f in (r for r in rows if r["kind"] == "gemm"):
            bad = violations(f)
            n_bad += bool(bad)
            lines.append(f"| `{f['kernel']}` | {f['regs']} | {f['spill'][0]}/{f['spill'][1]} | {f['loop_insns']} | "
                         f"{fmt_counts(f['hmma'])} | {f['ldsm']} | {f['lds']} | {f['ld_generic']} | {f['ldgsts128']} | "
                         f"{f['ffma']} | {'; '.join(bad) or ('stub, never launched here' if is_stub(f) else 'hold')} |")
        lines += ["", "### dY pass and dA: global loads", "",
                  ("| kernel | regs | spill st/ld B | loop insts | FFMA | global loads in the main loop "
                   "| in the whole kernel | facts |"), "|---|---|---|---|---|---|---|---|"]
        for f in (r for r in rows if r["kind"] in ("dy", "da")):
            bad = violations(f)
            n_bad += bool(bad)
            lines.append(f"| `{f['kernel']}` | {f['regs']} | {f['spill'][0]}/{f['spill'][1]} | {f['loop_insns']} | "
                         f"{f['ffma']} | {fmt_counts(f['global_loads_loop'])} | "
                         f"{fmt_counts(f['global_loads_kernel'])} | {'; '.join(bad) or 'hold'} |")
        lines.append("")
    return "\n".join(lines), n_bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csrc", default=os.path.join(ROOT, "csrc"))
    ap.add_argument("--archs", default="80,86", help="architectures to report (comma-separated)")
    ap.add_argument("--compile-archs", default="90", help="architectures that must only compile")
    ap.add_argument("--out", help="also write the report here")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every fact holds")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args(argv)
    nvcc = nvcc_path()
    cuobjdump = cuobjdump_path(nvcc)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip().splitlines()[-1]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arch in [a for a in args.compile_archs.split(",") if a]:
            compile_units(nvcc, args.csrc, arch, tmp, args.jobs)
        for arch in [a for a in args.archs.split(",") if a]:
            results[arch] = analyse(args.csrc, arch, nvcc, cuobjdump, tmp, args.jobs)
    rel = os.path.relpath(args.csrc, ROOT)
    header = (f"# SASS facts of {rel}/ ({', '.join(UNITS)})\n\n"
              f"Written by `python tools/sass_facts.py{' --csrc ' + rel if rel != 'csrc' else ''} --archs "
              f"{args.archs} --compile-archs {args.compile_archs}` on {datetime.date.today().isoformat()} with "
              f"{version} (also compiled, not reported: sm_{args.compile_archs.replace(',', ', sm_') or '-'}).\n"
              "Counts are static instructions in the main loop (the backward branch whose body holds the most HMMA, "
              "or FFMA), read from `cuobjdump -sass`; registers and spills from `ptxas -v`. Kernel names: dtype, math "
              "(TC16 = mma.sync m16n8k16, TF32 = m16n8k8, FFMA = exact fp32), tile, B k-major (forward), masked "
              "rank-r prologue (backward with dropout); dY pass: dtype, rank tile, TF32 tensor cores; dA: dtype, "
              "rank tile, dropout, TF32 tensor cores. Counts are static, so a loop's branches all count: the narrower "
              "global loads (LDG.E.U16, LDG.E) in the dY pass's and dA's main loops are the element-load path that "
              "rows which are not 16-byte aligned take instead of LDGSTS (one branch per tile).")
    text, n_bad = report(results, header)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.check and n_bad:
        print(f"sass_facts: {n_bad} kernel(s) miss a fact", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
