#!/bin/bash
# 10-step CPU train runs (ResNet-18, 64 px, batch 16, DALI CPU with 1 thread, 48 photos): before (no thread setting,
# torch's default) vs after (--torch-threads 0 -> cores - data.num_threads) vs after with --torch-threads 2.
# /tmp/h1/before: `git archive 6584801 | tar -x`, /tmp/h1/after: the tree after; /tmp/h1/shards: the 48-photo corpus sharded.
PY=/work/main/.venv/bin/python
unset OMP_NUM_THREADS
ARGS="--shards /tmp/h1/shards --total-steps 10 --arch resnet18 --crop-size 64 --batch-size 16 --queue-size 64
 --num-threads 1 --shuffle-buffer 16 --split-bn-groups 2 --momentum 0.99 --lr 0.01 --schedule constant --log-every 5
 --checkpoint-every-steps 0 --checkpoint-every-minutes 0 --image-log-every 0 --wandb-mode disabled --device cpu
 --backend dali --seed 7 --resume none"
out=/tmp/h1/threads.jsonl
for rep in 1 2; do
  for variant in before after after_t2; do
    case $variant in
      before) dir=/tmp/h1/before; extra="";;
      after) dir=/tmp/h1/after; extra="";;
      after_t2) dir=/tmp/h1/after; extra="--torch-threads 2";;
    esac
    rd=/tmp/h1/runs/$variant-$rep; rm -rf $rd
    (cd $dir && PYTHONPATH=$dir timeout 600 $PY train.py $ARGS --run-dir $rd $extra > $rd.log 2>&1)
    $PY - "$variant" "$rep" "$rd" >> $out <<'PYEOF'
import json, sys
variant, rep, rd = sys.argv[1:]
rows = [json.loads(l) for l in open(f"{rd}/metrics.jsonl") if "pairs_per_s" in l]
print(json.dumps({"variant": variant, "rep": int(rep), "steps": [r["step"] for r in rows],
                  "pairs_per_s": [round(r["pairs_per_s"], 2) for r in rows]}))
PYEOF
    tail -1 $out
  done
done
