"""convert_image against plain Pillow references on real photos, and every crafted bad file's fate."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from shards.convert import (
    Converted,
    ConvertOptions,
    Rejected,
    conversion_path,
    convert_image,
    fast_codecs,
    set_opencv_threads,
)
from shards.sample_corpus import sample_photos
from tests.shards.bad_files import EXPECTED, jpeg_bytes, write_bad_files


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return sample_photos()["chelsea"]  # 451 x 300 real photo


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, photo):
    folder = tmp_path_factory.mktemp("bad")
    src = folder / "source.jpg"
    photo.save(src, quality=90)
    write_bad_files(folder / "bad", src)
    return folder / "bad"


def _decode(c: Converted) -> np.ndarray:
    image = Image.open(io.BytesIO(c.jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("short_side", [64, 128, 256])
@pytest.mark.parametrize("scale", [1, 4])
def test_draft_resize_matches_full_decode(photo, short_side, scale):
    """DCT-domain downscaling gives the same picture as a plain full decode + resize (within JPEG noise)."""
    big = photo.resize((photo.width * scale, photo.height * scale), Image.BICUBIC)
    data = jpeg_bytes(big)
    out = convert_image(data, ConvertOptions(short_side=short_side))
    assert isinstance(out, Converted)
    want_w = round(big.width * short_side / big.height)
    assert (out.width, out.height) == (want_w, short_side)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((want_w, short_side), Image.BICUBIC)
    err = np.abs(_decode(out) - np.asarray(reference, dtype=np.float64)).mean()
    assert err < 6.0, err  # mean abs error in 0..255; a wrong resize or colour swap gives > 20


def test_never_upscales_and_zero_keeps_size(photo):
    data = jpeg_bytes(photo)
    for short_side in (0, 300, 1000):
        out = convert_image(data, ConvertOptions(short_side=short_side))
        assert (out.width, out.height) == photo.size


def test_same_pixels_same_hash_whatever_the_container(photo):
    """A PNG and its lossless copy with other metadata are one duplicate; a different photo is not."""
    a, b = io.BytesIO(), io.BytesIO()
    photo.save(a, "PNG")
    photo.save(b, "PNG", compress_level=1, pnginfo=None, dpi=(300, 300))
    assert a.getvalue() != b.getvalue()
    opts = ConvertOptions()
    assert convert_image(a.getvalue(), opts).hash == convert_image(b.getvalue(), opts).hash
    other = jpeg_bytes(sample_photos()["coffee"])
    assert convert_image(other, opts).hash != convert_image(a.getvalue(), opts).hash


def test_bad_files_each_get_their_reason(bad_dir):
    for name, reason in EXPECTED.items():
        try:
            data = (bad_dir / name).read_bytes()
        except OSError:
            assert reason == "unreadable", name  # the symlink loop: the build reports it as unreadable
            continue
        out = convert_image(data, ConvertOptions())
        got = out.reason if isinstance(out, Rejected) else None
        assert got == reason, (name, out if isinstance(out, Rejected) else "accepted")


def test_colour_conversions(bad_dir):
    """CMYK -> sRGB, 16-bit grey -> top 8 bits, transparency -> white, EXIF orientation applied, GIF frame 0."""
    astronaut = sample_photos()["astronaut"]
    ref = np.asarray(astronaut.resize((256, 256), Image.BICUBIC), dtype=np.float64)
    opts = ConvertOptions()
    cmyk = convert_image((bad_dir / "cmyk.jpg").read_bytes(), opts)
    assert cmyk.mode == "CMYK" and np.abs(_decode(cmyk) - ref).mean() < 12

    gray = convert_image((bad_dir / "gray16.png").read_bytes(), opts)
    want = np.asarray(astronaut.convert("L").resize((256, 256), Image.BICUBIC), dtype=np.float64)
    got = _decode(gray)
    assert gray.mode.startswith("I") and np.abs(got.mean(axis=2) - want).mean() < 4  # not clipped to white

    rgba = _decode(convert_image((bad_dir / "rgba.png").read_bytes(), opts))
    assert rgba[:, :120].min() > 240  # transparent half composited on white
    assert np.abs(rgba[:, 136:] - ref[:, 136:]).mean() < 6

    rotated = convert_image((bad_dir / "rotated.jpg").read_bytes(), opts)
    assert (rotated.orig_width, rotated.orig_height) == (1200, 800)
    assert (rotated.width, rotated.height) == (256, 384)  # orientation 6: displayed portrait

    gif = convert_image((bad_dir / "animated.gif").read_bytes(), opts)
    assert gif.frames == 2 and (gif.width, gif.height) == (128, 128)
    first = np.asarray(astronaut.resize((128, 128)), dtype=np.float64)
    assert np.abs(_decode(gif) - first).mean() < 20  # the first frame (the second is rotated: error ~60)


def test_limits_are_checked_on_the_header():
    """A 20000 x 20000 header is rejected without decoding; the limits are configurable."""
    from tests.shards.bad_files import png_bomb

    out = convert_image(png_bomb(20000, 20000), ConvertOptions())
    assert isinstance(out, Rejected) and out.reason == "too_large"
    small = jpeg_bytes(Image.new("RGB", (40, 40), (10, 200, 30)))
    assert convert_image(small, ConvertOptions(min_side=64)).reason == "too_small"
    assert isinstance(convert_image(small, ConvertOptions(min_side=32)), Converted)
    wide = jpeg_bytes(Image.new("RGB", (300, 60)))
    assert convert_image(wide, ConvertOptions(max_aspect=4)).reason == "bad_aspect"
    assert isinstance(convert_image(wide, ConvertOptions(max_aspect=6)), Converted)


# ----------------------------------------------------------------------------- the simplejpeg + OpenCV JPEG path

fast_only = pytest.mark.skipif(fast_codecs() is None, reason="simplejpeg / opencv-python-headless not installed")
PIL_PATH = ConvertOptions(fast_jpeg=False)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a - b) ** 2)))


@fast_only
@pytest.mark.parametrize("name", ["coffee", "china", "retina"])  # 600x400 (x1.56), most detail, 1411x1411 (x5.5)
def test_fast_path_psnr_against_full_decode_lanczos(name):
    """Both paths against a plain reference: full decode, Lanczos to the same size, JPEG at the same quality.

    A wrong channel order scores ~8-19 dB, nearest neighbour 21-32 dB, bilinear without a low-pass 30 dB on china.
    """
    data = jpeg_bytes(sample_photos()[name])
    fast, pil = convert_image(data, ConvertOptions()), convert_image(data, PIL_PATH)
    assert (fast.width, fast.height) == (pil.width, pil.height)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((fast.width, fast.height), Image.LANCZOS)
    want = np.asarray(Image.open(io.BytesIO(jpeg_bytes(reference))), dtype=np.float64)
    fast_db, pil_db = _psnr(_decode(fast), want), _psnr(_decode(pil), want)
    assert fast_db > 34.0 and fast_db > pil_db - 2.0, (fast_db, pil_db)


@fast_only
@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("grey", [False, True])
def test_fast_path_same_pixels_as_pillow_where_nothing_is_resampled(photo, orientation, grey):
    """No resize, or an exact 1/2 DCT scale: libjpeg-turbo gives both paths the same pixels, so the same hash,
    whatever the EXIF orientation (each of the 8 applied the same way)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    source = photo.crop((0, 0, 300, 200))
    for short_side, image in ((0, source), (100, source.resize((400, 200)))):  # 400x200 -> 200x100 at 1/2
        data = jpeg_bytes(image.convert("L") if grey else image, exif=exif.tobytes())
        opts = ConvertOptions(short_side=short_side, min_side=16)
        fast, pil = convert_image(data, opts), convert_image(data, replace(opts, fast_jpeg=False))
        assert isinstance(fast, Converted) and fast.mode == ("L" if grey else "RGB")
        assert (fast.width, fast.height, fast.hash) == (pil.width, pil.height, pil.hash), (short_side, orientation)
        assert _decode(fast).shape == (fast.height, fast.width, 3)



@fast_only
def test_fast_path_pixels_do_not_depend_on_opencv_simd(photo):
    """OpenCV's plain code gives the pixels its SIMD code gives, so machines with other CPUs hash alike (float
    weights or INTER_CUBIC would differ here)."""
    cv2 = fast_codecs()[1]
    images = [jpeg_bytes(photo.resize(size, Image.BICUBIC)) for size in ((451, 300), (700, 467), (1200, 800))]
    options = [ConvertOptions(short_side=side) for side in (256, 200, 90)]  # factors 1.1 to 1.9 after DCT scaling
    want = [convert_image(data, opts).hash for data in images for opts in options]
    previous = cv2.useOptimized()
    cv2.setUseOptimized(False)
    try:
        got = [convert_image(data, opts).hash for data in images for opts in options]
    finally:
        cv2.setUseOptimized(previous)
    assert got == want

@fast_only
def test_fast_path_hands_what_libjpeg_turbo_warns_about_to_pillow(photo):
    """Stray bytes before the scan: libjpeg-turbo warns (strict: refuses), Pillow decodes; the result is the Pillow
    path's. A truncated JPEG stays a decode_error (test_bad_files_each_get_their_reason)."""
    data = jpeg_bytes(photo)
    scan = data.index(b"\xff\xda")
    damaged = data[:scan] + b"\x00\x00" + data[scan:]
    out = convert_image(damaged, ConvertOptions())
    assert isinstance(out, Converted) and out.hash == convert_image(damaged, PIL_PATH).hash
    assert out.hash != convert_image(data, ConvertOptions()).hash  # the fast path did run on the clean file


def test_without_simplejpeg_or_opencv_every_image_takes_the_pillow_path(photo, monkeypatch):
    import shards.convert

    data = jpeg_bytes(photo)
    want = convert_image(data, PIL_PATH)
    assert conversion_path(PIL_PATH) == "pillow"
    monkeypatch.setattr(shards.convert, "fast_codecs", lambda: None)
    assert conversion_path(ConvertOptions()) == "pillow" and set_opencv_threads(1) == 0
    assert convert_image(data, ConvertOptions()) == want
