"""The demo behind `make demo`: real labelled images -> shards -> MoCo pre-training -> kNN on held-out images.

    python -m demo                      # runs/demo: config.yaml, checkpoints/, wandb/, metrics.jsonl, summary.json,
                                        # loss_curve.png; about 5 minutes on a 2-core CPU
    python -m demo --seed 1 --out runs/demo-seed1

The data are scikit-learn's 1797 real handwritten digits (shipped with the package: no download), scattered at a
random scale and position (see eval/digits.py). 1297 of them, without their labels, are sharded with
`python -m shards build` and pre-train MoCo through the real DALI pipeline and `train.py`; the other 500 are held
out. train.py's kNN monitor classifies the 500 held-out digits with the backbone's features (the 1297 training
digits, with their labels, as the reference bank) at step 0 (random init) and at the end: the gain is what MoCo
learned, measured on images it never trained on. The final line prints both numbers; summary.json (``eval``), W&B
(``eval/knn_top1``) and the second panel of loss_curve.png hold them, with the chance levels (10 % for kNN top-1,
ln(K+1) for the InfoNCE loss).
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cli
import config as config_lib
from cli import ConfigError, option

DATA_DIR = Path("runs/demo-data")
CANVAS = 32  # px: the digits' canvas and the training crop size
HELD_OUT = 500  # digits held out of pre-training (50 per class): the kNN queries


def build_demo_data(work: Path) -> tuple[Path, Path, Path]:
    """Write the digits as image folders and shard the training split (labels dropped) with `shards build`.

    Returns:
        (unlabelled training shards, labelled training folder = kNN bank, labelled held-out folder = kNN queries).
    """
    from eval.digits import write_digit_folders

    digits, shard_dir = work / f"digits{CANVAS}", work / f"shards{CANVAS}"
    if not (digits / "val").is_dir():
        write_digit_folders(digits, size=CANVAS)
    if not (shard_dir / "manifest.json").is_file():
        # No --labels-from-folders: pre-training sees images only. --min-side below the canvas: the digits are small.
        subprocess.run([sys.executable, "-m", "shards", "build", str(digits / "train"), "--out", str(shard_dir),
                        "--samples-per-shard", "256", "--short-side", "0", "--min-side", str(CANVAS), "--quality", "95",
                        "--no-progress"], check=True)
    return shard_dir, digits / "train", digits / "val"


def demo_config(shard_dir: Path, bank: Path, queries: Path, run_dir: Path, steps: int, seed: int) -> config_lib.Config:
    """MoCo settings that learn within a few hundred CPU steps on the scattered digits (measured; see README "Demo").

    ResNet-18 (ImageNet stem) at 32 px, 64 pairs per step, K=64 negatives, m=0.99, T=0.2, SGD lr 0.015 constant, the
    v1 recipe (v2's blur wipes out thin strokes), 600 steps by default. The kNN monitor runs at step 0 and at the
    end (k=200).
    """
    return config_lib.from_dict({
        "data": {"shards": str(shard_dir), "crop_size": CANVAS, "batch_size": 64, "num_threads": 1, "recipe": "v1",
                 "shuffle_buffer": 512, "channels_last": False},
        "model": {"arch": "resnet18", "stem": "imagenet", "queue_size": 64, "momentum": 0.99, "temperature": 0.2,
                  "mlp_hidden_dim": 512, "split_bn_groups": 4},
        "optim": {"lr": 0.015, "schedule": "constant"},
        "run": {"run_dir": str(run_dir), "total_steps": steps, "seed": seed, "log_every": 10,
                "checkpoint_every_steps": 0, "checkpoint_every_minutes": 0, "image_log_every": 100,
                "wandb_mode": "offline", "resume": "none", "knn_every": steps, "knn_train": str(bank),
                "knn_val": str(queries), "knn_k": 200},
    })


@dataclass(frozen=True)
class DemoOptions:
    """Options of the demo."""

    out: str = option("runs/demo", "Run directory (recreated).", metavar="DIR")
    steps: int = option(600, "Training steps (600: about 4 minutes on 2 CPU cores; 300 do not beat random init).")
    seed: int = option(0, "Seed of the initial weights, data order and augmentations (the README lists seeds 0-4).")
    torch_threads: int = option(0, "torch intra-op threads. 0: the usable cores minus the loader's one thread.")

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ConfigError(f"--steps must be > 0; got {self.steps}")
        if self.torch_threads < 0:
            raise ConfigError(f"--torch-threads must be >= 0; got {self.torch_threads}")


def parse_args(argv: list[str] | None = None) -> DemoOptions:
    parser = cli.ArgumentParser(prog="python -m demo", description=__doc__)
    names = cli.add_flags(parser, DemoOptions)
    return cli.build(DemoOptions, cli.flag_values(parser.parse_args(argv), names), prefix="--")


def main(argv: list[str] | None = None) -> int:
    return cli.guard(lambda: run(parse_args(argv)))


def run(args: DemoOptions) -> None:
    import distributed  # torch loads here, after the command line was parsed (--help answers at once)
    from train import train

    # DALI's CPU thread takes one core; more torch threads than the rest only fight it (measured ~10x slower).
    distributed.set_torch_threads(args.torch_threads, reserved=1)

    run_dir = Path(args.out)
    shutil.rmtree(run_dir, ignore_errors=True)
    shard_dir, bank, queries = build_demo_data(DATA_DIR)
    cfg = demo_config(shard_dir, bank, queries, run_dir, args.steps, args.seed)
    summary = train(cfg)
    print(json.dumps(summary, indent=1))
    print("\n" + final_line(summary, cfg, run_dir))


def final_line(summary: dict, cfg: config_lib.Config, run_dir: Path) -> str:
    """What the demo showed, in one line: kNN top-1 on held-out digits at random init and after pre-training."""
    knn = (summary.get("eval") or {}).get("knn_top1")
    chance_loss = math.log(cfg.model.queue_size + 1)
    loss = (f"loss {summary['first_loss']:.2f} -> {summary['final_loss']:.2f} (chance ln(K+1) = {chance_loss:.2f})"
            if "final_loss" in summary else "no loss logged")
    if not knn or knn["first_step"] != 0 or knn["last_step"] == 0:
        return f"{loss}; no kNN evaluation at step 0 and at the end: see {run_dir}/metrics.jsonl"
    # Two binomial standard errors of a top-1 over 500 queries: smaller differences are noise, not learning.
    noise = 200 * math.sqrt(max(knn["first"] / 100 * (1 - knn["first"] / 100), 1e-4) / HELD_OUT)
    verdict = ("a gain over random init" if knn["gain"] > noise else "below random init" if knn["gain"] < -noise
               else f"no clear gain: within the +-{noise:.1f}-point noise")
    return (f"kNN top-1 on {HELD_OUT} held-out digits: {knn['first']:.1f}% at random init -> {knn['last']:.1f}% after "
            f"{knn['last_step']} steps ({knn['gain']:+.1f} points, {verdict}; chance {knn.get('chance', 10.0):.0f}%); "
            f"{loss}; run directory: {run_dir}/")


if __name__ == "__main__":
    sys.exit(main())
