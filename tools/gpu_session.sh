#!/usr/bin/env bash
# One call of a lent H100/H200 (the device tool) does every GPU check this project owes, in order, each stage
# time-boxed so that a slow one cannot starve the rest and the whole call ends within 8 minutes on a cold machine:
#
#   1 env-build    the environment, and kasa_kernels._C built for sm_90 only (MAX_JOBS=16)
#   2 selfcheck    python -m kasa_kernels
#   3 correctness  tests/gpu/check_backends.py (triton and cuda against the reference: bf16/fp16/fp32, P, decode and
#                  a ragged shape, dropout on and off), tests/test_cuda.py's gpu-marked tests, and
#                  compute-sanitizer --tool memcheck over tests/gpu/sanitize_cuda.py
#   4 bench        kasa-bench at P (p = 0 and 0.1) and decode M = 64, for the twelve providers below
#   5 whole-model  the whole-model runs (32-layer regularizer, Llama training step)
#   6 profile      per-kernel device time of the fused paths at P (tools/profile_kernels.py)
#
#   bash tools/gpu_session.sh all               # on the GPU machine, from the repository root
#   bash tools/gpu_session.sh all --dry-run     # the same stages on CPU: tiny shapes, Triton's interpreter (CI runs it)
#   bash tools/gpu_session.sh bench             # one stage (env-build, selfcheck, correctness, bench, whole-model,
#                                               # profile)
#
# Everything lands in $OUT (default /tmp/kasa_gpu_out), as at most 8 files, none in a subfolder, since the device tool
# brings back 8 files at most: session.log (every stage's output, then a summary table), correctness.md, bench.json,
# whole_model.json, profile.md. Triton autotunes over the shortlist of ops/triton_gemm.py (SHORTLIST, chosen from the
# SASS report) and caches its choices on disk, so later stages reuse what earlier ones tuned.
#
# Afterwards, on the development machine: copy bench.json and whole_model.json to
# benchmarks/results/<device_slug>/<date>.json and <date>-whole-model.json, correctness.md and profile.md beside them,
# commit them with the exact command and the device, then
#   python tools/auto_preference.py benchmarks/results/*/*.json --write
# so that backend="auto" follows the measurements, and update README's results table from the report
# (kasa-bench report benchmarks/results/<device_slug>/<date>.json).
set -uo pipefail

stage=${1:?usage: gpu_session.sh all|env-build|selfcheck|correctness|bench|whole-model|profile [--dry-run]}
dry=0
[ "${2:-}" = "--dry-run" ] && dry=1
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-/tmp/kasa_gpu_out}
mkdir -p "$OUT"
LOG=$OUT/session.log
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
export KASA_KERNELS_TRITON_AUTOTUNE=shortlist TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1

PROVIDERS=cublas_linear,frozen_linear,peft,torch_eager,torch_compile,unsloth_style,triton,cuda,triton_gemm,cuda_gemm,nf4_kasa,nf4_peft_style
FUSED=cublas_linear,frozen_linear,triton,cuda,triton_gemm,cuda_gemm
if [ $dry = 0 ]; then
  # Seconds per stage, 475 in all with the closing auto-preference step, of the 480 allowed: a cold start's build of
  # one architecture on 16 cores, then each check sized to finish inside its box (the bench and the correctness suite
  # stop starting cases before theirs ends and still write their files); what a stage leaves unused goes to the next
  # (run_stage). Estimates: no GPU has run this yet.
  BOX_ENV=10; BOX_BUILD=100; BOX_SELFCHECK=25; BOX_CORRECT=70; BOX_CUDA_TESTS=35; BOX_SANITIZE=35; BOX_BENCH=110
  BOX_WHOLE=50; BOX_PROFILE=30; BOX_AUTO=10; BUDGET=475
  BUILD="KASA_KERNELS_BUILD_CUDA=1 KASA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 $PY setup.py build_ext --inplace"
  CORRECT_ARGS=""
  SANITIZE="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)"
  SANITIZE="${SANITIZE:-compute-sanitizer} --tool memcheck --error-exitcode 1 $PY tests/gpu/sanitize_cuda.py"
  BENCH_ARGS="--modes forward,backward,full --shape 8192,4096,4096,16 --shape 64,4096,4096,16 --dropout 0,0.1"
  BENCH_ARGS+=" --rep-ms 100 --warmup 2"
  WHOLE_ENV=""
  WHOLE_ARGS="--shape 16,4096,4096,16"
  PROFILE_ARGS="--dropout 0,0.1"
else
  # CPU: Triton's interpreter, tiny shapes, torch.compile off (inductor takes minutes per shape on 2 cores); the
  # build runs setup.py with the extension switched off, and the sanitizer's script only parses its arguments.
  export TRITON_INTERPRET=1 TORCH_COMPILE_DISABLE=1 CUDA_VISIBLE_DEVICES=""
  BOX_ENV=30; BOX_BUILD=120; BOX_SELFCHECK=120; BOX_CORRECT=180; BOX_CUDA_TESTS=120; BOX_SANITIZE=60
  BOX_BENCH=240; BOX_WHOLE=240; BOX_PROFILE=120; BOX_AUTO=30; BUDGET=1260
  BUILD="KASA_KERNELS_BUILD_CUDA=0 $PY setup.py build_ext --inplace"
  CORRECT_ARGS="--dry-run"
  SANITIZE="$PY tests/gpu/sanitize_cuda.py --help"
  BENCH_ARGS="--modes forward,full --device cpu --shape 48,64,40,4 --dropout 0,0.1 --rep-ms 5 --warmup 1"
  BENCH_ARGS+=" --min-reps 2 --max-reps 3"
  # the whole-model runs on the torch backend and PEFT only: through the interpreter they take minutes
  WHOLE_ENV="env -u TRITON_INTERPRET"
  WHOLE_ARGS="--device cpu --shape 8,64,40,4 --rep-ms 5 --warmup 1 --min-reps 2 --max-reps 3"
  PROFILE_ARGS="--shape 48,64,40,4 --dropout 0,0.1 --warmup 1 --iters 2"
fi

T0=$SECONDS
DEADLINE=0
SUMMARY=""
# run_stage NAME BOX COMMAND: COMMAND under `timeout` until the sum of the boxes so far (and never past BUDGET), so a
# stage that finishes early leaves its time to the next ones and a slow one cannot take theirs. The command sees its
# seconds as $STAGE_SECONDS; its output goes to session.log, its status and time to the summary.
run_stage() {
  local name=$1 box=$2 cmd=$3
  DEADLINE=$((DEADLINE + box))
  local end=$((DEADLINE < BUDGET ? DEADLINE : BUDGET))
  local t=$((end - (SECONDS - T0)))
  if [ "$t" -lt 5 ]; then
    SUMMARY+="| $name | not run: ${t} s left of its box | 0 | $box |"$'\n'
    return
  fi
  printf '\n===== %s (%s s) =====\n$ %s\n' "$name" "$t" "$cmd" >> "$LOG"
  local s=$SECONDS
  STAGE_SECONDS=$t timeout -k 3 "$t" bash -c "$cmd" >> "$LOG" 2>&1
  local rc=$?
  local status="ok"
  [ $rc -ne 0 ] && status="exit $rc"
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="TIMED OUT"
  SUMMARY+="| $name | $status | $((SECONDS - s)) | $t |"$'\n'
  echo "[$((SECONDS - T0)) s] $name: $status" | tee -a "$LOG"
}

stage_env_build() {
  run_stage env "$BOX_ENV" "uname -a; nproc; free -g; (nvidia-smi || echo 'no nvidia-smi'); $PY -c 'import sys, \
torch, triton; print(sys.version); print(\"torch\", torch.__version__, \"triton\", triton.__version__, \"cuda\", \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no GPU\")'; \
(command -v nvcc && nvcc --version | tail -2) || echo 'no nvcc'"
  run_stage build "$BOX_BUILD" "$BUILD > $OUT/.build.log 2>&1; rc=\$?; tail -25 $OUT/.build.log; \
rm -f $OUT/.build.log; exit \$rc"
}
stage_selfcheck() { run_stage selfcheck "$BOX_SELFCHECK" "$PY -m kasa_kernels"; }
stage_correctness() {
  run_stage correctness "$BOX_CORRECT" "$PY tests/gpu/check_backends.py $CORRECT_ARGS \
--budget-s \$((STAGE_SECONDS > 35 ? STAGE_SECONDS - 25 : 10)) --out $OUT/correctness.md"
  run_stage cuda-tests "$BOX_CUDA_TESTS" "$PY -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py"
  run_stage sanitize "$BOX_SANITIZE" "$SANITIZE"
}
stage_bench() {
  run_stage bench "$BOX_BENCH" "$PY -m kasa_kernels.bench run --providers $PROVIDERS $BENCH_ARGS --no-whole-model \
--time-budget-s \$((STAGE_SECONDS > 70 ? STAGE_SECONDS - 50 : 20)) --out $OUT/bench.json"
}
stage_whole_model() {
  run_stage whole-model "$BOX_WHOLE" "$WHOLE_ENV $PY -m kasa_kernels.bench run --providers torch_eager --modes full \
$WHOLE_ARGS --whole-model --out $OUT/whole_model.json"
}
stage_profile() {
  run_stage profile "$BOX_PROFILE" "$PY tools/profile_kernels.py --providers $FUSED --modes forward,full \
$PROFILE_ARGS --out $OUT/profile.md"
}

case "$stage" in
  all) stage_env_build; stage_selfcheck; stage_correctness; stage_bench; stage_whole_model; stage_profile ;;
  env-build) stage_env_build ;;
  selfcheck) stage_selfcheck ;;
  correctness) stage_correctness ;;
  bench) stage_bench ;;
  whole-model) stage_whole_model ;;
  profile) stage_profile ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac

# What auto's table would become with this run's results (nothing is written here; see the header).
[ -f "$OUT/bench.json" ] && run_stage auto-preference "$BOX_AUTO" "$PY tools/auto_preference.py $OUT/bench.json"
{
  printf '\n===== summary: %s s in all (budget %s s) =====\n' "$((SECONDS - T0))" "$BUDGET"
  printf '| stage | status | s | box |\n|---|---|---:|---:|\n%s' "$SUMMARY"
  ls -l "$OUT"
} | tee -a "$LOG"
grep -q -E '\| (exit|TIMED OUT|not run)' <<< "$SUMMARY" && exit 1
exit 0
