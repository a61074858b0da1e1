#!/bin/bash
# Wall time of `--help` per entry point: before (commit 6584801) vs after (HEAD), alternating, 3 repeats.
# /tmp/h1/before: `git archive 6584801 | tar -x`; /tmp/h1/after2: the same of the tree after this work.
PY=/work/main/.venv/bin/python
for rep in 1 2 3; do
  for variant in before after2; do
    dir=/tmp/h1/$variant
    for ep in "train.py" "-m eval.linear" "-m eval.export" "-m shards" "-m benchmarks run" "-m demo"; do
      ep2="$ep"
      s=$(date +%s.%N); (cd $dir && $PY $ep --help > /dev/null 2>&1); rc=$?; e=$(date +%s.%N)
      echo "{\"variant\": \"$variant\", \"rep\": $rep, \"entry\": \"$ep\", \"rc\": $rc, \"seconds\": $(echo "$e - $s" | bc | sed "s/^\./0./")}"
    done
  done
done
