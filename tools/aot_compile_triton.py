"""Ahead-of-time compile every Triton kernel of the "triton" backend for real GPUs, without a GPU.

Runs triton's real frontend, TTGIR layout passes, LLVM and ptxas for sm80 (A100), sm86 (RTX 3090) and sm90 (H100)
and prints, per kernel x config x dtype x variant x arch: shared memory (bytes), registers per thread, spills, and
whether it fits the arch's shared memory. Kernel arguments mirror the launchers in kasa_kernels/ops/triton_gemm.py,
triton_lowrank.py and triton_reg.py at the primary shape (M=8192, K=N=4096) and at ragged shapes, with the runtime's
specialization (ints == 1 become constexpr 1, multiples of 16 and 16-byte aligned pointers carry tt.divisibility=16).

    python tools/aot_compile_triton.py                 # everything (a few minutes on 2 cores)
    python tools/aot_compile_triton.py --quick         # bf16 + fp32 GEMMs, fewer r
    python tools/aot_compile_triton.py --kernel gemm --arch 90 --dump /tmp/ttgir   # keep .ttgir/.ptx per compile
    python tools/aot_compile_triton.py --kernel gemm --arch 90 --only tma         # jobs whose tag contains "tma"

Exit status 1 when a compile fails or a config exceeds its arch's shared memory while the launcher's prune would
keep it (the prune is kasa_kernels.ops.triton_gemm.prune_configs, its estimate smem_bytes).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from kasa_kernels.ops import triton_gemm as TG  # noqa: E402
from kasa_kernels.ops import triton_lowrank as TLR  # noqa: E402
from kasa_kernels.ops import triton_reg as TR  # noqa: E402

# Opt-in shared memory per block (bytes): cudaDevAttrMaxSharedMemoryPerBlockOptin.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 90: 227 * 1024}
ARCH_KEY = {80: (8, 0), 86: (8, 6), 90: (9, 0)}
TDT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class Ptr:
    def __init__(self, dtype: str):
        self.dtype = dtype


class Desc:
    """A host TensorDescriptor argument: the runtime's signature is the element type and the block shape."""

    def __init__(self, dtype: str, block_shape):
        self.dtype = dtype
        self.block_shape = list(block_shape)


def _compile(fn, args: dict, num_warps: int, num_stages: int, cc: int, dump: str | None, tag: str):
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        v = args[name]
        if isinstance(v, Ptr):
            signature[name] = "*" + v.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, Desc):
            signature[name] = f"tensordesc<{v.dtype}[{', '.join(map(str, v.block_shape))}]>"
        elif v is None:  # the launcher passes None for descriptors it could not build: a constexpr None
            signature[name] = "constexpr"
            constexprs[name] = None
        elif fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, int):
            if v == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{name}: {v!r}")
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    if dump:
        os.makedirs(dump, exist_ok=True)
        base = os.path.join(dump, f"{tag}_sm{cc}".replace(" ", "_").replace("/", "-"))
        for ext in ("ttgir", "ptx"):
            with open(f"{base}.{ext}", "w") as f:
                f.write(k.asm[ext])
    n_regs, stack = _resource_usage(k.asm["cubin"])
    return k.metadata.shared, n_regs, stack


_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes):
    """(registers per thread, stack bytes per thread) from cuobjdump; triton fills n_regs/n_spills only when a
    driver loads the kernel. A nonzero stack frame in these kernels (no calls, no dynamic arrays) is spilling."""
    import re
    import subprocess
    import tempfile
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return int(m.group(1)), int(m.group(2))


# ----------------------------------------------------------------------------------------------------------------
# Jobs: (tag, fn, args, num_warps, num_stages, cc, pruned_by_launcher)


def gemm_jobs(cc, dtypes, r_pads, M=8192, N=4096, K=4096):
    arch = ARCH_KEY[cc]
    jobs = []
    for dt in dtypes:
        prec = "ieee" if dt == torch.float32 else "ieee"  # fp32 follows allow_tf32 (default False); see _precision
        lowp = "tf32"
        variants = [("base", False, False, False, 16), ]
        for rp in r_pads:
            variants += [("fwd", True, True, False, rp), ("dx_p0", False, True, False, rp),
                         ("dx_drop", False, False, True, rp)]
        if dt == torch.float32:
            variants += [("fwd_tf32", True, True, False, r_pads[0])]
        for cfg in TG.GEMM_CONFIGS[arch]:
            bm, bn, bk, st, w = cfg
            for persistent, tma in TG.GEMM_VARIANTS.get(arch, [(False, False)]):
                kind = "+".join(n for n, on in (("persistent", persistent), ("tma", tma)) if on) or "plain"
                for name, bias, pro, epi, rp in variants:
                    lowrank = pro or epi
                    r_chunk = min(rp, TG.LOWRANK_CHUNK) if lowrank else 0
                    need = TG.smem_bytes(cc // 10, bm, bn, bk, st, TDT_BYTES[dt], r_chunk, tma)
                    kept = need <= SMEM_LIMIT[cc]
                    p = Ptr(TDT[dt])
                    f32 = Ptr("fp32")
                    dx = name.startswith("dx")
                    args = dict(
                        a_ptr=p, b_ptr=p, a_desc=None, b_desc=None,
                        l_ptr=f32, lb_ptr=f32 if dx else Ptr(TDT[dt]),
                        bias_ptr=p, out_ptr=p, seed_ptr=Ptr("i64"),
                        M=M, N=N, K=K, R=rp, m_bucket=M,
                        stride_am=K, stride_ak=1, stride_bk=1, stride_bn=K,
                        stride_lm=rp, stride_lr=1, stride_lbr=1, stride_lbn=rp,
                        stride_om=N, stride_on=1, keep_scale=1.1, threshold=429496730,
                        HAS_BIAS=bias, LOWRANK=lowrank, LOWRANK_DROPOUT=epi, R_CHUNK=max(r_chunk, 16),
                        INPUT_PRECISION="tf32" if name == "fwd_tf32" else prec, LOWRANK_PRECISION=lowp,
                        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, R_PAD=rp, GROUP_M=8,
                        PERSISTENT=persistent, USE_TMA=tma, TMA_OK=tma, B_K_CONTIG=not dx,
                    )
                    if dx:
                        args.update(stride_bk=K, stride_bn=1, stride_lbr=K, stride_lbn=1, stride_am=N)
                    if tma:  # the descriptors _set_tma_block_shapes gives this config
                        args.update(a_desc=Desc(TDT[dt], [bm, bk]),
                                    b_desc=Desc(TDT[dt], [bk, bn] if dx else [bn, bk]))
                    jobs.append((f"gemm {name} {TDT[dt]} r{rp} {cfg} {kind}", TG.gemm_lowrank_kernel, args, w, st,
                                 cc, kept))
    return jobs


TDT_BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


class _Dev:
    """Stands in for a torch.device of a given arch in the launchers' config helpers."""

    def __init__(self, cc):
        self.type = "cuda"
        self.cc = cc


def small_jobs(cc, dtypes, r_pads, M=8192, N=4096, K=4096):
    jobs = []
    orig = TLR.arch_key
    TLR.arch_key = lambda dev: ARCH_KEY[dev.cc]
    try:
        for rp in r_pads:
            bm, bk, w, st = TLR.small_config(_Dev(cc), rp)
            for dt in dtypes:
                x = Ptr(TDT[dt])
                f32 = Ptr("fp32")
                prec = "tf32" if dt != torch.float32 else "ieee"
                for drop, split in ((False, False), (True, False), (False, True)):
                    # split: the decode-size launch (M = 64 rows, K cut into 64-column-multiple slices)
                    m = 64 if split else M
                    args = dict(x_ptr=x, a_ptr=x, d_ptr=x, h_ptr=f32, s_ptr=f32, part_ptr=f32, seed_ptr=Ptr("i64"),
                                M=m, K=K, R=rp, k_per_split=K // 32 if split else K, stride_xm=K, stride_xk=1,
                                stride_ar=K, stride_ak=1, stride_d=1, scaling=2.0, keep_scale=1.1,
                                threshold=429496730, DROPOUT=drop, SPLIT_K=split, INPUT_PRECISION=prec,
                                BLOCK_M=bm, BLOCK_K=bk, R_PAD=rp)
                    jobs.append((f"shrink {TDT[dt]} r{rp} drop{int(drop)} split{int(split)} ({bm},{bk},w{w},s{st})",
                                 TLR.shrink_kernel, args, w, st, cc, True))
                    args = dict(x_ptr=x, gh_ptr=f32, seed_ptr=Ptr("i64"), da_ptr=f32,
                                M=M, K=K, R=rp, rows_per_split=M // 2, stride_xm=K, stride_xk=1,
                                keep_scale=1.1, threshold=429496730,
                                DROPOUT=drop, INPUT_PRECISION=prec, BLOCK_M=bm, BLOCK_K=bk, R_PAD=rp)
                    jobs.append((f"dA {TDT[dt]} r{rp} drop{int(drop)} ({bm},{bk},w{w},s{st})",
                                 TLR.da_kernel, args, w, st, cc, True))
                for det in (False, True):
                    args = dict(g_ptr=x, b_ptr=x, h_ptr=f32, d_ptr=x, gh_ptr=f32, db_ptr=f32, dd_ptr=f32,
                                M=M, N=N, R=rp, stride_gm=N, stride_gn=1, stride_bn=rp, stride_br=1, stride_d=1,
                                scaling=2.0, NEED_DB=True, NEED_DD=True, DETERMINISTIC=det, INPUT_PRECISION=prec,
                                BLOCK_M=bm, BLOCK_N=bk, R_PAD=rp)
                    fn = TLR.dy_pass_kernel
                    if "SPLIT_N" in fn.arg_names:
                        args.update(SPLIT_N=not det)
                    args.update(cols_per_split=N // 3 if not det else N)
                    jobs.append((f"dy_pass {TDT[dt]} r{rp} det{int(det)} ({bm},{bk},w{w},s{st})",
                                 fn, args, w, st, cc, True))
                if dt == dtypes[0]:
                    args = dict(gh_ptr=Ptr("fp32"), h_ptr=Ptr("fp32"), d_ptr=x, dd_ptr=Ptr("fp32"), M=M, R=rp,
                                stride_d=1, scaling=2.0, NEED_DD=True, BLOCK_M=bm, R_PAD=rp)
                    jobs.append((f"dy_finish r{rp} ({bm},w4)", TLR.dy_finish_kernel, args, 4, 1, cc, True))
                    args = dict(part_ptr=Ptr("fp32"), d_ptr=x, h_ptr=Ptr("fp32"), s_ptr=Ptr("fp32"), M=64, R=rp,
                                n_splits=32, split_stride=64 * rp, stride_d=1, scaling=2.0, keep_scale=1.1,
                                BLOCK_M=bm, R_PAD=rp)
                    jobs.append((f"shrink_finish r{rp} ({bm},w4)", TLR.shrink_finish_kernel, args, 4, 1, cc, True))
    finally:
        TLR.arch_key = orig
    return jobs


def reg_jobs(cc, r_pads):
    jobs = []
    for rp in r_pads:
        w = 4 if rp <= 32 else 8
        args = dict(fac_ptr=Ptr("fp32"), grad_ptr=Ptr("fp32"), table_ptr=Ptr("i64"), part_ptr=Ptr("fp32"),
                    beta=1e-4, gamma=1e-3, inv_layers=0.5, BLOCK_L=32, R_PAD=rp, TABLE_COLS=TR.TABLE_COLS)
        st = 3 if cc >= 90 else 1  # as the launcher in triton_reg.py
        jobs.append((f"regularizer r{rp} (L32,w{w},s{st})", TR.regularizer_kernel, args, w, st, cc, True))
    return jobs


_JOBS: list = []


def _run(i, dump):
    tag, fn, args, w, st, cc, kept = _JOBS[i]
    try:
        smem, regs, spills = _compile(fn, args, w, st, cc, dump, tag)
        return tag, cc, smem, regs, spills, kept, None
    except Exception as e:  # noqa: BLE001
        return tag, cc, None, None, None, kept, "".join(traceback.format_exception_only(type(e), e)).strip()[-600:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, nargs="*", default=[80, 86, 90])
    ap.add_argument("--kernel", choices=["all", "gemm", "small", "reg"], default="all")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--jobs", type=int, default=os.cpu_count())
    ap.add_argument("--only", default=None, help="compile only the jobs whose tag contains this, e.g. 'tma'")
    a = ap.parse_args()
    dtypes = [torch.bfloat16, torch.float32] if a.quick else [torch.bfloat16, torch.float16, torch.float32]
    r_pads = [16, 128] if a.quick else [16, 32, 64, 128]
    jobs = []
    for cc in a.arch:
        if a.kernel in ("all", "gemm"):
            jobs += gemm_jobs(cc, dtypes, [16, 128])
        if a.kernel in ("all", "small"):
            jobs += small_jobs(cc, dtypes, r_pads)
        if a.kernel in ("all", "reg"):
            jobs += reg_jobs(cc, r_pads)
    if a.only:
        jobs = [j for j in jobs if a.only in j[0]]
    _JOBS[:] = jobs
    bad = 0
    print(f"{'kernel / variant / config':72s} {'arch':>5s} {'smem':>7s} {'regs':>5s} {'stack':>6s}  note")
    import multiprocessing as mp
    with cf.ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("fork")) as ex:  # workers inherit _JOBS
        for tag, cc, smem, regs, spills, kept, err in ex.map(_run, range(len(jobs)), [a.dump] * len(jobs)):
            if err:
                note = "FAIL " + err.splitlines()[-1][:200]
                if kept:
                    bad += 1
                print(f"{tag:72s} sm{cc:<3d} {'-':>7s} {'-':>5s} {'-':>6s}  {note}", flush=True)
                continue
            over = smem > SMEM_LIMIT[cc]
            note = ""
            if over:
                note = "OVER smem limit" + ("" if not kept else " (launcher keeps it!)")
                bad += kept
            elif not kept:
                note = "pruned by launcher (fits though)"
            if spills:
                note += f" SPILLS (stack {spills} B/thread)"
            print(f"{tag:72s} sm{cc:<3d} {smem:7d} {regs:5d} {spills:6d}  {note}", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
