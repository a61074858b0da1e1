"""Labelled image sets for evaluation (kNN monitor, linear probe): a shard manifest with ``.cls`` entries or class folders.

Two layouts are accepted wherever a labelled set is asked for:

* a shard directory (or its ``manifest.json``) whose manifest lists ``classes`` and whose samples carry
  ``<key>.cls`` (the class index as ASCII text), as written by ``python -m shards build --labels-from-folders``;
* an image-folder tree ``root/<class name>/<image>`` (torchvision's ``ImageFolder`` layout), classes sorted by name.

Evaluation decodes with PIL through a plain PyTorch ``DataLoader``: it is a small share of a run's time and
needs deterministic, exactly reproducible transforms (resize + center crop), not DALI's throughput.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, UnidentifiedImageError

from cli import UserError
from pipeline.recipes import IMAGENET_MEAN, IMAGENET_STD
from shards.manifest import MANIFEST_NAME, ManifestError, read_manifest
from shards.sources import IMAGE_SUFFIXES
from shards.writer import read_index

if TYPE_CHECKING:
    from torchvision import transforms


class LabelledSetError(UserError):
    """A labelled set that cannot be used (missing, empty, unlabelled, bad label); the message names the path."""


@dataclass(frozen=True)
class LabelledSample:
    """Where one labelled image's bytes live: a whole file (offset -1) or a byte range inside a tar shard."""

    path: str
    label: int
    offset: int = -1
    size: int = -1

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as fh:
            if self.offset < 0:
                return fh.read()
            fh.seek(self.offset)
            return fh.read(self.size)


def _read_range(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(size)


def scan_shards(path: str | os.PathLike) -> tuple[list[LabelledSample], list[str]]:
    """Samples and class names of a labelled shard set (labels read from each sample's ``.cls`` member).

    Raises:
        LabelledSetError: no ``classes`` in the manifest, a sample without ``.jpg``/``.cls``, or a bad label.
    """
    try:
        manifest = read_manifest(path)
    except ManifestError as exc:
        raise LabelledSetError(str(exc)) from None
    if not manifest.classes:
        raise LabelledSetError(
            f"{path}: the shard manifest has no classes (build it with --labels-from-folders to use it as a labelled set)")
    samples: list[LabelledSample] = []
    for shard in manifest.shards:
        tar = manifest.tar_path(shard)
        try:
            records = read_index(manifest.index_path(shard))
        except ValueError as exc:
            raise LabelledSetError(str(exc)) from None
        for rec in records:
            files = {ext: (offset, size) for ext, offset, size, _ in rec.files}
            image_ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
            if image_ext is None or "cls" not in files:
                raise LabelledSetError(f"{tar}: sample {rec.key} has no image or no .cls label")
            raw = _read_range(tar, *files["cls"]).strip()
            if not raw.isdigit() or int(raw) >= len(manifest.classes):
                raise LabelledSetError(
                    f"{tar}: sample {rec.key} has label {raw[:20]!r}, not an index below {len(manifest.classes)}")
            samples.append(LabelledSample(str(tar), int(raw), *files[image_ext]))
    return samples, list(manifest.classes)


def scan_image_folder(root: str | os.PathLike) -> tuple[list[LabelledSample], list[str]]:
    """Samples and class names of a ``root/<class>/<image>`` tree; classes are the sorted sub-directory names."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise LabelledSetError(f"{root}: no class sub-directories (expected root/<class>/<image>)")
    samples = [
        LabelledSample(str(f), label)
        for label, name in enumerate(classes)
        for f in sorted((root / name).rglob("*"))
        if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
    ]
    return samples, classes


class LabelledImages(torch.utils.data.Dataset):
    """A labelled image set from shards or class folders; items are ``(image 3 x H x W, label)``.

    An image that fails to decode yields ``None`` instead of a tensor; :func:`collate_skip_bad` drops it and
    counts it, so one corrupt file costs one sample, not the evaluation.

    Args:
        path: shard directory / ``manifest.json`` with ``.cls`` labels, or an image-folder root.
        transform: PIL image -> tensor transform (see :func:`eval_transform`, :func:`train_transform`).

    Raises:
        LabelledSetError: missing path, unlabelled or empty set (one line naming the path).
    """

    def __init__(self, path: str | os.PathLike, transform: transforms.Compose):
        path = Path(path)
        if not path.exists():
            raise LabelledSetError(f"labelled set not found: {path}")
        is_shards = path.is_file() or (path / MANIFEST_NAME).is_file()
        self.samples, self.classes = scan_shards(path) if is_shards else scan_image_folder(path)
        if not self.samples:
            raise LabelledSetError(f"{path}: the labelled set is empty (no images found)")
        self.path = path
        self.transform = transform
        self.targets = torch.tensor([s.label for s in self.samples], dtype=torch.long)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        sample = self.samples[i]
        try:
            image = Image.open(io.BytesIO(sample.read_bytes())).convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError):
            return None, sample.label
        return self.transform(image), sample.label


def collate_skip_bad(batch: list[tuple[torch.Tensor | None, int]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the decodable items of a batch.

    Returns:
        images B' x 3 x H x W, labels B' (int64), and the number of items dropped as undecodable.
    """
    good = [(img, label) for img, label in batch if img is not None]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    images = torch.stack([img for img, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, len(batch) - len(good)


def eval_transform(crop_size: int, resize_size: int | None = None) -> transforms.Compose:
    """Resize the short side then center-crop (256 -> 224 in the papers; ``resize = crop / 0.875`` by default)."""
    from torchvision import transforms  # here: importing torchvision costs seconds that --help should not wait

    resize_size = resize_size or round(crop_size / 0.875)
    return transforms.Compose([
        transforms.Resize(resize_size), transforms.CenterCrop(crop_size), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def train_transform(crop_size: int) -> transforms.Compose:
    """RandomResizedCrop + horizontal flip, the linear-evaluation training augmentation of MoCo."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.RandomResizedCrop(crop_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def rank_indices(n: int, rank: int, world_size: int) -> list[int]:
    """This rank's share of ``range(n)``: every ``world_size``-th index, no padding or duplicates (exact metrics)."""
    return list(range(rank, n, world_size))


def build_eval_loader(dataset: LabelledImages, batch_size: int, workers: int, rank: int = 0,
                      world_size: int = 1) -> torch.utils.data.DataLoader:
    """A deterministic loader over this rank's share of ``dataset`` yielding ``(images, labels, n_bad)``."""
    subset = torch.utils.data.Subset(dataset, rank_indices(len(dataset), rank, world_size))
    return torch.utils.data.DataLoader(
        subset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_skip_bad,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
    )
