"""Shards suite: ingest images/s per core of the real shards builder against a naive PIL loop, same images, and
per-image conversion on ~500x375 and 2000x1500 photos with its PSNR (benchmarks/shards_convert.py).

The corpus is real photos in mixed formats (JPEG, PNG, WebP, greyscale; benchmarks/data.py). Both sides produce
the same shard-ready output: 8-bit RGB, shorter side at most 256, JPEG quality 90.

- builder: ``shards.build.build_shards`` (decode, validate, EXIF/colour fixes, dedup hash, draft-mode JPEG
  decoding, resize, re-encode, tar + DALI index + manifest), with 1 worker and with every core;
- naive baseline: one process, per image ``Image.open(path).convert("RGB")``, resize, ``save(jpg)``.

Per core = images/s divided by the worker processes used. Each repeat writes into a fresh directory (the
builder would otherwise resume and skip the finished work). The builder runs in a light child process as
``python -m shards build`` would (benchmarks/ingest_timer.py); its time is measured inside that process, around
``build_shards`` (listing, pool start-up, conversion, writing), so interpreter start-up is not counted. The
``--profile`` flag does not reach into that child; only the naive loop is profiled.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from benchmarks.context import Context
from benchmarks.data import bench_corpus
from benchmarks.report import Column, SuiteResult
from benchmarks.shards_convert import add_conversion_rows, conversion_markdown
from benchmarks.timing import Stats
from shards.sources import IMAGE_SUFFIXES

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    Column("images_per_s", "images/s", "{:,.1f}"),
    Column("images_per_s_per_core", "images/s per core", "{:,.1f}"),
    Column("workers", "workers", "{:d}"),
    Column("images_per_cpu_s", "images per CPU s", "{:,.1f}"),
    Column("psnr_db", "PSNR dB vs Lanczos", "{:.1f}"),
    Column("psnr_area_db", "PSNR dB vs area", "{:.1f}"),
]
SHORT_SIDE, QUALITY = 256, 90


def naive_ingest(paths: list[Path], out_dir: Path) -> int:
    """The baseline: open, convert to RGB, shrink to the shorter side 256, save as JPEG; one file per image."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        scale = SHORT_SIDE / min(w, h)
        if scale < 1:
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        image.save(out_dir / f"{i:09d}.jpg", quality=QUALITY)
    return len(paths)


def _repeat(fn, repeats: int, scratch: Path) -> list[float]:
    """Seconds of each of ``repeats`` calls ``fn(out_dir)`` (which returns its own seconds or None), each into
    an empty directory."""
    times = []
    for r in range(repeats):
        out = scratch / f"r{r}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        own = fn(out)
        times.append(own if own is not None else time.perf_counter() - t0)
        shutil.rmtree(out, ignore_errors=True)
    return times


def timed_build(inputs: list[str], out: Path, workers: int, per_shard: int) -> float:
    """Seconds of one real build, run in a light child process (see benchmarks/ingest_timer.py)."""
    cmd = [sys.executable, "-m", "benchmarks.ingest_timer", str(out.resolve()), str(workers), str(SHORT_SIDE),
           str(QUALITY), str(per_shard), *[str(Path(i).resolve()) for i in inputs]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"shards build failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def run(ctx: Context) -> SuiteResult:
    s = ctx.sizes
    corpus = bench_corpus(ctx, num_images=s.ingest_images, formats=True)
    paths = sorted(p for p in corpus.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    n = len(paths)
    cores = ctx.machine.get("cpu_cores", 1)
    scratch = ctx.work_dir / "ingest-scratch"
    result = SuiteResult("shards", config={"images": n, "corpus": str(corpus), "short_side": SHORT_SIDE,
                                           "quality": QUALITY, "repeats": s.repeats, "cores": cores,
                                           "formats": sorted({p.suffix for p in paths})},
                         columns=COLUMNS, plot_metric="images_per_s_per_core")
    # Warm-up, untimed: page cache, Pillow's codecs and LittleCMS set-up, for both sides alike.
    naive_ingest(paths[:4], scratch / "warm")
    scratch.mkdir(parents=True, exist_ok=True)
    warm_list = scratch / "warm.txt"
    warm_list.write_text("\n".join(str(p.resolve()) for p in paths[:4]) + "\n")

    def add(name: str, group: str, workers: int, times: list[float], **params) -> None:
        rate = Stats.of([n / t for t in times])
        result.add(name, group, {"workers": workers, **params}, images_per_s=rate,
                   images_per_s_per_core=rate.scaled(1 / workers), workers=workers, seconds=Stats.of(times))

    with ctx.profiler("shards-naive"):
        add("naive PIL loop", "baseline", 1,
            _repeat(lambda out: naive_ingest(paths, out) and None, s.repeats, scratch))
    per_shard = max(n // 4, 1)
    for workers in sorted({1, cores}):
        timed_build([str(warm_list)], scratch / "warm-build", workers, per_shard)
        times = _repeat(lambda out, w=workers: timed_build([str(corpus)], out, w, per_shard), s.repeats, scratch)
        add(f"shards build workers={workers}", "builder", workers, times)
    result.compare("builder per core vs naive PIL loop (1 worker each)", "shards build workers=1", "naive PIL loop",
                   "images_per_s_per_core")
    if cores > 1:
        result.compare(f"builder on {cores} cores vs naive PIL loop (total images/s)", f"shards build workers={cores}",
                       "naive PIL loop", "images_per_s")
    shutil.rmtree(scratch, ignore_errors=True)
    add_conversion_rows(result, ctx, SHORT_SIDE, QUALITY)
    if n < 256:
        result.markdown_extra = (
            f"{n} images are about a second of work, so the builder's fixed costs set its figure: listing the inputs, "
            "writing tar, index and manifest, and with more than one worker starting its spawned process pool. Per "
            "image it also validates, fixes EXIF orientation and hashes the pixels, which the naive loop does not. "
            "The full suite times 512 images, where those fixed costs weigh less.")
    result.markdown_extra = "\n\n".join(filter(None, [result.markdown_extra, conversion_markdown(result)]))
    return result
