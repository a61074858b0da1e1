"""Linear evaluation (MoCo sec. 4.1): a linear classifier trained on the frozen, eval-mode backbone's pooled features.

The protocol of the MoCo paper and its ``main_lincls.py``: the backbone stays in eval mode (BN running
statistics frozen) and receives no gradient; ``fc`` is initialised N(0, 0.01) with zero bias and trained with
SGD lr 30, momentum 0.9, weight decay 0 for 100 epochs, lr x0.1 at epochs 60 and 80; RandomResizedCrop +
flip for training, resize 256 + center crop 224 for validation; top-1 / top-5 on the validation set. A hash of
the backbone's parameters and buffers before and after proves it did not change.

Two presets (``--protocol``), each value overridable by its own flag:

* ``imagenet`` (default): the paper's numbers above. lr 30 suits MoCo's ImageNet ResNet-50 features, which are
  small in scale (the paper's sec. 4.1 remark); it is far too large for most other features.
* ``small``: for the short, low-resolution runs this project demonstrates (thousands of images, tens of pixels):
  30 epochs (lr x0.1 at 18 and 24), crops at the checkpoint's pre-training ``crop_size``, features centred on the
  first batch's mean, and an lr scaled to the features: 1 / the largest eigenvalue of their covariance, measured on
  the first batch. Why: the cross-entropy of a linear classifier has curvature at most half the largest eigenvalue
  of its inputs' second-moment matrix, and SGD with momentum mu is stable for ``lr * curvature < 2 (1 + mu)``, so
  that lr sits ~8x inside the limit whatever the feature scale. Centring matters: post-ReLU features share a large
  mean, whose direction would otherwise set the lr and leave the informative directions barely trained. The
  centring is folded into the bias at the end (``b - W mean``): the saved classifier takes raw features.

A diverging probe stops with a one-line error: the loss (averaged over ranks, read every ``print_every`` steps and
at each epoch end) turned non-finite or rose above 3x its first value; the message gives the stable lr for the
measured features. With ``--wandb-mode offline`` (default) or ``online`` the loss, lr, top-1/top-5 and the config go
to W&B (job type ``linear-eval``); ``offline`` and ``disabled`` need no account or network.

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

import sys

import cli
from config import LinearEvalConfig


def main(argv: list[str] | None = None) -> int:
    """Parse the command line (``--config`` nested under ``linear:``), then evaluate; mistakes exit 2 in one line.

    The command line is parsed before torch and torchvision load (seconds): ``--help`` and a mistyped flag answer at
    once. The evaluation code below is then imported as the module ``eval.linear``.
    """

    def run() -> None:
        cfg = cli.parse(LinearEvalConfig, argv, group="linear", description=__doc__.split("\n\n")[0],
                        prog="python -m eval.linear")
        from eval import linear  # this file's code below main(): torch and torchvision load now

        linear.distributed.set_torch_threads(cfg.torch_threads, reserved=cfg.workers)
        linear.linear_eval(cfg)

    return cli.guard(run)  # CheckpointError and LabelledSetError are cli.UserError: one line, exit code 2


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- the evaluation (imported after parsing)
# ruff: noqa: E402 -- the imports below follow main(), which parses the command line before torch loads.

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import distributed
from cli import ConfigError
from eval.export import load_backbone, load_checkpoint
from eval.knn import pooled_features
from eval.labelled_data import (
    LabelledImages,
    build_eval_loader,
    collate_skip_bad,
    eval_transform,
    train_transform,
)

# The MoCo paper's ImageNet protocol (sec. 4.1, main_lincls.py) and the preset for small runs (module docstring).
PROTOCOLS = {
    "imagenet": {"lr": 30.0, "epochs": 100, "milestones": [60, 80], "train_crop": 224, "val_resize": 256, "val_crop": 224},
    "small": {"lr": 0.0, "epochs": 30},
}
DIVERGENCE_FACTOR = 3.0  # the loss starts near ln(classes) (fc ~ N(0, 0.01)); a sound probe never triples it


class LinearEvalDiverged(ConfigError):
    """The probe's loss turned non-finite or grew far above its start: the lr is too large for these features."""


def resolve_protocol(cfg: LinearEvalConfig, checkpoint_crop: int | None = None) -> LinearEvalConfig:
    """``cfg`` with every value left at 0 / empty taken from ``cfg.protocol``'s preset.

    Args:
        cfg: the linear-evaluation config.
        checkpoint_crop: the pre-training ``data.crop_size`` recorded in the checkpoint (``small`` crops at it).

    Returns:
        The resolved config; ``lr`` stays 0 under ``small`` (set from the features' norm on the first batch).

    Raises:
        ConfigError: ``small`` without a crop size in the checkpoint or on the command line.
    """
    preset = dict(PROTOCOLS[cfg.protocol])
    if cfg.protocol == "small":
        crop = cfg.val_crop or cfg.train_crop or checkpoint_crop
        if not crop:
            raise ConfigError("--protocol small crops at the checkpoint's crop_size, and it records none: "
                              "pass --train-crop and --val-crop")
        preset.update(train_crop=crop, val_crop=crop, val_resize=round((cfg.val_crop or crop) / 0.875))
    epochs = cfg.epochs or preset["epochs"]
    if cfg.milestones:
        milestones = list(cfg.milestones)
    elif cfg.protocol == "imagenet" and epochs == 100:
        milestones = preset["milestones"]
    else:
        milestones = [max(1, round(0.6 * epochs)), max(1, round(0.8 * epochs))]
    out = dataclasses.replace(cfg, lr=cfg.lr or preset["lr"], epochs=epochs, milestones=milestones,
                              **{k: getattr(cfg, k) or preset[k] for k in ("train_crop", "val_resize", "val_crop")})
    if out.val_crop > out.val_resize:
        raise ConfigError(f"linear.val_crop ({out.val_crop}) must not exceed val_resize ({out.val_resize})")
    return out


def stable_lr_limit(top_eigenvalue: float, momentum: float) -> float:
    """Largest lr at which heavy-ball SGD stays stable on a linear softmax probe (quadratic model of the loss).

    The cross-entropy Hessian is ``E[(diag(p) - p p^T) (x) x x^T]``, whose largest eigenvalue is at most half the
    largest eigenvalue of ``E[x x^T]`` (``top_eigenvalue``); SGD with momentum mu is stable when
    ``lr * curvature < 2 (1 + mu)``.
    """
    return 4.0 * (1.0 + momentum) / max(top_eigenvalue, 1e-12)


def feature_moments(feats: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Mean (D), largest eigenvalue of the second-moment matrix and of the covariance, over every rank's ``feats``.

    Args:
        feats: this rank's N x D features (N may be 0).
    """
    feats = feats.double()
    dim = feats.shape[1]
    stats = distributed.all_reduce_sum(torch.cat([
        feats.sum(0), (feats.T @ feats).reshape(-1), torch.tensor([float(feats.shape[0])], device=feats.device,
                                                                   dtype=torch.float64)]))
    n = stats[-1].clamp(min=1)
    mean, second = stats[:dim] / n, stats[dim:-1].reshape(dim, dim) / n
    cov = second - torch.outer(mean, mean)
    return mean.float(), torch.linalg.eigvalsh(second).max().item(), torch.linalg.eigvalsh(cov).max().item()


def check_divergence(loss: float, start: float, step: int, lr: float, top_eigenvalue: float, momentum: float,
                     small_lr: float) -> None:
    """Raise :class:`LinearEvalDiverged`, one line saying what to change, if ``loss`` is non-finite or > 3x ``start``.

    Args:
        top_eigenvalue: the largest eigenvalue of the probe's inputs' second-moment matrix (sets the stable lr).
        small_lr: the lr ``--protocol small`` would use on these features.
    """
    if math.isfinite(loss) and loss <= DIVERGENCE_FACTOR * start:
        return
    limit = stable_lr_limit(top_eigenvalue, momentum)
    raise LinearEvalDiverged(
        f"linear eval diverged: loss {loss:.4g} at step {step} (started at {start:.3g}); lr {lr:.4g} is too large for "
        f"these features (largest second-moment eigenvalue {top_eigenvalue:.3g}; SGD is stable below lr "
        f"~{limit:.3g}): pass --protocol small (centred features, lr {small_lr:.3g}) or --lr {limit / 8:.2g}")


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


def step_lr(epoch: int, cfg: LinearEvalConfig, base_lr: float | None = None) -> float:
    """``base_lr`` (default ``cfg.lr``) x 0.1 for every milestone epoch already reached."""
    return (cfg.lr if base_lr is None else base_lr) * 0.1 ** sum(epoch >= m for m in cfg.milestones)


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


def run_linear_eval(cfg: LinearEvalConfig, dist: distributed.DistInfo, backbone: torch.nn.Module | None = None,
                    wandb_run=None) -> tuple[dict[str, float | int | str], torch.nn.Linear]:
    """Train and evaluate the linear probe.

    Args:
        cfg: the linear-evaluation config (values left at 0 are resolved from ``cfg.protocol``).
        dist: this process's DistInfo (``setup_distributed`` already called).
        backbone: a module mapping N x 3 x H x W to pooled N x D features; default: built from ``cfg.checkpoint``.
        wandb_run: a W&B run to log the loss, lr and top-1/top-5 to (rank 0), or None.

    Returns:
        The metrics (top1, top5 in percent, steps, sample counts, the lr used, the features' mean squared norm,
        backbone_sha256, seconds; identical on every rank) and the trained classifier.

    Raises:
        CheckpointError, LabelledSetError: unusable checkpoint or data (one line).
        LinearEvalDiverged: the loss turned non-finite or tripled (one line saying what to change).
        RuntimeError: the backbone changed during training (it must not).
    """
    device = dist.device
    torch.manual_seed(cfg.seed)
    checkpoint_crop = None
    if backbone is None:
        state, saved_config = load_checkpoint(cfg.checkpoint)
        checkpoint_crop = (saved_config.get("data") or {}).get("crop_size")
        backbone = load_backbone({"model": state, "config": saved_config}, cfg.arch or None)
    cfg = resolve_protocol(cfg, checkpoint_crop)
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
    base_lr, start_loss, top_eigenvalue, small_lr = cfg.lr, math.nan, math.nan, math.nan
    center = torch.zeros(feature_dim, device=device)  # subtracted from the features (small protocol: their mean)
    window = torch.zeros(2, device=device)  # loss sum, steps since the last check
    for epoch in range(math.ceil(total_steps / len(loader))):
        sampler.set_epoch(epoch)
        trained.train()  # the classifier only; the backbone stays in eval mode
        for images, labels, bad in loader:
            train_bad += bad
            if images.numel() == 0:
                # Every rank must still take part in DDP's all-reduce: feed an empty batch (zero loss, zero grad).
                images = torch.zeros(0, 3, cfg.train_crop, cfg.train_crop)
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with torch.no_grad():
                feats = pooled_features(backbone, images) if images.shape[0] else torch.zeros(0, feature_dim, device=device)
            if step == 0:
                # The features' moments, once (one host sync): the small protocol's centring and lr, the divergence hint.
                mean, top_second, top_cov = feature_moments(feats)
                small_lr = 1.0 / max(top_cov, 1e-12)
                if cfg.protocol == "small":
                    center = mean.to(device)
                base_lr = base_lr or small_lr
                top_eigenvalue = top_cov if cfg.protocol == "small" else top_second
            for group in optimizer.param_groups:
                group["lr"] = step_lr(epoch, cfg, base_lr)
            logits = trained(feats - center)
            loss = F.cross_entropy(logits, labels, reduction="sum") / max(labels.shape[0], 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            window += torch.stack([loss.detach(), torch.ones((), device=device)])
            step += 1
            last = step >= total_steps
            if step == 1 or step % cfg.print_every == 0 or step % len(loader) == 0 or last:
                # Reading the loss syncs the host: only at these checks (first step, every print_every, epoch ends).
                loss_sum, n = distributed.all_reduce_sum(window).tolist()
                mean_loss = loss_sum / max(n, 1)  # n counts every rank's steps
                window.zero_()
                start_loss = mean_loss if step == 1 else start_loss
                lr_now = optimizer.param_groups[0]["lr"]
                if dist.is_main and wandb_run is not None:
                    wandb_run.log({"train/loss": mean_loss, "train/lr": lr_now, "train/epoch": epoch}, step=step)
                check_divergence(mean_loss, start_loss, step, lr_now, top_eigenvalue, cfg.momentum, small_lr)
                if dist.is_main and (step % cfg.print_every == 0 or last):
                    print(f"epoch {epoch} step {step}/{total_steps} loss {mean_loss:.4f} lr {lr_now:.4g} "
                          f"{time.perf_counter() - start:.0f}s", flush=True)
            if last:
                break

    with torch.no_grad():  # fold the centring into the bias: W (x - c) + b = W x + (b - W c)
        classifier.bias -= classifier.weight @ center
    result = evaluate_linear(backbone, classifier, val_set, per_rank, cfg.workers, device)
    hash_after = state_hash(backbone)
    if hash_after != hash_before:
        raise RuntimeError(f"the backbone changed during linear evaluation ({hash_before[:12]} -> {hash_after[:12]})")
    result.update(steps=step, train_samples=len(train_set), train_bad=int(distributed.all_reduce_sum(
        torch.tensor(float(train_bad), device=device)).item()), lr=base_lr, feature_top_eigenvalue=top_eigenvalue,
        protocol=cfg.protocol, backbone_sha256=hash_after, seconds=time.perf_counter() - start)
    if dist.is_main and wandb_run is not None:
        wandb_run.log({"eval/top1": result["top1"], "eval/top5": result["top5"]}, step=step)
        wandb_run.summary.update({k: v for k, v in result.items() if isinstance(v, (int, float, str))})
    return result, classifier


def linear_eval(cfg: LinearEvalConfig) -> dict:
    """Run the linear evaluation as configured (on one device or under torchrun); returns rank 0's metrics."""
    for name in ("checkpoint", "train", "val"):
        if not getattr(cfg, name):
            raise ConfigError(f"--{name} is required")
    dist = distributed.setup_distributed(cfg.device, cfg.dist_timeout_s)
    wandb_run = None
    try:
        if dist.is_main:
            from training.telemetry import start_wandb

            if cfg.out:
                Path(cfg.out).mkdir(parents=True, exist_ok=True)

            wandb_run = start_wandb(cfg.wandb_mode, cfg.wandb_project, dataclasses.asdict(cfg), cfg.out or None,
                                    entity=cfg.wandb_entity, name=cfg.wandb_name, tags=cfg.wandb_tags,
                                    group=cfg.wandb_group, notes=cfg.wandb_notes, job_type="linear-eval")
        result, classifier = run_linear_eval(cfg, dist, wandb_run=wandb_run)
    finally:
        if wandb_run is not None:
            wandb_run.finish()
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
