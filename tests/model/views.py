"""Small two-view batches cut from the real sample photos (shared by the tests and the multi-rank worker)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

import config
from model.encoder import Encoder, MoCoProjectionHead

# A ModelConfig small enough for CPU tests: resnet18 at 32 px, 8-d keys.
TINY_MODEL = {"arch": "resnet18", "dim": 8, "mlp_hidden_dim": 16, "temperature": 0.2, "momentum": 0.9}


def tiny_config(**model: object) -> config.Config:
    return config.replace(config.Config(), model={**TINY_MODEL, **model},
                          optim={"weight_decay": 1e-4, "sgd_momentum": 0.9, "schedule": "constant"})


def tiny_encoder(cfg: config.Config) -> Encoder:
    """A two-conv, two-BN backbone with the configured head: the CPU stand-in for a ResNet in slow tests."""
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
    m = cfg.model
    return Encoder(backbone, MoCoProjectionHead(16, m.dim, m.head, m.mlp_hidden_dim), 16)


def make_views(photo_dir: Path, steps: int, batch: int, size: int = 32, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two random crops (with flips) of real photos per sample: steps x batch x 3 x size x size each, normalised."""
    paths = sorted(p for p in Path(photo_dir).rglob("*") if p.is_file())
    rng = np.random.default_rng(seed)
    images = [np.asarray(Image.open(p).convert("RGB").resize((96, 96)), dtype=np.float32) / 255.0 for p in paths]
    views = np.empty((2, steps * batch, size, size, 3), np.float32)
    for i in range(steps * batch):
        img = images[i % len(images)]
        for v in range(2):
            crop = int(rng.integers(size, 96))
            y, x = rng.integers(0, 96 - crop + 1, size=2)
            patch = Image.fromarray((img[y:y + crop, x:x + crop] * 255).astype(np.uint8)).resize((size, size))
            arr = np.asarray(patch, np.float32) / 255.0
            views[v, i] = arr[:, ::-1] if rng.random() < 0.5 else arr
    t = torch.from_numpy(views).permute(0, 1, 4, 2, 3)
    t = (t - 0.45) / 0.25
    t = t.reshape(2, steps, batch, 3, size, size).to(dtype).contiguous()
    return t[0], t[1]


def make_perms(steps: int, n: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.permutation(n) for _ in range(steps)]
