"""Shared helpers for the pipeline tests: configs on small shards and view statistics."""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image

from config import Config, replace
from distributed import DistInfo
from pipeline import build_train_loader
from shards.manifest import Manifest, write_manifest
from shards.writer import ShardWriter

BACKENDS = ["dali", "pytorch"]


def make_cfg(shards: Path, backend: str, **data) -> Config:
    """64 px views, 8 pairs per batch, 2 threads: small enough for the shared CPU."""
    values = dict(shards=str(shards), backend=backend, crop_size=64, batch_size=8, num_threads=2,
                  shuffle_buffer=16, prefetch=2, dali_device="cpu")
    values.update(data)
    return replace(Config(), data=values)


def take(cfg: Config, n: int, dist: DistInfo | None = None, state: dict | None = None):
    """``n`` batches from a fresh loader (optionally restored from ``state``), the loader closed afterwards."""
    loader = build_train_loader(cfg, dist or DistInfo())
    try:
        if state is not None:
            loader.load_state_dict(state)
        return [next(loader) for _ in range(n)], loader
    finally:
        loader.close()


def to_pixels(views: torch.Tensor, recipe) -> torch.Tensor:
    """Undo the normalisation: N x 3 x S x S back to the 0-255 scale."""
    mean = torch.tensor(recipe.mean).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std).view(1, 3, 1, 1)
    return (views.float() * std + mean) * 255


def is_gray(pixels: torch.Tensor) -> torch.Tensor:
    """Per view: all three channels equal up to one grey level (DALI's YIQ round trip rounds by up to 1)."""
    return ((pixels[:, 0] - pixels[:, 1]).abs().amax((1, 2)) < 1.5) & ((pixels[:, 1] - pixels[:, 2]).abs().amax((1, 2)) < 1.5)


def jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(out: Path, samples: list[bytes], per_shard: int) -> Manifest:
    """Write ``samples`` (encoded images, corrupt ones included as given) into shards plus a manifest."""
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for start in range(0, len(samples), per_shard):
        writer = ShardWriter(out, f"train-{start // per_shard:06d}")
        for i, data in enumerate(samples[start:start + per_shard], start):
            writer.write(f"{i:09d}", {"jpg": data, "json": b"{}"})
        entries.append(writer.close())
    manifest = Manifest(shards=entries, root=out)
    write_manifest(manifest, out)
    return manifest
