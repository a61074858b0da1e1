"""Run under torchrun by tests/faults/test_damaged_shards.py: every rank reads a damaged corpus for two passes.

Args: SHARD_DIR BACKEND OUT_DIR. Every rank writes what it saw (batches per pass, bad samples, the shards it dropped,
whether it was dealt shard 1 in the passes it read, the run's ledger of damaged data after one exchange as train.py
does it at a log point) to OUT_DIR/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import distributed
from pipeline import build_train_loader
from tests.pipeline.helpers import make_cfg
from training.bad_data import BadDataLedger

shard_dir, backend, out_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
dist = distributed.setup_distributed("cpu", timeout_s=120)
loader = build_train_loader(make_cfg(Path(shard_dir), backend, batch_size_per_gpu=4), dist)
shapes = [tuple(next(loader)[0].shape) for _ in range(2 * loader.batches_per_pass + 1)]
ledger = BadDataLedger(loader.manifest.root)
ledger.gather(ledger.unseen(loader.dropped_shards, loader.bad_sample_locations))
(out_dir / f"rank{dist.rank}.json").write_text(json.dumps({
    "batches_per_pass": loader.batches_per_pass, "pass": loader.pass_index, "bad": loader.bad_samples,
    "shapes": sorted(set(shapes)), "dropped": list(loader.dropped_shards),
    "dealt_shard_1": any(1 in loader.plan.rank_shards(p, dist.rank).tolist() for p in range(3)),
    "ledger": ledger.state_dict()["items"], "ledger_count": ledger.count}))
loader.close()
distributed.teardown_distributed()
