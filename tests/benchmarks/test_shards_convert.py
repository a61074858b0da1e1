"""The shards suite's conversion rows on a tiny corpus: exact sizes from real photos, every side timed and compared
with the same-run naive loop, PSNR against the Lanczos reference in a plausible band, and the JSON reads back."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import benchmarks.shards_convert as shards_convert
from benchmarks.context import Context, Sizes
from benchmarks.report import Column, SuiteResult, load_report, report_json
from benchmarks.shards_convert import add_conversion_rows, conversion_markdown, naive_convert, psnr_db, sized_photos
from shards.convert import fast_codecs


def test_sized_photos_are_exact_deterministic_real_content():
    first, again = sized_photos((200, 150), 4, seed=3), sized_photos((200, 150), 4, seed=3)
    assert first == again and len(set(first)) == 4
    sizes = [Image.open(io.BytesIO(b)).size for b in first]
    assert sizes == [(150, 200), (200, 150), (200, 150), (200, 150)]  # every fourth portrait
    pixels = np.asarray(Image.open(io.BytesIO(first[1])), dtype=np.float64)
    assert pixels.std() > 10  # a photo, not a flat field
    out = Image.open(io.BytesIO(naive_convert(first[1], 100, 90)))
    assert out.size == (133, 100) and out.mode == "RGB"


def test_psnr_db_against_a_plain_formula():
    a = np.zeros((4, 4, 3))
    assert psnr_db(a, a + 1.0) == pytest.approx(20 * np.log10(255.0))
    assert psnr_db(a, a) == float("inf")


def test_conversion_rows_on_a_tiny_corpus(tmp_path, monkeypatch):
    monkeypatch.setattr(shards_convert, "SIZE_CLASSES", {"~500x375": (500, 375), "2000x1500": (1000, 750)})
    monkeypatch.setattr(shards_convert, "COUNTS", {True: {"~500x375": 2, "2000x1500": 1}})
    monkeypatch.setattr(shards_convert, "REPEATS", {True: 2})
    ctx = Context(out_dir=tmp_path, quick=True, device=torch.device("cpu"), sizes=Sizes.quick(1))
    result = SuiteResult("shards", config={}, columns=[Column("images_per_s_per_core", "images/s per core")],
                         plot_metric="images_per_s_per_core")
    add_conversion_rows(result, ctx, short_side=256, quality=90)
    sides = ["naive PIL loop", "convert_image pillow"] + (["convert_image simplejpeg+opencv"] if fast_codecs() else [])
    assert [r.name for r in result.rows] == [f"{s} {c}" for c in ("~500x375", "2000x1500") for s in sides]
    assert len(result.comparisons) == 4 * (len(sides) - 1) == len(result.extra["per_round_ratio"])  # wall, CPU
    for comp in result.comparisons:
        paired = result.extra["per_round_ratio"][comp["name"]]
        assert paired.n == 2 and paired.min <= paired.max
    assert "Ratio within each round" in conversion_markdown(result)
    for row in result.rows:
        assert row.metrics["images_per_s"].n == row.metrics["images_per_cpu_s"].n == 2 and row.metrics["workers"] == 1
        assert 30 < row.metrics["psnr_db"].min and row.metrics["psnr_db"].max < 60, row
        area = row.metrics["psnr_area_db"]
        assert area is None if fast_codecs() is None else 30 < area.min and area.max < 60, row
    back = load_report(json.loads(json.dumps(report_json(result, {"cpu_cores": 1}, ["run"], True))))
    assert back.config["conversion"]["psnr_reference"].startswith("full decode")
