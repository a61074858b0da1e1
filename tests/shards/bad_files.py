"""Crafted problem files for the shard tests: what an uncurated corpus really holds, each with its expected fate."""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from shards.sample_corpus import sample_photos

# file name -> expected rejection reason (None: accepted).
EXPECTED = {
    "truncated.jpg": "decode_error", "random.jpg": "not_image", "notes.txt": "not_image", "empty.jpg": "empty",
    "one_by_one.png": "too_small", "bomb.png": "too_large", "banner.jpg": "bad_aspect", "loop.jpg": "unreadable",
    "cmyk.jpg": None, "gray16.png": None, "rgba.png": None, "animated.gif": None, "rotated.jpg": None,
    "dup.jpg": None,  # a byte copy of a photo: sorts first, so the photo's original is the duplicate
}


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height pixels, with a tiny IDAT: no large allocation to make it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def write_bad_files(folder: Path, duplicate_of: Path) -> dict[str, str | None]:
    """Write every file of EXPECTED into ``folder`` (plus a directory symlink back to the corpus root)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = sample_photos()["astronaut"]  # 512 x 512 real photo
    good = jpeg_bytes(photo)
    (folder / "truncated.jpg").write_bytes(good[: len(good) * 6 // 10])
    (folder / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (folder / "notes.txt").write_text("not an image\n")
    (folder / "empty.jpg").write_bytes(b"")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "one_by_one.png")
    (folder / "bomb.png").write_bytes(png_bomb(20000, 20000))
    photo.crop((0, 200, 512, 300)).resize((600, 100)).save(folder / "banner.jpg")
    os.symlink("loop.jpg", folder / "loop.jpg")  # points at itself: ELOOP
    os.symlink("..", folder / "up")  # a directory loop back to the corpus root
    photo.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    gray = np.asarray(photo.convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    Image.fromarray(gray.astype(np.uint16)).save(folder / "gray16.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.where(np.arange(512)[None, :] < 256, 0, 255).astype(np.uint8).repeat(512, 0)))
    rgba.save(folder / "rgba.png")  # left half fully transparent
    frames = [photo.resize((128, 128)), photo.rotate(90).resize((128, 128))]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    photo.resize((1200, 800)).save(folder / "rotated.jpg", quality=90, exif=exif.tobytes())
    shutil.copyfile(duplicate_of, folder / "dup.jpg")
    return dict(EXPECTED)
