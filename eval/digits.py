"""scikit-learn's handwritten digits as a small labelled set of real images: scattered on a canvas, split by class.

The 1797 digits (8 x 8 scans of handwriting, UCI "optdigits", shipped inside scikit-learn: no download) are drawn
once each, white on black, at a random scale (50-100 % of the canvas side) and a random position. Centred digits
leave no headroom for learning: a random-init network's features keep their pixel layout and already classify them
well; scattering takes that layout away, and RandomResizedCrop, MoCo's main augmentation, varies exactly scale and
position, so the invariance MoCo learns is the one this set needs. The demo pre-trains on the training split without
its labels and measures kNN top-1 on the held-out split; ``tests/eval/test_learning_signal.py`` does the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = 10
CLASS_NAMES = [f"digit{c}" for c in range(NUM_CLASSES)]


def scattered_digits(size: int = 16, seed: int = 0) -> tuple[list[Image.Image], np.ndarray]:
    """The digits, each at a random scale (50-100 % of the frame) and position on a black ``size`` px RGB canvas.

    Returns:
        1797 RGB images and their labels (0-9).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    images = []
    for pixels in digits.images:
        side = int(round(size * rng.uniform(0.5, 1.0)))
        digit = Image.fromarray((pixels * (255 / 16)).astype(np.uint8), "L").resize((side, side), Image.BILINEAR)
        canvas = Image.new("L", (size, size))
        canvas.paste(digit, (int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))))
        images.append(canvas.convert("RGB"))
    return images, digits.target.astype(int)


def held_out_split(labels: np.ndarray, val_per_class: int = 50) -> tuple[list[int], list[int]]:
    """(train, val) indices: val is the first ``val_per_class`` digits of each class, train the rest (disjoint)."""
    val = [int(i) for c in range(NUM_CLASSES) for i in np.flatnonzero(labels == c)[:val_per_class]]
    train = sorted(set(range(len(labels))) - set(val))
    return train, val


def write_digit_folders(root: str | Path, size: int = 16, seed: int = 0, val_per_class: int = 50) -> tuple[Path, Path]:
    """Write ``root/train/<digitN>/<index>.png`` and ``root/val/...`` (image-folder layout) and return both roots."""
    root = Path(root)
    images, labels = scattered_digits(size, seed)
    train, val = held_out_split(labels, val_per_class)
    for split, indices in (("train", train), ("val", val)):
        for i in indices:
            folder = root / split / CLASS_NAMES[labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            images[i].save(folder / f"{i:04d}.png")
    return root / "train", root / "val"
