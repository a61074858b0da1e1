"""Linear evaluation of a MoCo checkpoint (frozen backbone, linear classifier, MoCo protocol; see model/linear_eval.py).

Launch:
    python linear_eval.py --checkpoint runs/r50/checkpoints/ckpt-000500000.pt \\
        --train data/imagenet_train_shards --val data/imagenet_val_shards --out runs/r50/linear     # one device
    torchrun --nproc-per-node=8 linear_eval.py --config lincls.yaml                               # one node, DDP
    python linear_eval.py --help                                                                  # every option

--train/--val take a shard manifest with .cls labels (``python -m shards build --labels-from-folders``) or an
image folder ``root/<class>/<image>``. Prints top-1/top-5 and, with --out, writes linear_eval.json and classifier.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import distributed
from config import ConfigError, main_guard, parse_dataclass
from model.export import CheckpointError
from model.labelled_data import LabelledSetError
from model.linear_eval import LinearEvalConfig, run_linear_eval


def linear_eval(cfg: LinearEvalConfig) -> dict:
    """Run the linear evaluation as configured (on one device or under torchrun); returns rank 0's metrics."""
    for name in ("checkpoint", "train", "val"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required")
    dist = distributed.setup_distributed(cfg.device, cfg.dist_timeout_s)
    try:
        result, classifier = run_linear_eval(cfg, dist)
    finally:
        distributed.teardown_distributed()
    if dist.is_main:
        print(f"linear eval: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
              f"({result['val_samples']} val images, {result['steps']} steps, {result['seconds']:.0f}s; "
              f"backbone unchanged, sha256 {str(result['backbone_sha256'])[:12]})", flush=True)
        if cfg.out:
            out = Path(cfg.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "linear_eval.json").write_text(json.dumps({**result, "config": cfg.__dict__}, indent=1))
            torch.save(classifier.state_dict(), out / "classifier.pt")
    return result


def main(argv: list[str] | None = None) -> None:
    cfg = main_guard(lambda: parse_dataclass(LinearEvalConfig, argv, description=__doc__.splitlines()[0],
                                             title="linear evaluation"))
    main_guard(lambda: linear_eval(cfg), user_errors=(CheckpointError, LabelledSetError))


if __name__ == "__main__":
    main(sys.argv[1:])
