"""Linear evaluation (MoCo sec. 4.1): a linear classifier trained on the frozen, eval-mode backbone's pooled features.

The protocol of the MoCo paper and its ``main_lincls.py``: the backbone stays in eval mode (BN running
statistics frozen) and receives no gradient; ``fc`` is initialised N(0, 0.01) with zero bias and trained with
SGD lr 30, momentum 0.9, weight decay 0 for 100 epochs, lr x0.1 at epochs 60 and 80; RandomResizedCrop +
flip for training, resize 256 + center crop 224 for validation; top-1 / top-5 on the validation set. A hash of
the backbone's parameters and buffers before and after proves it did not change.

Launch:
    python -m eval.linear --checkpoint runs/r50/checkpoints/step-000500000.pt \\
        --train data/imagenet_train_shards --val data/imagenet_val_shards --out runs/r50/linear     # one device
    torchrun --nproc-per-node=8 -m eval.linear --config lincls.yaml                              # one node, DDP
    python -m eval.linear --help                                                                 # every option

--config takes YAML nested under ``linear:`` (``linear: {lr: 0.1, epochs: 20}``), the shape ``--print-config`` prints.

--train/--val take a shard manifest with .cls labels (``python -m shards build --labels-from-folders``) or an
image folder ``root/<class>/<image>``. Prints top-1/top-5 and, with --out, writes linear_eval.json and classifier.pt.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import cli
import distributed
from cli import ConfigError
from cli import option as _f
from eval.export import CheckpointError, load_backbone
from eval.knn import pooled_features
from eval.labelled_data import (
    LabelledImages,
    LabelledSetError,
    build_eval_loader,
    collate_skip_bad,
    eval_transform,
    train_transform,
)


@dataclass(frozen=True)
class LinearEvalConfig:
    """Linear evaluation of a pre-trained backbone (MoCo protocol)."""

    checkpoint: str = _f("", "Pre-training checkpoint (or a torchvision export) whose query-encoder backbone is probed.")
    train: str = _f("", "Labelled training set: shard manifest with .cls labels, or an image folder root/<class>/<img>.")
    val: str = _f("", "Labelled validation set (same classes as train).")
    arch: str = _f("", "torchvision architecture; empty: the one recorded in the checkpoint.")
    epochs: int = _f(100, "Training epochs. 100 as in MoCo.")
    lr: float = _f(30.0, "SGD learning rate. 30 as in MoCo (features are unnormalised and small-scaled).")
    momentum: float = _f(0.9, "SGD momentum. 0.9 as in MoCo.")
    weight_decay: float = _f(0.0, "Weight decay. 0 as in MoCo.")
    milestones: list[int] = _f([60, 80], "Epochs at which lr is multiplied by 0.1. 60, 80 as in MoCo.")
    batch_size: int = _f(256, "GLOBAL batch size over all ranks. 256 as in MoCo.")
    train_crop: int = _f(224, "RandomResizedCrop size for training. 224 as in MoCo.")
    val_resize: int = _f(256, "Resize (short side) before the validation center crop. 256 as in MoCo.")
    val_crop: int = _f(224, "Validation center-crop size. 224 as in MoCo.")
    workers: int = _f(8, "DataLoader worker processes per rank (0: decode in the training process).")
    device: Literal["auto", "cuda", "cpu"] = _f("auto", "Device. auto: CUDA when available.")
    seed: int = _f(0, "Seed for the classifier init and the data order.")
    max_steps: int = _f(0, "Stop training after this many steps (0: all epochs). For smoke tests.")
    print_every: int = _f(50, "Print the training loss every N steps.")
    out: str = _f("", "Write the result (JSON) and the classifier weights into this directory (empty: no files).")
    dist_timeout_s: float = _f(600.0, "Collective timeout in seconds.")
    torch_threads: int = _f(0, "torch intra-op CPU threads per rank. 0: the usable cores / ranks on this node, less "
                               "the decode workers, at least 1.")

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "train_crop", "val_resize", "val_crop", "print_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"linear.{name} must be > 0; got {getattr(self, name)}")
        for name in ("lr", "dist_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"linear.{name} must be > 0; got {getattr(self, name)}")
        for name in ("weight_decay", "workers", "max_steps", "torch_threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"linear.{name} must be >= 0; got {getattr(self, name)}")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"linear.momentum must be in [0, 1); got {self.momentum}")
        if list(self.milestones) != sorted(self.milestones) or any(m <= 0 for m in self.milestones):
            raise ConfigError(f"linear.milestones must be increasing positive epochs; got {self.milestones}")
        if self.val_crop > self.val_resize:
            raise ConfigError(f"linear.val_crop ({self.val_crop}) must not exceed val_resize ({self.val_resize})")


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, dtypes, shapes, bytes): equal iff bit-identical."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def build_linear_classifier(feature_dim: int, num_classes: int) -> torch.nn.Linear:
    """The linear head of MoCo's protocol: weight ~ N(0, 0.01), bias 0."""
    fc = torch.nn.Linear(feature_dim, num_classes)
    torch.nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    torch.nn.init.zeros_(fc.bias)
    return fc


def freeze(backbone: torch.nn.Module) -> torch.nn.Module:
    """No gradients and eval mode (BN uses, and never updates, its running statistics)."""
    backbone.requires_grad_(False)
    return backbone.eval()


def step_lr(epoch: int, cfg: LinearEvalConfig) -> float:
    """lr x 0.1 for every milestone epoch already reached."""
    return cfg.lr * 0.1 ** sum(epoch >= m for m in cfg.milestones)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> torch.Tensor:
    """Counts of samples whose label is among the top-k logits, one per k (k clipped to the class count).

    Args:
        logits: B x C.
        labels: B.

    Returns:
        len(ks) float counts.
    """
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # B x k
    hit = top == labels[:, None]
    return torch.stack([hit[:, :k].any(1).sum().float() for k in ks])


@torch.no_grad()
def evaluate_linear(backbone: torch.nn.Module, classifier: torch.nn.Module, dataset: LabelledImages,
                    batch_size: int, workers: int, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (percent) on ``dataset``, exact under torch.distributed (each rank a disjoint share)."""
    classifier.eval()
    loader = build_eval_loader(dataset, batch_size, workers, distributed.rank(), distributed.world_size())
    counts = torch.zeros(4, device=device)  # top1, top5, total, undecodable
    for images, labels, bad in loader:
        counts[3] += bad
        if images.numel() == 0:
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = classifier(pooled_features(backbone, images))
        counts[:2] += topk_correct(logits, labels)
        counts[2] += labels.shape[0]
    top1, top5, total, bad = distributed.all_reduce_sum(counts).tolist()
    if total == 0:
        raise RuntimeError(f"no decodable validation image in {dataset.path}")
    return {"top1": 100 * top1 / total, "top5": 100 * top5 / total, "val_samples": int(total), "val_bad": int(bad)}


def run_linear_eval(cfg: LinearEvalConfig, dist: distributed.DistInfo,
                    backbone: torch.nn.Module | None = None) -> tuple[dict[str, float | int | str], torch.nn.Linear]:
    """Train and evaluate the linear probe.

    Args:
        cfg: the linear-evaluation config.
        dist: this process's DistInfo (``setup_distributed`` already called).
        backbone: a module mapping N x 3 x H x W to pooled N x D features; default: built from ``cfg.checkpoint``.

    Returns:
        The metrics (top1, top5 in percent, steps, sample counts, backbone_sha256, seconds; identical on every
        rank) and the trained classifier.

    Raises:
        CheckpointError, LabelledSetError: unusable checkpoint or data (one line).
        RuntimeError: the backbone changed during training (it must not).
    """
    device = dist.device
    torch.manual_seed(cfg.seed)
    if backbone is None:
        backbone = load_backbone(cfg.checkpoint, cfg.arch or None)
    backbone = freeze(backbone.to(device))
    hash_before = state_hash(backbone)

    train_set = LabelledImages(cfg.train, train_transform(cfg.train_crop))
    val_set = LabelledImages(cfg.val, eval_transform(cfg.val_crop, cfg.val_resize))
    if train_set.classes != val_set.classes:
        raise ConfigError(f"train and val sets have different classes ({train_set.num_classes} vs {val_set.num_classes})")
    if cfg.batch_size % dist.world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the world size {dist.world_size}")
    per_rank = cfg.batch_size // dist.world_size

    with torch.no_grad():
        feature_dim = pooled_features(backbone, torch.zeros(2, 3, cfg.train_crop, cfg.train_crop, device=device)).shape[1]
    classifier = build_linear_classifier(feature_dim, train_set.num_classes).to(device)
    distributed.broadcast(classifier.weight.data)  # identical init everywhere (DDP would also do this)
    trained = classifier
    if dist.world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        trained = DistributedDataParallel(classifier, device_ids=device_ids)
    optimizer = torch.optim.SGD(trained.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=cfg.seed, drop_last=False)
    loader = torch.utils.data.DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                                         collate_fn=collate_skip_bad, pin_memory=device.type == "cuda",
                                         drop_last=False, persistent_workers=cfg.workers > 0)
    step, train_bad, start = 0, 0, time.perf_counter()
    total_steps = cfg.max_steps or cfg.epochs * len(loader)
    loss_sum = torch.zeros((), device=device)
    for epoch in range(math.ceil(total_steps / len(loader))):
        sampler.set_epoch(epoch)
        for group in optimizer.param_groups:
            group["lr"] = step_lr(epoch, cfg)
        trained.train()  # the classifier only; the backbone stays in eval mode
        for images, labels, bad in loader:
            train_bad += bad
            if images.numel() == 0:
                # Every rank must still take part in DDP's all-reduce: feed an empty batch (zero loss, zero grad).
                images = torch.zeros(0, 3, cfg.train_crop, cfg.train_crop)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.no_grad():
                feats = pooled_features(backbone, images) if images.shape[0] else torch.zeros(0, feature_dim, device=device)
            logits = trained(feats)
            loss = F.cross_entropy(logits, labels, reduction="sum") / max(labels.shape[0], 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            step += 1
            if step % cfg.print_every == 0 and dist.is_main:
                # Reading the loss syncs the host: only every print_every steps.
                print(f"epoch {epoch} step {step}/{total_steps} loss {loss_sum.item() / cfg.print_every:.4f} "
                      f"lr {optimizer.param_groups[0]['lr']:.4g} {time.perf_counter() - start:.0f}s", flush=True)
                loss_sum.zero_()
            if step >= total_steps:
                break

    result = evaluate_linear(backbone, classifier, val_set, per_rank, cfg.workers, device)
    hash_after = state_hash(backbone)
    if hash_after != hash_before:
        raise RuntimeError(f"the backbone changed during linear evaluation ({hash_before[:12]} -> {hash_after[:12]})")
    result.update(steps=step, train_samples=len(train_set), train_bad=int(distributed.all_reduce_sum(
        torch.tensor(float(train_bad), device=device)).item()), backbone_sha256=hash_after,
        seconds=time.perf_counter() - start)
    return result, classifier


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


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (``--config`` nested under ``linear:``), then evaluate; mistakes exit 2 in one line."""

    def run() -> None:
        cfg = cli.parse(LinearEvalConfig, argv, group="linear", description=__doc__.split("\n\n")[0],
                        prog="python -m eval.linear")
        distributed.set_torch_threads(cfg.torch_threads, reserved=cfg.workers)
        linear_eval(cfg)

    return cli.guard(run, user_errors=(CheckpointError, LabelledSetError))


if __name__ == "__main__":
    sys.exit(main())
