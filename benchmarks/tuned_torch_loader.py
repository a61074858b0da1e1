"""The fair baseline for the loader benchmarks: a PyTorch DataLoader tuned as a strong engineer would tune it.

The product's PyTorch backend (``pipeline.torch_loader``) is built for exact resume: streams seeded per sample,
a new DataLoader for every pass's re-dealt shards, at most one worker per shard. This loader drops all of that
and keeps only speed, on the same shards, recipe and output (normalised two-view batches on the device, in the
training dtype and memory format):

- persistent workers on every core, one intra-op thread each, each reading its own share of the shards
  (whole shards when there are at least as many shards as workers, else every W-th sample) in an endless
  cycle: no pass boundary, no worker restart, ever;
- each JPEG decoded once, with Pillow's ``draft`` (libjpeg's DCT-domain 1/2, 1/4, 1/8 scaling) to the smallest
  scale whose shorter side still covers the crop size, then both views cut from it, with the recipe's
  torchvision v2 transforms on PIL images (Pillow's resize and colour kernels, faster on a CPU core than the same
  transforms on uint8 tensors; measured in the README) and the blur as the original MoCo code applies it,
  Pillow's ``GaussianBlur`` (torchvision's blur of a PIL image converts it to a tensor and back, the costliest
  step of a view). torchvision's own ``decode_jpeg`` has no reduced-size decode;
- whole batches of uint8 views made in the worker (one IPC message per batch, not per sample), pinned memory
  on CUDA, ``prefetch_factor`` batches ahead per worker; normalisation and the dtype cast on the device.

At 224 px from ~500 x 375 photos ``draft`` keeps the full size (its first step, 1/2, would give a shorter side
of ~188 < 224), so the 224-px comparison is the same decode work as DALI's; at the ``--quick`` 64-px size it
decodes at 1/4 (less work than DALI's full decode, in the baseline's favour).
"""

from __future__ import annotations

import io
import random
import tarfile
from collections.abc import Iterator

import torch
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms import v2

from pipeline.recipes import Recipe
from shards.manifest import read_manifest


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism; intra-op threads would oversubscribe the cores


def decode_reduced(data: bytes, size: int) -> Image.Image:
    """Decode a JPEG at the smallest DCT scale (1, 1/2, 1/4, 1/8) whose shorter side is still >= ``size``."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", (size, size))  # Pillow keeps the scale at which both sides stay >= the requested size
    return image.convert("RGB")


class _PilGaussianBlur:
    """Pillow's Gaussian blur with a standard deviation drawn uniformly from ``sigma`` (Pillow's radius is sigma)."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def build_pil_view_transform(recipe: Recipe, size: int) -> v2.Compose:
    """One view from a PIL image to a uint8 3 x size x size tensor: the recipe's steps in the product's order."""
    jitter = v2.RandomApply([v2.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)],
                            p=recipe.jitter_p)
    gray = v2.RandomGrayscale(p=recipe.grayscale_p)
    steps: list = [v2.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True)]
    steps += [gray, jitter] if recipe.grayscale_first else [jitter, gray]
    if recipe.blur_p > 0:
        steps.append(v2.RandomApply([_PilGaussianBlur(recipe.blur_sigma)], p=recipe.blur_p))
    return v2.Compose([*steps, v2.RandomHorizontalFlip(p=recipe.flip_p), v2.PILToTensor()])


class _Streams(IterableDataset):
    """Worker ``w`` of ``W``: endless batches of two views from its share of the shards."""

    def __init__(self, tars: list[str], batch: int, recipe: Recipe, size: int, buffer: int, seed: int, draft: bool):
        self.tars, self.batch, self.recipe, self.size = tars, batch, recipe, size
        self.buffer, self.seed, self.draft = buffer, seed, draft

    def _samples(self, worker: int, workers: int) -> Iterator[bytes]:
        rng = random.Random(self.seed * 7919 + worker)
        whole_shards = len(self.tars) >= workers
        mine = self.tars[worker::workers] if whole_shards else list(self.tars)
        position = 0
        while True:
            order = list(mine)
            rng.shuffle(order)
            for tar in order:
                with tarfile.open(tar, "r|") as stream:
                    for member in stream:
                        if not member.name.endswith(".jpg"):
                            continue
                        position += 1
                        if whole_shards or position % workers == worker:
                            yield stream.extractfile(member).read()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        torch.manual_seed(self.seed * 7919 + worker)
        random.seed(self.seed * 7919 + worker)  # the blur's sigma
        rng = random.Random(self.seed * 104729 + worker)
        transform = build_pil_view_transform(self.recipe, self.size)
        buf: list[bytes] = []
        views_q, views_k, bad = [], [], 0
        for data in self._samples(worker, workers):
            buf.append(data)
            if len(buf) < self.buffer:
                continue
            i = rng.randrange(len(buf))
            buf[i], buf[-1] = buf[-1], buf[i]
            data = buf.pop()
            try:
                image = decode_reduced(data, self.size) if self.draft else Image.open(io.BytesIO(data)).convert("RGB")
            except Exception:  # noqa: BLE001 - a sample the decoder rejects is counted and skipped
                bad += 1
                continue
            views_q.append(transform(image))
            views_k.append(transform(image))
            if len(views_q) == self.batch:
                yield torch.stack(views_q), torch.stack(views_k), bad
                views_q, views_k, bad = [], [], 0


class TunedTorchLoader:
    """Endless two-view batches from ``shard_dir``, with the surface the suites use of a ``TrainLoader``.

    It has no pass boundary: ``pass_index`` stays 0 and ``batches_per_pass`` (the corpus's images // batch) is
    for the tables only.
    """

    backend = "pytorch-tuned"
    has_pass_boundaries = False

    def __init__(self, shard_dir: str, batch: int, workers: int, recipe: Recipe, size: int, device: torch.device,
                 dtype: torch.dtype, channels_last: bool, prefetch: int = 4, seed: int = 0, draft: bool = True):
        manifest = read_manifest(shard_dir)
        tars = [str(manifest.tar_path(s)) for s in manifest.shards]
        self.batches_per_pass = max(1, manifest.total_samples // batch)
        self.pass_index = self.batch_in_pass = 0
        self.bad_samples = 0
        self.device, self.dtype = device, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._mean = (torch.tensor(recipe.mean).view(1, 3, 1, 1) * 255).to(device)
        self._std = (torch.tensor(recipe.std).view(1, 3, 1, 1) * 255).to(device)
        dataset = _Streams(tars, batch, recipe, size, buffer=max(2, 1024 // max(workers, 1)), seed=seed, draft=draft)
        self._loader = DataLoader(dataset, batch_size=None, num_workers=workers, prefetch_factor=prefetch,
                                  persistent_workers=True, pin_memory=device.type == "cuda",
                                  worker_init_fn=_one_thread)
        self._iter: Iterator | None = iter(self._loader)

    def __iter__(self) -> TunedTorchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, bad = next(self._iter)
        self.bad_samples += bad
        self.batch_in_pass += 1
        return self._finish(q), self._finish(k)

    def _finish(self, views: torch.Tensor) -> torch.Tensor:
        views = views.to(self.device, non_blocking=True).float()
        return ((views - self._mean) / self._std).to(dtype=self.dtype, memory_format=self.memory_format)

    def close(self) -> None:
        self._iter = None  # shuts the persistent workers down
        self._loader = None
