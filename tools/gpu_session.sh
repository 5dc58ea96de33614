#!/usr/bin/env bash
# The GPU checks a lent H100/H200 session owes, batched for the device tool (one stage per call, each < 10 min).
# Run from the repository root on the GPU machine; results land in $OUT (the device tool brings them back).
#
#   bash tools/gpu_session.sh build-test   # build kasa_kernels._C for sm_90, self-check, the gpu-marked tests
#   bash tools/gpu_session.sh sanitize     # compute-sanitizer memcheck over tests/gpu/sanitize_cuda.py
#   bash tools/gpu_session.sh bench        # kasa-bench at P (+ decode sizes), every provider, with the report
#   bash tools/gpu_session.sh whole-model  # the 32-layer regularizer and the Llama training step
#   bash tools/gpu_session.sh profile      # per-kernel time at P and at decode M=64 (where a missed target goes)
#
# Then commit $OUT's results under benchmarks/results/<device>/ with this exact command and the device name, and run
# `python tools/auto_preference.py benchmarks/results/*/*.json --write` so `auto` follows the measurements.
set -uo pipefail
stage=${1:?usage: gpu_session.sh build-test|sanitize|bench|whole-model|profile}
OUT=${OUT:-/tmp/kasa_gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

ensure_built() {
  # A machine that went back between calls comes up bare: build again (sm_90 only, the card in hand; 16 cores).
  if ! $PY -c "import kasa_kernels._C" 2>/dev/null; then
    KASA_KERNELS_BUILD_CUDA=1 KASA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 \
      $PY -m pip install --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
  fi
}

case "$stage" in
  build-test)
    { nvidia-smi; $PY -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
      > "$OUT/env.txt" 2>&1
    ensure_built
    $PY -m kasa_kernels > "$OUT/selfcheck.txt" 2>&1
    # bounded so the call returns (with the log) inside the device tool's 10-minute limit even if autotuning
    # (28 configs per GEMM key on sm90) runs long; the sanitizer is a stage of its own
    timeout 420 $PY -m pytest -q -m gpu -p no:cacheprovider --durations=20 tests > "$OUT/gpu_tests.log" 2>&1
    echo "pytest rc=$?" >> "$OUT/gpu_tests.log"
    tail -3 "$OUT/selfcheck.txt"; tail -40 "$OUT/gpu_tests.log"
    ;;
  sanitize)
    ensure_built
    timeout 500 compute-sanitizer --tool memcheck --error-exitcode 1 $PY tests/gpu/sanitize_cuda.py \
      > "$OUT/sanitizer.log" 2>&1
    echo "sanitizer rc=$?" >> "$OUT/sanitizer.log"
    tail -20 "$OUT/sanitizer.log"
    ;;
  bench)
    ensure_built
    $PY -m kasa_kernels.bench run --preset p --no-whole-model --time-budget-s 420 --out "$OUT/results" --report 2>&1 \
      | tee "$OUT/bench.log" | tail -40
    ;;
  whole-model)
    ensure_built
    $PY -m kasa_kernels.bench run --preset p --providers peft,torch_eager --modes full --whole-model \
      --shape 16,4096,4096,16 --time-budget-s 300 --out "$OUT/results" 2>&1 | tee "$OUT/whole_model.log" | tail -20
    ;;
  profile)
    ensure_built
    $PY tools/profile_kernels.py --out "$OUT/profile_p.md" > "$OUT/profile.log" 2>&1
    $PY tools/profile_kernels.py --shape 64,4096,4096,16 --modes forward --out "$OUT/profile_decode.md" \
      >> "$OUT/profile.log" 2>&1
    $PY tools/profile_kernels.py --dropout 0.1 --modes full --providers frozen_linear,triton,cuda \
      --out "$OUT/profile_p_drop.md" >> "$OUT/profile.log" 2>&1
    tail -30 "$OUT/profile.log"
    ;;
  *)
    echo "unknown stage $stage" >&2; exit 2 ;;
esac
