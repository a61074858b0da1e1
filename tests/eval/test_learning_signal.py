"""A real learning signal: a short MoCo pre-training on scikit-learn's handwritten digits beats random init in kNN.

The data are the 1797 real 8 x 8 digits of scikit-learn, each drawn once, white on black, at a random scale (50-100 %
of a 16 px frame) and a random position. Centred digits leave no headroom: random-init features already reach ~90 %
kNN (k=20) on them because they keep the pixel layout. Scattered ones take that layout away (random init: ~50 % at
k=20, ~30 % at the monitor's default k=200), and RandomResizedCrop, MoCo's main augmentation, varies exactly scale and
position, so the invariance MoCo learns is the one this set needs. Coloured digits (random foreground and background)
were tried too and fail: the colour pair is shared by both views of an image, so MoCo learns it as a shortcut.

Everything goes through the real path: labelled shards as `shards build --labels-from-folders` writes them, the DALI
loader with the v1 recipe, MoCo with its queue, momentum encoder and split shuffle-BN, ``train.train_step`` with the
configured schedule, and the kNN monitor of ``train.py`` (``build_knn_monitor``) on a held-out split. The encoder is a
six-layer conv-BN-ReLU network (widths 32-64-128) rather than a ResNet-18: on one CPU thread a ResNet-18 step costs
~0.6 s even at 16 px (too few steps to learn anything in a test's time), while this one runs 400 steps in ~75 s.

Run ``python -m tests.eval.test_learning_signal --seeds 0 1 2 3 4 5`` to repeat the measurement behind the margin.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import config as config_lib
from distributed import DistInfo
from eval.digits import held_out_split, scattered_digits
from eval.knn import build_knn_monitor
from model import MoCo, lr_at, momentum_at
from model.encoder import Encoder, MoCoProjectionHead
from pipeline import build_train_loader
from tests.eval.conftest import write_labelled_shards
from train import build_optimization, place_model, train_step

pytestmark = pytest.mark.slow  # ~85 s on two CPU cores; runs in the default suite (deselect with -m "not slow")

SIZE = 16
VAL_PER_CLASS = 50
STEPS = 400
SEED = 0
# kNN top-1 (%) on the 500 held-out digits (bank: the other 1297), per seed, at random init and after 400 steps, as
# printed by `python -m tests.eval.test_learning_signal --seeds 0 1 2 3 4 5` (2-core CPU, 1 torch thread, DALI 2.4):
#
#   seed | random init, k = 200 / 100 / 50 / 20 | trained, k = 200 / 100 / 50 / 20 | gain at k=200
#      0 |    32.8 / 39.6 / 47.0 / 54.2         |    42.0 / 46.2 / 48.4 / 54.8     |  +9.2
#      1 |    30.2 / 39.6 / 44.4 / 48.6         |    47.2 / 48.2 / 48.4 / 54.2     | +17.0
#      2 |    29.8 / 35.2 / 44.6 / 51.8         |    36.8 / 40.6 / 41.4 / 42.0     |  +7.0
#      3 |    29.6 / 36.0 / 44.6 / 51.4         |    43.2 / 42.8 / 49.4 / 52.8     | +13.6
#      4 |    32.0 / 38.0 / 46.2 / 48.2         |    40.0 / 42.4 / 45.0 / 51.4     |  +8.0
#      5 |    27.4 / 38.4 / 42.8 / 49.0         |    37.6 / 39.4 / 42.6 / 44.8     | +10.2
#
# The asserted number is the monitor as train.py runs it by default (k=200, t=0.1): +7.0 to +17.0 points, mean +10.8.
# At k=100 every seed gains too (+1.0 to +8.6). At k=20 and k=50 400 steps are not enough: random features keep
# near-duplicate neighbours (same digit, similar scale and place) and the gain is mixed (-9.8 to +5.6 at k=20); it
# turns positive on average after ~600-1000 steps (seeds 0-5 at 600 steps: -3.8 to +12.6), beyond a test's budget.
# So what 400 steps learn is the class-level structure of the bank (fewer wrong-class digits among the 200 nearest),
# not yet better nearest neighbours. The margin is under half the smallest gain seen (+7.0); seed 0 is asserted.
MARGIN = 3.0  # percentage points at k=200


def small_encoder(width: int = 32, dim: int = 128, hidden_dim: int = 512) -> Encoder:
    """Six 3x3 conv-BN-ReLU layers (stride 2 before each width doubling), global average pool, MoCo v2 head."""
    layers: list[nn.Module] = []
    channels = [3, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    for i, (c_in, c_out) in enumerate(zip(channels, channels[1:])):
        stride = 2 if i in (2, 4) else 1
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Encoder(backbone, MoCoProjectionHead(4 * width, dim, "mlp", hidden_dim), 4 * width)


def write_digit_sets(root: Path) -> tuple[Path, Path]:
    """Labelled shards: ``val`` (the first 50 digits of each class) and ``train`` (the other 1297)."""
    images, labels = scattered_digits(SIZE)
    train, val = held_out_split(labels, VAL_PER_CLASS)
    return (write_labelled_shards(root / "train", images, labels, train, per_shard=64),
            write_labelled_shards(root / "val", images, labels, val, per_shard=64))


def signal_config(train_set: Path, val_set: Path, seed: int, steps: int = STEPS) -> config_lib.Config:
    """MoCo v1 recipe, 64 pairs per step, K=64 negatives, m=0.99, T=0.2, SGD lr 0.06 constant.

    Chosen from single-seed runs on this set: K=64 learned faster than 256 or 1024 in a short run (a small queue
    holds fresh keys), lr 0.1, m=0.9 and batch 32 (K=32) were worse at 200-800 steps, and v2's blur (sigma up to
    2 px) wipes out strokes at 16 px.
    """
    return config_lib.from_dict({
        "data": {"shards": str(train_set), "crop_size": SIZE, "batch_size": 64, "num_threads": 1, "recipe": "v1",
                 "backend": "dali", "shuffle_buffer": 512, "channels_last": False},
        "model": {"queue_size": 64, "momentum": 0.99, "temperature": 0.2, "mlp_hidden_dim": 512, "split_bn_groups": 4},
        "optim": {"lr": 0.06, "schedule": "constant"},
        "run": {"total_steps": steps, "seed": seed, "device": "cpu", "knn_train": str(train_set), "knn_val": str(val_set)},
    })


def measure(train_set: Path, val_set: Path, seed: int, steps: int = STEPS, knn_ks: tuple[int, ...] = ()) -> dict:
    """kNN top-1 of the query backbone at random init and after ``steps`` MoCo steps (same seed, same init).

    The monitor runs as train.py configures it by default (k=200, t=0.1); ``knn_ks`` lists further k for the table.
    """
    cfg = signal_config(train_set, val_set, seed, steps)
    dist = DistInfo(device=torch.device("cpu"))
    lr = config_lib.learning_rate(cfg, dist.world_size)
    torch.manual_seed(cfg.run.seed)  # as train.py: the seed fixes the initial weights
    loader = build_train_loader(cfg, dist)
    model = place_model(MoCo(cfg.model, encoder=small_encoder(dim=cfg.model.dim, hidden_dim=cfg.model.mlp_hidden_dim)),
                        cfg, dist)
    optimizer, amp_dtype, scaler = build_optimization(cfg, model, dist.device, lr)
    monitor = build_knn_monitor(cfg, dist)

    def top1() -> list[float]:
        out = []
        for k in (cfg.run.knn_k, *knn_ks):
            monitor.k = k
            out.append(monitor.evaluate(model.encoder_q.backbone))
        return out

    result = {"seed": seed, "init": top1()}
    start = time.perf_counter()
    batches = iter(loader)
    model.train()
    for step in range(steps):
        view_q, view_k = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, cfg.optim, lr)
        train_step(model, optimizer, scaler, view_q, view_k, momentum_at(step, steps, cfg.model), amp_dtype,
                   cfg.optim.grad_clip)
    loader.close()
    result.update(trained=top1(), train_s=time.perf_counter() - start)
    return result


@pytest.fixture(scope="module")
def digit_sets(tmp_path_factory) -> tuple[Path, Path]:
    return write_digit_sets(tmp_path_factory.mktemp("scattered_digits"))


def test_moco_beats_random_init_in_knn(digit_sets):
    result = measure(*digit_sets, seed=SEED)
    (init,), (trained,) = result["init"], result["trained"]
    assert trained > init + MARGIN, f"kNN top-1 {init:.1f}% at random init, {trained:.1f}% after MoCo (margin {MARGIN})"


def main() -> None:
    parser = argparse.ArgumentParser(description="Repeat the learning-signal measurement over seeds (prints a table).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default="runs/learning_signal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = write_digit_sets(Path(args.out))
    ks = (100, 50, 20)
    print("kNN top-1 (%), k = 200 (asserted) / " + " / ".join(map(str, ks)), flush=True)
    print("seed  random init                 trained                     gain k=200  train s", flush=True)
    for seed in args.seeds:
        r = measure(*sets, seed=seed, steps=args.steps, knn_ks=ks)
        init, trained = (" / ".join(f"{a:4.1f}" for a in r[key]) for key in ("init", "trained"))
        print(f"{seed:4d}  {init}   {trained}   {r['trained'][0] - r['init'][0]:+6.1f}  {r['train_s']:7.1f}", flush=True)


if __name__ == "__main__":
    main()
