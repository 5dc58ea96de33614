"""Builds the CPU emulator of csrc/'s kernels with g++ (used by tests/test_cuda_emulation.py; also runnable by hand:
`python tests/cuda_emu/build.py OUT_DIR`).

The kernels are csrc/'s own text. g++ cannot parse four CUDA-only constructs, so the sources are copied with exactly
these mechanical substitutions, each checked to leave none of the construct behind:
  - kasa_common.cuh's section of inline-asm PTX wrappers (cp.async, ldmatrix, mma.sync, cvt.tf32) -> emu_ptx.h;
  - `kernel<<<grid, block, smem, stream>>>(args)`  -> `::emu::launch(kernel, grid, block, smem, stream)(args)`;
  - `extern __shared__ ... name[];`                -> a pointer to the block's dynamic shared memory;
  - `__shared__ T name[..];`                       -> a static shared by the block's threads, refilled with NaN
                                                      bytes at the start of every block.
Everything else, host launchers and split heuristics included, is compiled as written.
"""
import os
import re
import runpy
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[1] / "csrc"
# the dropout hash's constants, defined once in Python (the file imports nothing)
RNG_DEFINES = runpy.run_path(str(HERE.parents[1] / "kasa_kernels" / "ops" / "rng_constants.py"))["cxx_defines"]()
# Longest compile first (the fp32 GEMM has both TF32 and FFMA kernels), so that two workers finish together.
UNITS = ["gemm_lowrank_f32.cu", "gemm_lowrank_bf16.cu", "gemm_lowrank_f16.cu", "dy_pass.cu", "lowrank_da.cu",
         "lowrank_shrink.cu", "regularizer.cu", "kasa_device.cu"]
HEADERS = ["kasa_common.cuh", "kasa_launch.h", "gemm_lowrank.cuh"]
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
CXXFLAGS = ["-std=c++20", "-O1", "-g0", "-pthread", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
            "-Wno-unused-variable", "-Wno-unused-but-set-variable"]

_PTX_START = "// ---- PTX wrappers:"
_PTX_END = "// ---- end of PTX wrappers"
_LAUNCH = re.compile(r"^(\s*)(\S.*?)<<<(.*?)>>>\((.*)\);\s*$", re.M)
_DYN_SMEM = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?unsigned char (\w+)\[\];")
_STATIC_SMEM = re.compile(r"__shared__ ((?:__align__\(\d+\) )?[\w:]+) (\w+)((?:\[[^\]\n]+\])*);")


def prepare(text, name):
    if name == "kasa_common.cuh":
        a, b = text.index(_PTX_START), text.index(_PTX_END)
        assert text.count(_PTX_START) == 1 and text.count(_PTX_END) == 1 and a < b
        text = text[:a] + '#include "emu_ptx.h"\n' + text[text.index("\n", b) + 1:]
    text = _LAUNCH.sub(lambda m: f"{m[1]}::emu::launch({m[2]}, {m[3]})({m[4]});", text)
    text = _DYN_SMEM.sub(r"unsigned char* const \1 = ::emu::dynamic_smem();", text)
    text = _STATIC_SMEM.sub(r"static \1 \2\3; ::emu::shared_fresh(&\2, sizeof(\2));", text)
    code = re.sub(r"//[^\n]*", "", text)  # comments may mention the constructs
    for left in ("<<<", "__shared__", "asm ", "asm(", "__cvta"):
        assert left not in code, f"{name}: `{left}` survived the emulation rewrite; extend build.py"
    return text


def build(out_dir, jobs=2, sanitize=True, cxx="g++", incremental=False):
    """Builds OUT_DIR/kasa_emu. incremental: keep objects whose inputs (every prepared source and header, the
    emulator's headers, the flags) are unchanged since the last build in OUT_DIR (for mutation runs by hand)."""
    out = Path(out_dir)
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in HEADERS + UNITS:
        (src / name).write_text(prepare((CSRC / name).read_text(), name))
    flags = (CXXFLAGS + (SANITIZE if sanitize else []) + RNG_DEFINES
             + ["-I", str(src), "-I", str(HERE), "-I", str(HERE / "include")])
    jobs_list = ([(src / u, out / (u + ".o"), ["-x", "c++"]) for u in UNITS]
                 + [(HERE / f, out / (f + ".o"), []) for f in ("driver.cpp", "kat.cpp")])
    # A unit's inputs: itself, every shared header (prepared or emulator) and the flags.
    shared = "".join((src / h).read_text() for h in HEADERS) + "".join(
        p.read_text() for p in sorted(HERE.glob("*.h")) + sorted((HERE / "include").glob("*.h"))) + " ".join(flags)

    def compile_one(job):
        s, o, lang = job
        stamp = o.with_suffix(".inputs")
        inputs = s.read_text() + shared + " ".join(lang) + cxx
        if incremental and o.exists() and stamp.exists() and stamp.read_text() == inputs:
            return s, subprocess.CompletedProcess([], 0, "", "")
        r = subprocess.run([cxx, *flags, *lang, "-c", str(s), "-o", str(o)], capture_output=True, text=True)
        if r.returncode == 0:
            stamp.write_text(inputs)
        return s, r

    with ThreadPoolExecutor(max_workers=jobs) as ex:
        for s, r in ex.map(compile_one, jobs_list):
            if r.returncode != 0:
                raise RuntimeError(f"compiling {s.name} failed:\n{r.stderr[-6000:]}")
    exe = out / "kasa_emu"
    link = [cxx, *flags, *(str(o) for _, o, _ in jobs_list), "-o", str(exe)]
    r = subprocess.run(link, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking failed:\n{r.stderr[-6000:]}")
    return exe


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "build/cuda_emu", jobs=os.cpu_count() or 2))
