"""DALI-CPU and PyTorch backends draw views from the same distribution (same recipe, same shards).

Tolerances are statistical, not tuned: each statistic is compared with a two-sample z-test at 4 standard
errors (a false alarm about once in 16,000 runs), the standard errors measured from the views themselves
(per-view mean and std) or binomial (shares). Known implementation differences - DALI's hue rotates in
YIQ where torchvision's rotates in HSV, torchvision clamps between jitter steps in a random order - shift
the per-view means by far less than one standard error at these sample sizes.
"""

import dataclasses

import pytest
import torch
from PIL import Image

from pipeline import RECIPES
from tests.pipeline.helpers import is_gray, jpeg, make_cfg, take, to_pixels, write_shards


def _views(cfg, batches):
    got, loader = take(cfg, batches)
    return torch.cat([torch.cat(pair) for pair in got]), loader.recipe


def _z_close(a: torch.Tensor, b: torch.Tensor, z: float = 4.0) -> tuple[bool, str]:
    se = (a.var() / len(a) + b.var() / len(b)).sqrt()
    diff = (a.mean() - b.mean()).abs()
    return bool(diff <= z * se), f"{a.mean():.4f} vs {b.mean():.4f} (|diff| {diff:.4f}, 4 SE {z * se:.4f})"


@pytest.mark.slow
def test_v2_view_statistics_agree(shard_dir):
    stats = {}
    for backend in ("dali", "pytorch"):
        views, recipe = _views(make_cfg(shard_dir, backend, batch_size=16, recipe="v2"), 6)  # 192 views
        stats[backend] = {
            "mean": views.mean((1, 2, 3)), "std": views.std((1, 2, 3)),
            "gray": is_gray(to_pixels(views, recipe)).float(),
        }
    for name in ("mean", "std", "gray"):
        ok, msg = _z_close(stats["dali"][name], stats["pytorch"][name])
        assert ok, f"{name}: {msg}"
    # Grayscale share: p = 0.2 plus the corpus's own gray photos, the same for both backends.
    assert 0.1 < stats["dali"]["gray"].mean() < 0.45


@pytest.mark.slow
def test_flip_share_agrees(photo_dir, tmp_path, monkeypatch):
    # One real photo with its right half blacked out: a flipped view has its dark half on the left.
    photo = Image.open(sorted(photo_dir.rglob("*.jpg"))[0]).convert("RGB")
    w, h = photo.size
    photo.paste((0, 0, 0), (w // 2, 0, w, h))
    write_shards(tmp_path, [jpeg(photo)] * 48, per_shard=16)
    flip_only = dataclasses.replace(RECIPES["v2"], crop_scale=(0.9, 1.0), jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    monkeypatch.setitem(RECIPES, "v2", flip_only)
    shares = {}
    for backend in ("dali", "pytorch"):
        views, _ = _views(make_cfg(tmp_path, backend, batch_size=16), 12)  # 384 views
        left, right = views[..., : views.shape[-1] // 2].mean((1, 2, 3)), views[..., views.shape[-1] // 2:].mean((1, 2, 3))
        assert ((left - right).abs() > 0.5).all()  # every view is clearly one way or the other
        shares[backend] = (left < right).float()
    for backend, flipped in shares.items():
        assert abs(flipped.mean() - 0.5) < 4 * (0.25 / len(flipped)) ** 0.5, backend
    ok, msg = _z_close(shares["dali"], shares["pytorch"])
    assert ok, msg
