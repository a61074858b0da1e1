"""Shards suite, conversion rows: ``convert_image`` images/s per core on ~500x375 and 2000x1500 photos against a
naive PIL loop measured in the same run, and the PSNR of each output against full-decode references.

Corpus, per size class: JPEGs made from the real photos that ship with scikit-image and scikit-learn
(``shards.sample_corpus``), never noise: a random crop of the class's aspect (4:3; every fourth image portrait)
covering 60-100% of the largest such crop, resized bicubic to the exact size (the 2000x1500 ones are enlarged
2-5x: the sample photos are at most 1411 px), recoloured (per-channel gain 0.8-1.2, gamma 0.8-1.25), with a faint
sensor-like grain (Gaussian, sigma 4 levels) added at the final size, saved at quality 85-95. The bytes stay in
memory: every side converts bytes to bytes, so file reads and writes are in none of the figures.

Rows, all in this process on one thread (images/s is images/s per core):

- naive PIL loop: ``Image.open(bytes).convert("RGB")``, shorter side to 256 with ``Image.BICUBIC``,
  ``save(JPEG, quality=90)``;
- convert_image simplejpeg+opencv: the builder's per-image work (header checks, EXIF, DCT-scaled decode, resize,
  pixel hash, encode) as its workers run it;
- convert_image pillow: the same with ``fast_jpeg=False``, the path taken where the optional wheels are missing.

They are timed in alternating rounds (round r converts the whole class once with every side), so the drift of a
shared machine hits all of them alike. Each round is timed on the wall clock (``images_per_s``) and in this
process's CPU time (``images_per_cpu_s``: what the work costs a core, whatever else the machine runs);
``extra["per_round_ratio"]`` gives each comparison's ratio within every round (paired, so its spread is the
machine's drift, not the gap between a fast and a slow round).

PSNR: each output decoded and compared with two references, full decodes resized to the same size and saved at
the same JPEG quality: by ``Image.LANCZOS`` (``psnr_db``) and by an area average in float (OpenCV's INTER_AREA on
float32, ``psnr_area_db``; None without OpenCV); over all pixels and channels, Stats over the images.
"""

from __future__ import annotations

import io
import random
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from benchmarks.context import Context
from benchmarks.report import SuiteResult
from benchmarks.timing import Stats
from shards.convert import ConvertOptions, conversion_path, convert_image, fast_codecs, set_opencv_threads

SIZE_CLASSES = {"~500x375": (500, 375), "2000x1500": (2000, 1500)}
COUNTS = {False: {"~500x375": 96, "2000x1500": 24}, True: {"~500x375": 24, "2000x1500": 6}}  # by --quick
REPEATS = {False: 7, True: 5}  # alternating rounds (by --quick); the figures are the median and min-max over them


def sized_photos(size: tuple[int, int], count: int, seed: int = 0) -> list[bytes]:
    """``count`` JPEGs of exactly ``size`` (every fourth one portrait) made from the sample photos (module docstring).

    Args:
        size: (width, height) of the landscape images.
        count: how many.
        seed: the images are a deterministic function of (seed, index).
    """
    from shards.sample_corpus import sample_photos  # needs scikit-image / scikit-learn

    photos = [photo for _, photo in sorted(sample_photos().items())]
    out = []
    for i in range(count):
        rng = random.Random(seed * 1_000_003 + i)
        photo = photos[i % len(photos)]
        w, h = size if i % 4 else size[::-1]
        scale = min(photo.width / w, photo.height / h) * rng.uniform(0.6, 1.0)
        cw, ch = max(1, round(w * scale)), max(1, round(h * scale))
        x, y = rng.randint(0, photo.width - cw), rng.randint(0, photo.height - ch)
        image = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BICUBIC)
        gamma, gains = rng.uniform(0.8, 1.25), [rng.uniform(0.8, 1.2) for _ in range(3)]
        image = image.point([min(255, round(255 * (v / 255) ** gamma * g)) for g in gains for v in range(256)])
        grain = np.random.default_rng(seed * 1_000_003 + i).standard_normal((h, w, 3), dtype=np.float32) * 4.0
        pixels = np.clip(np.asarray(image, dtype=np.float32) + grain + 0.5, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=rng.randint(85, 95))
        out.append(buf.getvalue())
    return out


def naive_convert(data: bytes, short_side: int, quality: int) -> bytes:
    """The baseline: open, convert to RGB, shrink the shorter side to ``short_side`` (bicubic), save as JPEG."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    scale = short_side / min(w, h)
    if scale < 1:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def reference_pixels(data: bytes, size: tuple[int, int], quality: int, area: bool = False) -> np.ndarray:
    """A quality reference: full decode, Lanczos (or a float area average) to ``size``, JPEG at ``quality``, decoded
    (H x W x 3 float64). ``area`` needs OpenCV."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if area:
        cv2 = fast_codecs()[1]
        averaged = cv2.resize(np.asarray(image, dtype=np.float32), size, interpolation=cv2.INTER_AREA)
        image = Image.fromarray(np.clip(averaged + 0.5, 0, 255).astype(np.uint8))
    else:
        image = image.resize(size, Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return _pixels(buf.getvalue())


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images in dB (inf when identical)."""
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def _pixels(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)


def add_conversion_rows(result: SuiteResult, ctx: Context, short_side: int, quality: int) -> None:
    """Measure and add the conversion rows and comparisons of every size class to ``result``."""
    try:
        corpora = {label: sized_photos(size, COUNTS[ctx.quick][label]) for label, size in SIZE_CLASSES.items()}
    except ImportError as exc:
        result.skip("conversion rows", f"the sample photos need scikit-image and scikit-learn ({exc})")
        return
    fast, pillow = ConvertOptions(short_side=short_side, quality=quality), ConvertOptions(
        short_side=short_side, quality=quality, fast_jpeg=False)
    sides: dict[str, Callable[[bytes], bytes]] = {
        "naive PIL loop": lambda data: naive_convert(data, short_side, quality),
        "convert_image pillow": lambda data: convert_image(data, pillow).jpeg,
    }
    if conversion_path(fast) == "simplejpeg+opencv":
        sides["convert_image simplejpeg+opencv"] = lambda data: convert_image(data, fast).jpeg
    else:
        result.skip("convert_image simplejpeg+opencv", "simplejpeg or opencv-python-headless is not importable")
    result.config["conversion"] = {
        "sizes": {label: {"size": list(SIZE_CLASSES[label]), "images": len(c)} for label, c in corpora.items()},
        "repeats": REPEATS[ctx.quick], "opencv_threads": 1, "codecs": _codec_versions(),
        "psnr_reference": f"full decode, PIL LANCZOS to the same size, JPEG quality {quality}; dB over all pixels",
        "psnr_area_reference": "the same with a float area average (OpenCV INTER_AREA on float32) for LANCZOS"}
    threads = set_opencv_threads(1)
    try:
        for label, corpus in corpora.items():
            _measure_class(result, ctx, label, corpus, sides, quality)
    finally:
        if threads:
            set_opencv_threads(threads)


def _measure_class(result: SuiteResult, ctx: Context, label: str, corpus: list[bytes],
                   sides: dict[str, Callable[[bytes], bytes]], quality: int) -> None:
    outputs = {name: [fn(data) for data in corpus] for name, fn in sides.items()}  # also the warm-up
    sizes = [Image.open(io.BytesIO(out)).size for out in outputs["naive PIL loop"]]
    references = [reference_pixels(data, size, quality) for data, size in zip(corpus, sizes)]
    areas = [reference_pixels(data, size, quality, area=True) for data, size in zip(corpus, sizes)] if (
        fast_codecs() is not None) else None
    wall: dict[str, list[float]] = {name: [] for name in sides}
    cpu: dict[str, list[float]] = {name: [] for name in sides}
    with ctx.profiler(f"shards-convert-{label}"):
        for _ in range(REPEATS[ctx.quick]):
            for name, fn in sides.items():  # alternating: round r times every side once
                t0, c0 = time.perf_counter(), time.process_time()
                for data in corpus:
                    fn(data)
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    for name, jpegs in outputs.items():
        decoded = [_pixels(j) for j in jpegs]
        quality_db = Stats.of([psnr_db(d, ref) for d, ref in zip(decoded, references)])
        area_db = Stats.of([psnr_db(d, ref) for d, ref in zip(decoded, areas)]) if areas else None
        rate = Stats.of([len(corpus) / t for t in wall[name]])
        group = "baseline" if name == "naive PIL loop" else "conversion"
        result.add(f"{name} {label}", group, {"size": label, "images": len(corpus), "workers": 1},
                   images_per_s=rate, images_per_s_per_core=rate, workers=1, psnr_db=quality_db, psnr_area_db=area_db,
                   images_per_cpu_s=Stats.of([len(corpus) / t for t in cpu[name]]), seconds=Stats.of(wall[name]))
    per_round = result.extra.setdefault("per_round_ratio", {})
    for name in sides:
        if name != "naive PIL loop":
            base = "naive PIL loop"
            comparison = f"{name} vs naive PIL loop, {label} (per core)"
            result.compare(comparison, f"{name} {label}", f"{base} {label}", "images_per_s_per_core")
            per_round[comparison] = Stats.of([b / a for a, b in zip(wall[name], wall[base])])
            comparison = f"{name} vs naive PIL loop, {label} (CPU time)"
            result.compare(comparison, f"{name} {label}", f"{base} {label}", "images_per_cpu_s")
            per_round[comparison] = Stats.of([b / a for a, b in zip(cpu[name], cpu[base])])


def conversion_markdown(result: SuiteResult) -> str:
    """What the conversion rows measure, and each comparison's ratio paired within rounds (for the suite's .md)."""
    per_round = result.extra.get("per_round_ratio", {})
    if not per_round:
        return ""
    ratios = "; ".join(f"{name.replace('(per core)', '(wall)')}: {r.median:.2f}x ({r.min:.2f}-{r.max:.2f})"
                       for name, r in per_round.items())
    return ("The rows with a size time `convert_image` alone (what a build worker does per image) on JPEG bytes in "
            "memory, one process on one thread, against the naive loop in alternating rounds; their PSNR compares "
            "each output with a full decode resized by Lanczos (or averaged over areas) and saved at the same JPEG "
            f"quality (median, min-max over the images). Ratio within each round, median (min-max): {ratios}.")


def _codec_versions() -> dict[str, str]:
    import PIL

    versions = {"pillow": PIL.__version__}
    codecs = fast_codecs()
    if codecs is not None:
        versions.update(simplejpeg=codecs[0].__version__, opencv=codecs[1].__version__)
    return versions
