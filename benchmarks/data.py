"""The benchmark corpus: real photos at ImageNet-like size, made on all cores, sharded by the real shards builder.

A loader benchmark needs passes long enough that its steady speed, not its pass boundaries, sets the figure:
the full suites use 27,648 images, 108 batches of 256 per pass (ImageNet has 5,000). The images are derived
from the real photos that ship with scikit-image and scikit-learn (``shards.sample_corpus``) by random crops,
horizontal flips and recolouring (per-channel gain, gamma, saturation) plus a faint sensor-like grain, saved as
JPEGs with a shorter side of 360-400 px (about ImageNet's ~500 x 375), one process per core. The builder
re-encodes them at quality 90: ~50 KiB per image (ImageNet's originals average ~110 KiB; crops of 8 photos,
often enlarged, are smoother than real photos). ``pipeline.json`` records the corpus's mean bytes per sample.

Built once per output directory and reused by the pipeline and e2e suites and across runs (a stamp beside the
folder records what was built). ``--shards DIR`` uses existing shards instead, ``--corpus DIR`` a folder of your
own images (both for machines without scikit-image).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from benchmarks.context import Context

_PHOTOS: list[Image.Image] = []  # per worker process: the source photos, loaded once
_GRAIN: np.ndarray | None = None  # per worker process: a noise field, windows of it are added to each image


def _load_sources() -> None:
    """Load the source photos and the grain field into this process (the forked writers inherit them)."""
    global _PHOTOS, _GRAIN
    if _PHOTOS:
        return
    from shards.sample_corpus import sample_photos  # needs scikit-image / scikit-learn

    _PHOTOS = []
    for _, photo in sorted(sample_photos().items()):
        if min(photo.size) > 800:  # the 1411 px retina: crops of it would spend most of the time resizing
            photo = photo.reduce(2)
        _PHOTOS.append(photo)
    _GRAIN = np.random.default_rng(0).normal(0.0, 4.0, (1024, 1024, 3)).round().astype(np.int16)


def derived_photo(index: int, seed: int, short_side: tuple[int, int]) -> tuple[Image.Image, int]:
    """Image ``index`` of the corpus and its JPEG quality: a deterministic function of (index, seed).

    A random crop (25-100% of a source photo's area, aspect 3/4-4/3) resized to a shorter side in ``short_side``,
    flipped half of the time, recoloured (saturation 0.6-1.4, gamma 0.8-1.25, per-channel gain 0.8-1.2), with
    grain (Gaussian, sigma 4 levels).
    """
    from shards.sample_corpus import random_crop

    _load_sources()
    rng = random.Random(seed * 1_000_003 + index)
    image = random_crop(_PHOTOS[index % len(_PHOTOS)], rng, rng.randint(*short_side))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4))
    gamma = rng.uniform(0.8, 1.25)
    gains = [rng.uniform(0.8, 1.2) for _ in range(3)]
    image = image.point([min(255, round(255 * (v / 255) ** gamma * g)) for g in gains for v in range(256)])
    pixels = np.asarray(image, dtype=np.int16)
    h, w = pixels.shape[:2]
    y, x = rng.randint(0, _GRAIN.shape[0] - h), rng.randint(0, _GRAIN.shape[1] - w)
    pixels = np.clip(pixels + _GRAIN[y:y + h, x:x + w], 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), rng.randint(85, 95)


def _write_range(job: tuple[str, int, int, int, tuple[int, int], bool]) -> int:
    out, start, stop, seed, short_side, formats = job
    for i in range(start, stop):
        image, quality = derived_photo(i, seed, short_side)
        folder = Path(out) / f"{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 10 if formats else 0  # mixed formats like a scraped corpus: 70% JPEG, PNG, greyscale, WebP
        if kind == 7:
            image.save(folder / f"{i:06d}.png")
        elif kind == 8:
            image.convert("L").save(folder / f"{i:06d}_gray.jpg", quality=quality)
        elif kind == 9:
            image.save(folder / f"{i:06d}.webp", quality=quality)
        else:
            image.save(folder / f"{i:06d}.jpg", quality=quality)
    return stop - start


def write_photo_corpus(out_dir: Path, num_images: int, seed: int = 0, short_side: tuple[int, int] = (360, 400),
                       formats: bool = False, workers: int = 0) -> float:
    """Write ``num_images`` derived real-photo images into ``out_dir`` with ``workers`` processes (0: every core).

    Args:
        out_dir: destination (sub-folders of 1,000 images).
        num_images: how many.
        seed: the images are a deterministic function of (seed, index).
        short_side: range of the shorter side in pixels.
        formats: every tenth image a PNG, a greyscale JPEG or a WebP (the shards suite's mixed corpus).
        workers: writer processes; 0 = every core.

    Returns:
        The seconds it took.
    """
    t0 = time.perf_counter()
    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    chunk = 64
    jobs = [(str(out_dir), a, min(a + chunk, num_images), seed, short_side, formats)
            for a in range(0, num_images, chunk)]
    _load_sources()  # before the fork: seconds of scikit-image loading paid once, the photos shared
    if workers <= 1 or len(jobs) == 1:
        for job in jobs:
            _write_range(job)
    else:
        # fork: the writers need PIL and numpy only; spawn would re-import this process's torch in each of them.
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            for _ in pool.imap_unordered(_write_range, jobs):
                pass
    return time.perf_counter() - t0


def bench_corpus(ctx: Context, num_images: int | None = None, formats: bool = False) -> Path:
    """``num_images`` real-photo images (default ``ctx.sizes.corpus_images``), or the ``--corpus`` folder as it is.

    Args:
        ctx: the run context (sizes, work directory).
        num_images: how many.
        formats: mixed formats like a scraped corpus (PNG, WebP, greyscale JPEG; for the shards suite).
    """
    if ctx.corpus_dir is not None:
        return ctx.corpus_dir
    s = ctx.sizes
    n = num_images or s.corpus_images
    out = ctx.work_dir / f"corpus-{n}-{s.short_side[0]}-{s.short_side[1]}{'-mixed' if formats else ''}"
    stamp = out.with_name(out.name + ".complete")  # beside, not inside: the builder would count it as an input
    if not stamp.exists():
        seconds = write_photo_corpus(out, n, seed=0, short_side=s.short_side, formats=formats)
        stamp.write_text(json.dumps({"images": n, "formats": formats, "build_s": seconds}))
    return out


def bench_shards(ctx: Context) -> Path:
    """Shards of :func:`bench_corpus` written by the real builder at their own size; returns the shard directory.

    ``short_side=0`` keeps the ~500 x 375 photos as they are (the builder's default 256 would shrink them), so
    the loaders decode ImageNet-sized JPEGs. The build time is recorded in ``build.json`` beside the manifest.
    """
    from shards.build import BuildOptions, build_shards

    if ctx.shard_dir is not None:
        return ctx.shard_dir
    corpus = bench_corpus(ctx)
    out = ctx.work_dir / f"shards-{corpus.name}-{ctx.sizes.images_per_shard}"
    if not (out / "manifest.json").exists():
        t0 = time.perf_counter()
        build_shards([str(corpus)], out, BuildOptions(samples_per_shard=ctx.sizes.images_per_shard, short_side=0,
                                                      progress=False))
        stamp = corpus.with_name(corpus.name + ".complete")
        corpus_s = json.loads(stamp.read_text()).get("build_s") if stamp.exists() else None
        (out / "build.json").write_text(json.dumps({"corpus_s": corpus_s, "shards_s": time.perf_counter() - t0}))
    ctx.shard_dir = out
    return out
