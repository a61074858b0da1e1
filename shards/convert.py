"""Decode one untrusted image, validate it, normalise it to 8-bit RGB and re-encode it as a clean JPEG.

Every image is decoded fully with Pillow (libjpeg-turbo, libpng, libwebp, libtiff) and always re-encoded, so
what lands in a shard is a baseline JPEG written by libjpeg-turbo from clean pixels: DALI never sees the
original bytes, whatever quirks they had. Choices (all documented in the README):

* Limits are checked on the header before any pixel is decoded: minimum side, maximum area (decompression
  bombs; Pillow's own ``MAX_IMAGE_PIXELS`` guard is raised to our limit and its warning made an error),
  maximum aspect ratio.
* Large JPEGs are decoded with ``Image.draft``: libjpeg scales by 1/2, 1/4 or 1/8 in the DCT domain, so a
  4000x3000 photo headed for a 256 short side is never fully decoded.
* EXIF orientation is applied; metadata (EXIF, ICC) is not copied to the output.
* Colour: CMYK with an embedded ICC profile goes through LittleCMS to sRGB (plain inversion otherwise);
  16-bit grey keeps its top 8 bits; palette / RGBA / LA images are composited on a WHITE background
  (transparent regions are usually "paper" in web graphics; black would add fake dark borders).
* Animated images (GIF, APNG, WebP) keep their FIRST frame, recorded as ``frames`` in the metadata.
* The content hash is blake2b-128 of the final RGB pixels and their size, so the same picture saved twice
  (different metadata, a PNG and its lossless copy) is one duplicate, and the hash matches the shard bytes.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, UnidentifiedImageError

# Rejection reasons, in the order they are checked (the per-reason counts in stats files use these names).
REASONS = ("unreadable", "empty", "not_image", "decode_error", "too_small", "too_large", "bad_aspect",
           "unlabelled", "duplicate")

_ORIENT = {2: (Image.Transpose.FLIP_LEFT_RIGHT,), 3: (Image.Transpose.ROTATE_180,),
           4: (Image.Transpose.FLIP_TOP_BOTTOM,), 5: (Image.Transpose.TRANSPOSE,), 6: (Image.Transpose.ROTATE_270,),
           7: (Image.Transpose.TRANSVERSE,), 8: (Image.Transpose.ROTATE_90,)}
_SRGB = None


@dataclass(frozen=True)
class ConvertOptions:
    """What an accepted image must satisfy and how it is written.

    Args:
        short_side: resize so the shorter side is at most this (never upscale); 0 keeps the size.
        min_side: reject images whose shorter side is below this (thumbnails, tracking pixels).
        max_pixels: reject images with more pixels than this (decompression bombs, giant scans).
        max_aspect: reject images whose long/short side ratio exceeds this (banners, strips).
        quality: JPEG quality of the re-encoded output.
    """

    short_side: int = 256
    min_side: int = 32
    max_pixels: int = 100_000_000
    max_aspect: float = 4.0
    quality: int = 90


@dataclass(frozen=True)
class Converted:
    """An accepted image: the JPEG bytes and what the metadata records about it."""

    jpeg: bytes
    width: int  # output size, after orientation and resize
    height: int
    orig_width: int  # stored size, before orientation
    orig_height: int
    format: str
    mode: str
    frames: int
    hash: str  # blake2b-128 hex of the output RGB pixels and size


@dataclass(frozen=True)
class Rejected:
    """A rejected input: one of REASONS and a short human-readable detail."""

    reason: str
    detail: str


def configure_pillow(options: ConvertOptions) -> None:
    """Set Pillow's process-wide guards deliberately (call once per worker process).

    Pillow warns above ``MAX_IMAGE_PIXELS`` and raises above twice that. We check the area ourselves on the
    header, so align Pillow's limit with ours and turn its warning into an error: no image larger than
    ``max_pixels`` is ever decoded, even through a code path that skips our check (e.g. a GIF frame).
    Truncated files stay errors (``LOAD_TRUNCATED_IMAGES`` False): a half-grey photo is not a sample.
    """
    from PIL import ImageFile

    Image.MAX_IMAGE_PIXELS = options.max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def convert_image(data: bytes, options: ConvertOptions) -> Converted | Rejected:
    """Validate and convert one encoded image; never raises for bad input.

    Args:
        data: the file's bytes.
        options: limits and output settings.

    Returns:
        ``Converted`` with the JPEG bytes, or ``Rejected`` with the reason.
    """
    if not data:
        return Rejected("empty", "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Rejected("too_large", _one_line(exc))
    except UnidentifiedImageError:
        return Rejected("not_image", "not a recognised image format")
    except Exception as exc:  # noqa: BLE001 - any parser failure on untrusted bytes is a decode error
        return Rejected("decode_error", _one_line(exc))
    # No context manager: the bytes are in memory, and closing would invalidate the pixels we return.
    w, h = image.size
    fmt, mode = image.format or "?", image.mode
    if min(w, h) < options.min_side:
        return Rejected("too_small", f"{w}x{h} has a side below {options.min_side}")
    if w * h > options.max_pixels:
        return Rejected("too_large", f"{w}x{h} exceeds {options.max_pixels} pixels")
    if max(w, h) > options.max_aspect * min(w, h):
        return Rejected("bad_aspect", f"{w}x{h} aspect above {options.max_aspect:g}")
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block does not make the pixels bad
        orientation = 1
    target = _target_size(w, h, options.short_side)
    try:
        frames = getattr(image, "n_frames", 1)  # scans a GIF's frames: can hit corrupt data
        if fmt == "JPEG" and target != (w, h):
            image.draft(image.mode, target)  # DCT-domain downscale to the smallest scale >= target
        image.seek(0)
        image.load()
        rgb = _to_rgb(image)
        if rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return Rejected("too_large", _one_line(exc))
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt data, whatever the decoder raises
        return Rejected("decode_error", _one_line(exc))
    for op in _ORIENT.get(orientation, ()):
        rgb = rgb.transpose(op)
    pixels = rgb.tobytes()
    digest = hashlib.blake2b(pixels, digest_size=16)
    digest.update(f"{rgb.width}x{rgb.height}".encode())
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=options.quality, optimize=False, progressive=False)
    return Converted(jpeg=out.getvalue(), width=rgb.width, height=rgb.height, orig_width=w, orig_height=h,
                     format=fmt, mode=mode, frames=frames, hash=digest.hexdigest())


def _target_size(w: int, h: int, short_side: int) -> tuple[int, int]:
    """Size with the shorter side at most ``short_side``, aspect kept, never upscaled."""
    if short_side <= 0 or min(w, h) <= short_side:
        return w, h
    scale = short_side / min(w, h)
    if w <= h:
        return short_side, max(1, round(h * scale))
    return max(1, round(w * scale)), short_side


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode (see the module docstring for the choices)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit grey (PNG / TIFF) arrives as I;16 or I; keep the top 8 bits of the 16-bit range.
        array = np.asarray(image, dtype=np.int64)
        return Image.fromarray((np.clip(array, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if array.max(initial=0.0) <= 1.0 else 1.0  # float images in [0, 1] or [0, 255]
        return Image.fromarray(np.clip(array * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info) or (
            mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """CMYK to sRGB through the embedded ICC profile when there is one, plain conversion otherwise."""
    global _SRGB
    icc = image.info.get("icc_profile")
    if icc:
        try:
            if _SRGB is None:
                _SRGB = ImageCms.createProfile("sRGB")
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            return ImageCms.profileToProfile(image, source, _SRGB, outputMode="RGB")
        except Exception:  # noqa: BLE001 - a broken profile falls back to the plain conversion
            pass
    return image.convert("RGB")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]
