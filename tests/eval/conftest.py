"""Labelled real data for the evaluation tests: scikit-learn's handwritten digits as image folders and labelled shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import config as config_lib
from model.moco import MoCo
from shards.manifest import Manifest, write_manifest
from shards.writer import ShardWriter

DIGIT_SIZE = 32  # 8 x 8 upsampled: the smallest size a torchvision ResNet keeps a spatial map for


def digit_images(size: int = DIGIT_SIZE) -> tuple[list[Image.Image], np.ndarray]:
    """The 1797 scikit-learn digits (8 x 8, 0..16) as grayscale PIL images upsampled to ``size``, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = [Image.fromarray((img * (255 / 16)).astype(np.uint8), "L").resize((size, size), Image.BILINEAR)
              for img in digits.images]
    return images, digits.target.astype(int)


def split_indices(labels: np.ndarray, per_class: int, offset: int = 0) -> list[int]:
    """The first ``per_class`` indices of each class after skipping ``offset`` of them (disjoint splits)."""
    return [i for c in range(10) for i in np.flatnonzero(labels == c)[offset:offset + per_class]]


def write_image_folder(root: Path, images: list[Image.Image], labels: np.ndarray, indices: list[int]) -> Path:
    for i in indices:
        folder = root / f"digit{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        images[i].save(folder / f"{i:04d}.png")
    return root


def write_labelled_shards(root: Path, images: list[Image.Image], labels: np.ndarray, indices: list[int],
                          per_shard: int = 64) -> Path:
    """Labelled shards as ``shards build --labels-from-folders`` writes them: <key>.jpg + <key>.cls, manifest classes."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for start in range(0, len(indices), per_shard):
        writer = ShardWriter(root, f"val-{start // per_shard:06d}")
        for i in indices[start:start + per_shard]:
            buf = io.BytesIO()
            images[i].convert("RGB").save(buf, "JPEG", quality=95)
            writer.write(f"{i:09d}", {"jpg": buf.getvalue(), "json": json.dumps({"index": int(i)}).encode(),
                                      "cls": str(int(labels[i])).encode()})
        entries.append(writer.close())
    write_manifest(Manifest(shards=entries, prefix="val", root=root, classes=[f"digit{c}" for c in range(10)]), root)
    return root


def moco_checkpoint(path, arch: str = "resnet18", seed: int = 0, train_steps: int = 1, stem: str = "imagenet"):
    """A checkpoint as train.py writes it, after a few real momentum updates (so encoder_q != encoder_k)."""
    cfg = config_lib.replace(config_lib.Config(), model={"arch": arch, "stem": stem, "queue_size": 64, "mlp_hidden_dim": 32,
                                                         "dim": 16, "momentum": 0.5, "split_bn_groups": 2})
    torch.manual_seed(seed)
    model = MoCo(cfg.model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(train_steps):
        views = torch.randn(2, 8, 3, 32, 32)
        out = model(views[0], views[1], momentum=0.5)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    torch.save({"model": model.state_dict(), "step": train_steps, "config": config_lib.to_dict(cfg)}, path)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread: these tiny models gain nothing from more, and oversubscribed cores slow them 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    return digit_images()


@pytest.fixture(scope="session")
def digits_folders(digits, tmp_path_factory) -> dict[str, Path]:
    """Disjoint small splits as image folders: train (30/class), val (10/class)."""
    images, labels = digits
    root = tmp_path_factory.mktemp("digits_folders")
    return {
        "train": write_image_folder(root / "train", images, labels, split_indices(labels, 30)),
        "val": write_image_folder(root / "val", images, labels, split_indices(labels, 10, offset=30)),
    }


@pytest.fixture(scope="session")
def digits_shards(digits, tmp_path_factory) -> Path:
    """The val split (10/class) as labelled shards."""
    images, labels = digits
    return write_labelled_shards(tmp_path_factory.mktemp("digits_shards"), images, labels,
                                 split_indices(labels, 10, offset=30), per_shard=32)
