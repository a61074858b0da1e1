"""A small embedded corpus of real photos for the demo and the tests (no download, no synthetic noise).

The photos are the samples that ship inside scikit-image and scikit-learn (astronaut, cat, coffee, rocket,
China palace, flower, ...). ``write_sample_corpus`` writes the originals in their own formats plus
deterministic random crops of them, re-scaled to ImageNet-like sizes, so a corpus of any size can be
made of real image content.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

# RGB photographs (natural images, not textures or charts), as (name, loader) pairs.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field", "retina")


def sample_photos() -> dict[str, Image.Image]:
    """The real RGB photos available offline, by name."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    photos: dict[str, Image.Image] = {}
    for name in _SKIMAGE_PHOTOS:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        array = loader()
        if isinstance(array, tuple):  # some loaders return (image, extra)
            array = array[0]
        photos[name] = Image.fromarray(np.asarray(array)).convert("RGB")
    for name, array in zip(("china", "flower"), load_sample_images().images):
        photos[name] = Image.fromarray(array).convert("RGB")
    return photos


def random_crop(photo: Image.Image, rng: random.Random, short_side: int) -> Image.Image:
    """A random crop covering 25-100% of the photo's area, resized so its shorter side is ``short_side``."""
    w, h = photo.size
    area = rng.uniform(0.25, 1.0) * w * h
    aspect = rng.uniform(3 / 4, 4 / 3)
    cw = min(w, max(16, int(round((area * aspect) ** 0.5))))
    ch = min(h, max(16, int(round((area / aspect) ** 0.5))))
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    crop = photo.crop((x, y, x + cw, y + ch))
    scale = short_side / min(cw, ch)
    return crop.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.BICUBIC)


def write_sample_corpus(out_dir: str | os.PathLike, num_images: int = 64, seed: int = 0,
                        short_side: tuple[int, int] = (160, 320), formats: bool = True) -> list[Path]:
    """Write ``num_images`` real-photo images into ``out_dir`` (nested in two sub-folders).

    Args:
        out_dir: destination directory (created).
        num_images: how many files to write.
        seed: the crops are a deterministic function of the seed.
        short_side: range of the shorter side of the crops, in pixels.
        formats: also write PNG, grayscale and WebP files (mixed formats like a real corpus); JPEG only if False.

    Returns:
        The written paths, in order.
    """
    out = Path(out_dir)
    rng = random.Random(seed)
    photos = list(sample_photos().items())
    paths: list[Path] = []
    for i in range(num_images):
        name, photo = photos[i % len(photos)]
        image = random_crop(photo, rng, rng.randint(*short_side))
        folder = out / ("indoor" if i % 2 else "outdoor")
        folder.mkdir(parents=True, exist_ok=True)
        kind = i % 10 if formats else 0
        if kind == 7:
            path = folder / f"{name}_{i:05d}.png"
            image.save(path)
        elif kind == 8:
            path = folder / f"{name}_{i:05d}_gray.jpg"
            image.convert("L").save(path, quality=90)
        elif kind == 9:
            path = folder / f"{name}_{i:05d}.webp"
            image.save(path, quality=90)
        else:
            path = folder / f"{name}_{i:05d}.jpg"
            image.save(path, quality=rng.randint(80, 95))
        paths.append(path)
    return paths
