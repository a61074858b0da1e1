#!/usr/bin/env bash
# Measure this project on a lent GPU machine (see ../shared/GPU.md): the model step, the data pipeline, the whole
# loop, the GPU-only tests and a short real train.py run with preemption and resume, in one background chain.
#
# The machine has PyTorch but no DALI and no network, and one device call may carry at most 64 MiB. So the DALI
# wheel set travels as an xz-compressed site folder cut into parts (.gpu/part-*), one per call, while the chain
# already runs the suites that need no DALI. Prepare here (from the repository root; .gpu/ and .gpusrc/ must be
# listed in .git/info/exclude):
#   bash scripts/gpu_measure.sh bundle      # DALI + wheels for Python 3.12 -> .gpu/part-00.. (~163 MB, minutes of xz)
#   git archive HEAD | (rm -rf .gpusrc && mkdir .gpusrc && tar -C .gpusrc -xf -)   # the code that is measured
# Device calls, back to back (the machine is given back 30 s after a call ends):
#   bash .gpusrc/scripts/gpu_measure.sh start .gpu/part-00     # facts, first part, start the chain
#   bash .gpusrc/scripts/gpu_measure.sh part .gpu/part-01      # middle parts
#   bash .gpusrc/scripts/gpu_measure.sh finish .gpu/part-02 W  # last part: install DALI, wait up to W s, collect
#   bash .gpusrc/scripts/gpu_measure.sh collect W              # wait up to W s more and collect
# Everything lands in /var/tmp/res on the machine and comes back as $OUT/res.tgz (benchmark JSON/MD/PNG, logs).
set -uo pipefail
SRC=/var/tmp/src SITE=/var/tmp/site PARTS=/var/tmp/gpu RES=/var/tmp/res DATA=/var/tmp/data
SHARDS=$DATA/_data/shards-corpus-2048-360-400-256

collect() {  # $1: seconds to wait for the chain to finish
  local deadline=$((SECONDS + ${1:-0}))
  while [ ! -e $RES/DONE ] && [ $SECONDS -lt $deadline ]; do sleep 5; done
  echo "--- stages ($(date +%T))"; cat $RES/stages.txt 2>/dev/null
  for f in $RES/*.log; do echo "--- tail $f"; tail -n 25 "$f"; done
  [ -n "${OUT:-}" ] && tar -C $RES -czf "$OUT/res.tgz" . && cp $RES/stages.txt "$OUT/" 2>/dev/null
  [ -e $RES/DONE ] && echo "chain DONE" || echo "chain still running"
}

stage() {  # name, time limit (s), command...: run one step of the chain, record its exit code
  local name=$1 limit=$2; shift 2
  echo "start $name $(date +%T)" >> $RES/stages.txt
  timeout -k 15 "$limit" "$@" > "$RES/$name.log" 2>&1
  echo "rc=$? $name $(date +%T)" >> $RES/stages.txt
}

run_stage() {  # one named measurement of the chain
  local train=(python3 train.py --shards $SHARDS --run-dir $RES/run --total-steps 1000 --num-threads 15
               --log-every 20 --checkpoint-every-steps 100 --image-log-every 0 --wandb-mode disabled)
  case "$1" in
    prepare) stage prepare 240 python3 -m benchmarks prepare --out $DATA --images 2048 ;;
    # torch.compile's warm-up is its own run, so that a slow compilation cannot cost the other rows.
    model) stage model 420 python3 -m benchmarks run --suite model --out $RES/bench --only '^(?!.*compile)' ;;
    model_compile) stage model_compile 420 python3 -m benchmarks run --suite model --out $RES/bench_compile \
                     --only 'compile|^ours bf16\+cl$' ;;
    # PIPELINE_ONLY / E2E_ONLY: optional --only regular expressions (e.g. 'batch=256', 'DALI GPU|PyTorch').
    pipeline) stage pipeline 360 python3 -m benchmarks run --suite pipeline --shards $SHARDS --out $RES/bench \
                ${PIPELINE_ONLY:+--only "$PIPELINE_ONLY"} ;;
    e2e) stage e2e 300 python3 -m benchmarks run --suite e2e --shards $SHARDS --out $RES/bench ${E2E_ONLY:+--only "$E2E_ONLY"} ;;
    gpu_tests) stage gpu_tests 300 python3 -m pytest -q -p no:cacheprovider tests/pipeline/test_gpu.py \
                 tests/model/test_step.py::test_no_cuda_sync_in_the_step \
                 tests/model/test_compile.py ;;
    train)  # SIGTERM mid-run (checkpoint, exit 0), then the same command resumes and finishes
      stage train_sigterm 60 timeout -s TERM 45 "${train[@]}"
      stage train_resume 200 "${train[@]}"
      rm -rf $RES/run/checkpoints ;;  # large; the logs, metrics.jsonl and summary.json stay
    *) echo "unknown stage $1" >> $RES/stages.txt ;;
  esac
}

# Stages that need no DALI run first, while the DALI parts are still travelling. GPU_STAGES picks and orders them
# (2026-11-26, on an H200: prepare 26 s, model 116 s, pipeline 319 s, e2e 188 s, gpu_tests 54 s, compile > 120 s).
GPU_STAGES=${GPU_STAGES:-"prepare model model_compile pipeline e2e gpu_tests train"}
NEEDS_DALI="pipeline e2e gpu_tests train"

chain() {  # runs detached from the calls (setsid), from the clean copy of the code in $SRC
  cd $SRC || exit 1
  export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
  for name in $GPU_STAGES; do
    if [[ " $NEEDS_DALI " == *" $name "* ]] && [ -z "${PYTHONPATH:-}" ]; then
      local deadline=$((SECONDS + 300))
      while [ ! -e $SITE/.installed ] && [ $SECONDS -lt $deadline ]; do sleep 2; done
      export PYTHONPATH=$SITE:$SRC
    fi
    run_stage "$name"
  done
  touch $RES/DONE
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
  start)
    mkdir -p $PARTS $RES $SITE && cp "$2" $PARTS/
    nvidia-smi; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')"
    python3 -c "import nvidia, skimage, sklearn, rich, matplotlib; print('nvidia pkg', list(nvidia.__path__))"
    nproc; free -g | head -2
    rm -rf $SRC && cp -r .gpusrc $SRC
    GPU_STAGES="$GPU_STAGES" setsid nohup bash $SRC/scripts/gpu_measure.sh chain > $RES/chain.log 2>&1 < /dev/null &
    collect 25 ;;
  part) cp "$2" $PARTS/ && ls -la $PARTS && collect 0 ;;
  finish)
    cp "$2" $PARTS/ && cat $PARTS/part-* | xz -d | tar -C $SITE -xf - || exit 1
    check='import torch, nvidia.dali as d, webdataset; torch.zeros(1).cuda(); print("DALI", d.__version__)'
    if ! PYTHONPATH=$SITE python3 -c "$check"; then
      rm -f $SITE/nvidia/__init__.py  # let nvidia.* be one namespace with the machine's own nvidia packages
      PYTHONPATH=$SITE python3 -c "$check" || exit 1
    fi
    touch $SITE/.installed
    collect "${3:-0}" ;;
  collect) collect "${2:-0}" ;;
  chain) chain ;;
  *) echo "usage: $0 bundle|start|part|finish|collect|chain ..." >&2; exit 2 ;;
esac
