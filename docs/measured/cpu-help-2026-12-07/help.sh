#!/bin/bash
# Wall time of `--help` and of a one-line flag mistake per entry point: BEFORE vs AFTER commit, alternating, REPS repeats.
# Usage: help.sh BEFORE_COMMIT AFTER_COMMIT [REPS] > help.jsonl   (each commit is unpacked with `git archive` under
# /tmp/help-trees; the project's .venv interpreter runs every command, with one OpenMP thread as on the shared VM).
set -u
before=$1 after=$2 reps=${3:-3}
PY=/work/main/.venv/bin/python
for commit in "$before" "$after"; do
  mkdir -p "/tmp/help-trees/$commit" && git -C /work/main archive "$commit" | tar -x -C "/tmp/help-trees/$commit"
done
for rep in $(seq 1 "$reps"); do
  for commit in "$before" "$after"; do
    for cmd in "train.py --help" "-m eval.linear --help" "-m eval.export --help" "-m demo --help" \
               "-m shards build --help" "-m benchmarks run --help" "train.py --no-such-flag" "-m eval.linear --lr nan"; do
      s=$(date +%s.%N)
      (cd "/tmp/help-trees/$commit" && OMP_NUM_THREADS=1 $PY $cmd > /dev/null 2> /tmp/help-trees/stderr); rc=$?
      e=$(date +%s.%N)
      lines=$(wc -l < /tmp/help-trees/stderr)
      echo "{\"commit\": \"$commit\", \"rep\": $rep, \"command\": \"python $cmd\", \"rc\": $rc, \"stderr_lines\": $lines," \
           "\"seconds\": $(echo "$e - $s" | bc | sed 's/^\./0./')}"
    done
  done
done
