"""The GPU-session tools run end to end on CPU (their GPU paths run in a GPU session): tools/profile_kernels.py,
the SASS reading of tools/sass_report.py and the ahead-of-time report of tools/aot_compile_triton.py."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_profile_kernels_writes_a_table_per_provider_and_mode(tmp_path):
    out = tmp_path / "profile.md"
    rc = _load("profile_kernels").main(["--shape", "32,48,40,4", "--providers", "frozen_linear,torch_eager,triton",
                                        "--modes", "forward,full", "--warmup", "1", "--iters", "2", "--out", str(out)])
    assert rc == 0
    md = out.read_text()
    for section in ("## frozen_linear, forward", "## torch_eager, forward", "## frozen_linear, full",
                    "## torch_eager, full"):
        assert section in md, section
    assert "triton / forward: skipped" in md  # not usable on CPU: said, not silently dropped
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| kernel")]
    assert rows and all(float(ln.split("|")[3]) >= 0 for ln in rows)
    assert "KasaLinearFunction" in md  # the torch backend's forward shows up as its own operator


def test_profile_kernels_defaults_are_registry_providers():
    from kasa_kernels.bench.providers import PROVIDERS

    mod = _load("profile_kernels")
    assert set(mod.NOT_BY_DEFAULT) <= set(PROVIDERS)
    for default in (mod.GPU_DEFAULT, mod.CPU_DEFAULT):
        assert default and set(default.split(",")) <= set(PROVIDERS)


# ----------------------------------------------------------------------------------------------------------------
# tools/sass_report.py (reading SASS) and tools/aot_compile_triton.py (the ahead-of-time report that uses it)

# A made-up listing in cuobjdump -sass's format: a pipelined loop (0x0040-0x00b0) holding a retry loop of its own,
# rank-r wgmmas after it, an unfenced reduction, a fenced atomic, spill traffic, and a retry stub after the EXITs that
# branches back into the code (ptxas places mbarrier-wait retries there): taken for a loop, its body would hold the
# most MMAs.
LISTING = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                      /* 0x00000a00ff017b82 */
        /*0010*/                   LDG.E.64 R8, desc[UR4][R2.64] ;
        /*0020*/                   LDGSTS.E.BYPASS.128 [R10], desc[UR4][R4.64], P1 ;
        /*0030*/                   STL [R1+0x8], R20 ;
        /*0040*/                   LDGSTS.E.64 [R11], desc[UR4][R6.64] ;
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0060*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR12].tnspB, R24 ;
        /*0070*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR12].tnspB, R24, gsb0 ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0090*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x20000], R4 ;
        /*00a0*/               @!P0 BRA 0x90 ;
        /*00b0*/               @!P2 BRA 0x40 ;
        /*00c0*/                   HGMMA.64x256x8.F32.TF32 R24, gdesc[UR24], R24 ;
        /*00d0*/                   HGMMA.64x256x8.F32.TF32 R24, gdesc[UR24], R24 ;
        /*00e0*/                   HGMMA.64x256x8.F32.TF32 R24, gdesc[UR24], R24, gsb0 ;
        /*00f0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0100*/                   LDL R20, [R1+0x8] ;
        /*0110*/                   REDG.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R3 ;
        /*0120*/                   FFMA R5, R6, R7, R5 ;
        /*0130*/                   FFMA R5, R6, R7, R5 ;
        /*0140*/                   FFMA R5, R6, R7, R5 ;
        /*0150*/                   FFMA R5, R6, R7, R5 ;
        /*0160*/                   MEMBAR.ALL.GPU ;
        /*0170*/                   ERRBAR ;
        /*0180*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R9, desc[UR4][R2.64], R3 ;
        /*0190*/                   CCTL.IVALL ;
        /*01a0*/               @P3 EXIT ;
        /*01b0*/                   EXIT ;
        /*01c0*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR8+0x20000], R4 ;
        /*01d0*/                   BRA 0x20 ;
        /*01e0*/                   BRA 0x1e0;
"""


def test_sass_report_reads_loads_mma_spills_fences_and_the_hot_loop():
    sr = _load("sass_report")
    s = sr.read_sass(LISTING)
    assert s.n_instr == 31
    assert s.mma == {"HGMMA.64x256x16.F32.BF16": 2, "HGMMA.64x256x8.F32.TF32": 3} and s.ffma == 4
    assert s.loads == {"ldg 8B": 1, "cp.async 16B": 1, "cp.async 8B": 1}
    assert (s.stl, s.ldl) == (1, 1)
    assert s.atomics == {"REDG.E.ADD.F32.FTZ.RN.STRONG.GPU": 1, "ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU": 1}
    assert s.fenced_atomics == 1 and s.gpu_fences == 3  # the ATOMG has three beside it; the REDG is 5 away
    # the loop back to 0x40 (its retry loop left out of its own body); the stub's branch to 0x20 is no loop
    assert s.loop == dict(instr=6, mma=2, bar_sync=1, ldg=0, cp_async=1, tma=0, mma_in_flight=1)
    assert s.lead == dict(instr=2, ldg=1, mma=0)
    assert sr.fmt_counts(s.loads) == "cp.async 16B ×1, cp.async 8B ×1, ldg 8B ×1"
    assert sr.mma_class(s) == "HGMMA.F32.TF32 ×3, HGMMA.F32.BF16 ×2"
    assert sr.read_resources(" Function k:\n  REG:255 STACK:1864 SHARED:1024 LOCAL:0") == (255, 1864)


def test_aot_report_on_one_compiled_kernel(tmp_path):
    # The real path end to end, kept to one small kernel: capture the decode case's launches from the launchers,
    # specialize and compile dy_finish_kernel for sm90, read its SASS. Its dd reduction is an atomic add, which must
    # carry no GPU-scope fence (relaxed ordering).
    out, dump = tmp_path / "report.md", tmp_path / "dump"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "aot_compile_triton.py"), "--arch", "90",
                           "--case", "decode", "--kernel", "dy_finish", "--jobs", "1", "--out", str(out),
                           "--dump", str(dump)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import triton

    md = out.read_text()
    assert f"triton {triton.__version__}" in md
    assert "**pass**: no GPU-scope fence beside any atomic" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| dy_finish")]
    assert len(rows) == 1 and "decode/backward" in rows[0]
    sass = next(dump.glob("dy_finish*_sm90.sass")).read_text()
    s = _load("sass_report").read_sass(sass)
    assert s.atomics and all(op.startswith(("RED", "ATOM")) for op in s.atomics)
    assert s.fenced_atomics == 0 and s.gpu_fences == 0
    assert s.stl == s.ldl == 0 and s.loads


# ----------------------------------------------------------------------------------------------------------------
# tools/gpu_session.sh: the one call of a GPU session

SESSION = os.path.join(ROOT, "tools", "gpu_session.sh")
SESSION_FILES = {"session.log", "correctness.md", "bench.json", "whole_model.json", "profile.md"}
STAGES = ("env", "build", "selfcheck", "correctness", "cuda-tests", "sanitize", "bench", "whole-model", "profile",
          "auto-preference")


def test_gpu_session_boxes_fit_the_device_call():
    # The device tool allows 10 minutes a command and the issue 8 for `all` on a cold machine: the GPU branch's
    # stage boxes (and the budget that clamps them) must stay within 480 s.
    import re

    text = open(SESSION).read()
    gpu_branch = text[text.index("if [ $dry = 0 ]; then"):text.index("\nelse\n")]
    boxes = {k: int(v) for k, v in re.findall(r"BOX_(\w+)=(\d+)", gpu_branch)}
    budget = int(re.search(r"BUDGET=(\d+)", gpu_branch).group(1))
    assert set(boxes) == {"ENV", "BUILD", "SELFCHECK", "CORRECT", "CUDA_TESTS", "SANITIZE", "BENCH", "WHOLE",
                          "PROFILE", "AUTO"}
    assert sum(boxes.values()) <= budget <= 480, (boxes, budget)


def test_gpu_session_dry_run(tmp_path):
    # Every stage of `gpu_session.sh all`, as the GPU session will run it, on CPU with tiny shapes and the
    # interpreter: a typo, a renamed option or a provider that crashes fails here instead of in a GPU's few minutes.
    import json
    import re

    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", SESSION, "all", "--dry-run"], capture_output=True, text=True, timeout=1500, env=env)
    log = (tmp_path / "session.log").read_text() if (tmp_path / "session.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:] + log[-6000:]
    for stage in STAGES:
        assert re.search(rf"^\| {stage} \| ok \|", proc.stdout, re.M), stage
    # what the device tool brings back: at most 8 plain files, no folders, plain names
    names = sorted(os.listdir(tmp_path))
    assert set(names) == SESSION_FILES and all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names), names
    bench = json.loads((tmp_path / "bench.json").read_text())
    asked = set(re.search(r"^PROVIDERS=(\S+)", open(SESSION).read(), re.M).group(1).split(","))
    ran = {r["provider"] for r in bench["rows"]}
    skipped = {s["provider"]: s["reason"] for s in bench["skipped"] if "provider" in s and "case" not in s}
    failed = [s for s in bench["skipped"] if s.get("reason", "").startswith("run failed")]
    assert not failed, failed  # a provider that crashed would lose its GPU measurement
    assert ran | set(skipped) == asked and {"triton", "triton_gemm"} <= ran
    # no extension on CPU tensors: said, not silently dropped (and the NF4 pair where bitsandbytes is not installed)
    assert set(skipped) - {"nf4_kasa", "nf4_peft_style"} == {"cuda", "cuda_gemm"}
    correctness = (tmp_path / "correctness.md").read_text()
    assert "\n0 failed;" in correctness and correctness.count("| triton | ok |") >= 8
    whole = json.loads((tmp_path / "whole_model.json").read_text())
    assert {r["kind"] for r in whole["whole_model"]} >= {"regularizer"}
    profile = (tmp_path / "profile.md").read_text()
    assert "## triton, full" in profile and "## triton_gemm, forward" in profile and "p=0.1" in profile
