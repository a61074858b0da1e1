"""convert_image against plain Pillow references on real photos, and every crafted bad file's fate."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shards.convert import Converted, ConvertOptions, Rejected, convert_image
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
