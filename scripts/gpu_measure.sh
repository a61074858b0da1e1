#!/usr/bin/env bash
# The whole GPU measurement of this project in one device call of at most 10 minutes (an H100 or H200 with 16
# cores, no network, no DALI installed): the model step (eager bf16 + channels_last at per-GPU batch 256 and 512,
# the original structure, split BN, torch.compile, the step as one CUDA graph), the loaders (DALI GPU, DALI CPU,
# the PyTorch backend, the tuned PyTorch baseline) alone and feeding the real step, the GPU-only tests, and
# train.py stopped by SIGTERM then resumed. Results: docs/measured/<device>-<date>/ inside $OUT/measured.tgz.
#
# On the development machine (repository root; .gpu/ and .gpusrc/ listed in .git/info/exclude):
#   bash scripts/gpu_measure.sh bundle   # DALI wheels for Python 3.12 -> .gpu/part-NN, xz, 60 MiB each
#   bash scripts/gpu_measure.sh src      # the committed code (git archive HEAD) -> .gpusrc/, with its commit
# Device calls, back to back (a machine is given back 30 s after a call; each call carries at most 64 MiB):
#   bash .gpusrc/scripts/gpu_measure.sh part .gpu/part-00           # one call per part but the last
#   bash .gpusrc/scripts/gpu_measure.sh measure .gpu/part-NN        # the last part, install, measure (< 10 min)
# Test every stage on a CPU first (--quick sizes, a tiny train run; ~2-3 min on 2 cores):
#   bash scripts/gpu_measure.sh dry /tmp/dry
# Each stage's time limit is cut to what is left of BUDGET_S (default 540 s); stages.txt has every stage's exit
# code and times; a stage that does not fit is recorded as skipped. STAGES picks and orders them.
set -uo pipefail
BUDGET_S=${BUDGET_S:-540}
STAGES=${STAGES:-"prepare model pipeline e2e gpu_tests train model_compile"}
NEEDS_CPU_QUICK=""  # set by dry: the benchmark flags that shrink every suite to the CPU smoke sizes
GPU_TESTS_FLAGS=""  # dry: --collect-only (their CPU parts run in the test suite anyway)
LIMIT_SCALE=1  # dry: each stage may take longer on a shared CPU than on the GPU machine

stage() {  # name, time limit (s), command...: one step of the measurement, cut to the time left
  local name=$1 limit=$(($2 * LIMIT_SCALE)); shift 2
  local left=$((DEADLINE - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 20 ]; then echo "skipped $name (${left}s left)" >> "$RES/stages.txt"; return; fi
  echo "start $name $(date +%T) limit ${limit}s" >> "$RES/stages.txt"
  if [ "$1" = train_sigterm_resume ]; then  # a shell function: it applies the limit itself
    train_sigterm_resume "$limit" > "$RES/$name.log" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$RES/$name.log" 2>&1
  fi
  echo "rc=$? $name $(date +%T)" >> "$RES/stages.txt"
}

train_sigterm_resume() {  # $1: seconds. A real run stopped by SIGTERM once it has logged progress, then resumed
  local run=$RES/run cmd=("${TRAIN[@]}" --shards "$SHARDS" --run-dir "$RES/run")
  rm -rf "$run"
  "${cmd[@]}" > "$RES/train_sigterm.log" 2>&1 &
  local pid=$! waited=0
  while [ ! -s "$run/metrics.jsonl" ] && kill -0 $pid 2>/dev/null && [ $waited -lt $(($1 / 2)) ]; do
    sleep 1; waited=$((waited + 1))
  done
  kill -TERM $pid 2>/dev/null
  wait $pid; local rc=$?
  echo "SIGTERM run: exit $rc after ${waited} s; checkpoints: $(ls "$run/checkpoints" 2>/dev/null | tr '\n' ' ')"
  grep -i "preempted" "$RES/train_sigterm.log"
  [ $rc -eq 0 ] || return 1
  timeout -k 10 $(($1 - waited)) "${cmd[@]}" > "$RES/train_resume.log" 2>&1 || return 1
  grep -i "resumed from" "$RES/train_resume.log"
  echo "resumed run: exit 0; summary.json: $(head -c 800 "$run/summary.json" 2>/dev/null)"
  rm -rf "$run/checkpoints"  # large; the logs, metrics.jsonl and summary.json stay
}

run_stage() {
  local bench=("$PY" -m benchmarks run $NEEDS_CPU_QUICK --out "$RES/bench")
  case "$1" in
    prepare)
      stage prepare 150 "$PY" -m benchmarks prepare --out "$DATA" ${PREPARE_IMAGES:+--images $PREPARE_IMAGES}
      SHARDS=$(tail -n 1 "$RES/prepare.log") ;;
    # bf16 + channels_last, the training configuration, at batch 256 and 512, with the original structure and the
    # plain step of the same encoders; split BN (the one-GPU default) since its fix.
    model) stage model 120 "${bench[@]}" --suite model --only "$MODEL_ONLY" ;;
    model_compile) stage model_compile 240 "$PY" -m benchmarks run $NEEDS_CPU_QUICK --out "$RES/bench_compile" \
                     --suite model --only "$COMPILE_ONLY" ;;
    pipeline) stage pipeline 120 "${bench[@]}" --suite pipeline --shards "$SHARDS" --only "$LOADER_ONLY" ;;
    e2e) stage e2e 200 "${bench[@]}" --suite e2e --shards "$SHARDS" ;;
    gpu_tests) stage gpu_tests 90 "$PY" -m pytest -q -p no:cacheprovider $GPU_TESTS_FLAGS tests/pipeline/test_gpu.py \
                 tests/model/test_step.py::test_no_cuda_sync_in_the_step tests/model/test_compile.py ;;
    train) stage train 150 train_sigterm_resume ;;  # the limit is passed to the function by stage
    *) echo "unknown stage $1" >> "$RES/stages.txt" ;;
  esac
}

measure_all() {  # RES, DATA, PY set; runs STAGES in order within BUDGET_S
  DEADLINE=$((SECONDS + BUDGET_S))
  mkdir -p "$RES" "$DATA"
  SHARDS=${SHARDS:-}
  for name in $STAGES; do run_stage "$name"; done
  echo "done $(date +%T), $((SECONDS - DEADLINE + BUDGET_S)) s" >> "$RES/stages.txt"
}

install_dali() {  # the parts in /var/tmp/gpu -> /var/tmp/site (once per machine)
  [ -e /var/tmp/site/.installed ] && return 0
  mkdir -p /var/tmp/site
  cat /var/tmp/gpu/part-* | xz -T0 -d | tar -C /var/tmp/site -xf - || return 1
  local check='import torch, nvidia.dali as d, webdataset; torch.zeros(1).cuda(); print("DALI", d.__version__)'
  if ! PYTHONPATH=/var/tmp/site python3 -c "$check"; then
    rm -f /var/tmp/site/nvidia/__init__.py  # let nvidia.* be one namespace with the machine's own nvidia packages
    PYTHONPATH=/var/tmp/site python3 -c "$check" || return 1
  fi
  touch /var/tmp/site/.installed
}

bundle() {  # on the development machine: the DALI site folder for the GPU machine's Python 3.12, xz, in parts
  local tmp; tmp=$(mktemp -d)
  local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$tmp/whl" nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 \
    nvidia-nvtiff-cu13 astunparse gast makefun 'libcst~=1.8' optree nvtx webdataset==1.0.2 braceexpand || return 1
  python3 -m pip install -q --no-deps --no-index --no-compile --target "$tmp/site" --python-version 3.12 \
    --implementation cp --only-binary=:all: "${plat[@]}" "$tmp"/whl/*.whl || return 1
  # DALI ships its Python extension for ten interpreters; the machine has 3.12 only.
  find "$tmp/site/nvidia/dali" -name 'backend_impl.cpython-*.so' ! -name '*-312-*' -delete
  rm -rf "$tmp/site/bin" .gpu && mkdir -p .gpu
  tar -C "$tmp/site" -cf - . | xz -T0 -7 | split -b 60m -d - .gpu/part-
  rm -rf "$tmp"; ls -la .gpu
}

case "${1:-}" in
  bundle) bundle ;;
  src)  # the committed code, and its commit for the JSON (the copy has no .git)
    rm -rf .gpusrc && mkdir .gpusrc && git archive HEAD | tar -C .gpusrc -xf - && git rev-parse HEAD > .gpusrc/COMMIT
    echo "code of $(cat .gpusrc/COMMIT) in .gpusrc/" ;;
  part) mkdir -p /var/tmp/gpu && cp "$2" /var/tmp/gpu/ && ls -la /var/tmp/gpu ;;
  measure)
    [ -n "${2:-}" ] && mkdir -p /var/tmp/gpu && cp "$2" /var/tmp/gpu/
    install_dali || { echo "error: DALI did not install from /var/tmp/gpu"; exit 1; }
    src=$(cd "$(dirname "$0")/.." && pwd)
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -oiE 'h100|h200|a100|b200' | head -1)
    name=${name:-gpu}
    RES=/var/tmp/res/docs/measured/${name,,}-$(date +%F) DATA=/var/tmp/data PY=python3
    export PYTHONPATH=/var/tmp/site:$src PYTHONUNBUFFERED=1 WANDB_MODE=disabled
    export BENCH_GIT_COMMIT=$(cat "$src/COMMIT" 2>/dev/null || echo unknown)
    mkdir -p "$RES" && cd "$src" || exit 1
    { nvidia-smi; python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision',
      torchvision.__version__, torch.cuda.get_device_name(0))"; nproc; free -g | head -2; } > "$RES/facts.txt" 2>&1
    MODEL_ONLY='^(ours|baseline|plain encoder step) bf16\+cl( batch=512)?$|shuffle=split'
    COMPILE_ONLY='compile|cudagraph|^ours bf16\+cl$' LOADER_ONLY="threads=$(nproc) batch=256"
    TRAIN=(python3 train.py --total-steps 300 --num-threads $(($(nproc) - 1)) --log-every 20
           --checkpoint-every-steps 100 --image-log-every 0 --wandb-mode disabled)
    measure_all
    cat "$RES/stages.txt"; tail -n 5 "$RES"/*.log
    [ -n "${OUT:-}" ] && tar -C /var/tmp/res -czf "$OUT/measured.tgz" docs ;;
  dry)  # every stage on this CPU at the --quick sizes, into $2
    RES=$(mkdir -p "$2" && cd "$2" && pwd) DATA=$RES/data PY=${PYTHON:-python3}
    export PYTHONUNBUFFERED=1 WANDB_MODE=disabled OMP_NUM_THREADS=1
    cd "$(dirname "$0")/.." || exit 1
    NEEDS_CPU_QUICK="--quick --device cpu" GPU_TESTS_FLAGS="--collect-only" PREPARE_IMAGES=192 LIMIT_SCALE=3
    BUDGET_S=${BUDGET_S:-1500} MODEL_ONLY="" COMPILE_ONLY='compile|cudagraph' LOADER_ONLY=""
    TRAIN=("$PY" train.py --total-steps 8 --num-threads 1 --log-every 2 --checkpoint-every-steps 4 --image-log-every 0
           --wandb-mode disabled --device cpu --arch resnet18 --stem cifar --crop-size 32 --batch-size 8 --queue-size 64)
    measure_all
    cat "$RES/stages.txt" ;;
  *) echo "usage: $0 bundle | src | part FILE | measure [LAST_PART] | dry OUT_DIR" >&2; exit 2 ;;
esac
