"""The MoCo augmentation recipes as data, shared by every backend so that they cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Recipe:
    """One two-view augmentation recipe; each view is drawn independently from it.

    Order of operations (as in the MoCo code): random resized crop -> [grayscale if ``grayscale_first``]
    -> colour jitter (with probability ``jitter_p``) -> [grayscale] -> Gaussian blur (with probability
    ``blur_p``) -> horizontal flip -> normalise with ``mean``/``std``.

    Attributes:
        name: "v1" or "v2".
        crop_scale: RandomResizedCrop area fraction range (0.2-1 in both papers; torchvision default is 0.08).
        crop_ratio: RandomResizedCrop aspect ratio range (width / height).
        brightness, contrast, saturation: ColorJitter strengths s; the factor is drawn from U[1-s, 1+s].
        hue: ColorJitter hue strength h; the shift is drawn from U[-h, h] of a full turn (0.1 = 36 degrees).
        jitter_p: probability of applying the colour jitter at all (v2: RandomApply p=0.8).
        grayscale_p: probability of converting to 3-channel grayscale (ITU-R 601 luma).
        grayscale_first: grayscale before the jitter (v1 order) rather than after it (v2 order).
        blur_p: probability of a Gaussian blur (0 disables it).
        blur_sigma: blur sigma range in output pixels, drawn uniformly.
        flip_p: probability of a horizontal flip.
        mean, std: per-channel normalisation on the [0, 1] scale.
    """

    name: str
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    grayscale_first: bool = False
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


# MoCo v1 (He et al. 2019, Sec. 4 / main_moco.py): crop, grayscale p=0.2, ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip.
MOCO_V1 = Recipe(name="v1", hue=0.4, jitter_p=1.0, grayscale_first=True, blur_p=0.0)

# MoCo v2 "aug+" (Chen et al. 2020, Sec. 2): crop, ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2,
# Gaussian blur sigma U[0.1, 2.0] with p=0.5, flip.
MOCO_V2 = Recipe(name="v2")

RECIPES: dict[str, Recipe] = {"v1": MOCO_V1, "v2": MOCO_V2}
