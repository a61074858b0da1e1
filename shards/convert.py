"""Decode one untrusted image, validate it, normalise it to 8-bit RGB and re-encode it as a clean JPEG.

Every image is decoded (Pillow: libjpeg-turbo, libpng, libwebp, libtiff; simplejpeg: libjpeg-turbo) and always
re-encoded, so what lands in a shard is a baseline JPEG written by libjpeg-turbo from clean pixels: DALI never
sees the original bytes, whatever quirks they had. Choices (all documented in the README):

* Limits are checked on the header before any pixel is decoded: minimum side, maximum area (decompression
  bombs; Pillow's own ``MAX_IMAGE_PIXELS`` guard is raised to our limit and its warning made an error),
  maximum aspect ratio.
* Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale in the DCT domain, the largest that stays at or above the
  target size, so a 4000x3000 photo headed for a 256 short side is never fully decoded.
* Fast path: 8-bit RGB and greyscale JPEGs go through simplejpeg (libjpeg-turbo: decode, DCT scaling, encode)
  and an OpenCV resize, bit-exact across CPUs like the Pillow path and about 1.8x its speed on ImageNet-size
  photos (README "Shards" has the figures and the PSNR against full-decode references). Everything else (CMYK,
  PNG, WebP, GIF, TIFF, MPO) and any JPEG libjpeg-turbo refuses or warns about takes the Pillow path below,
  which then decides accept or reject, so the rejection reasons are the Pillow path's. Both packages are
  optional: without them every image takes the Pillow path, and :func:`conversion_path` (recorded in stats and
  manifest) says which ran.
* EXIF orientation is applied; metadata (EXIF, ICC) is not copied to the output.
* Colour: CMYK with an embedded ICC profile goes through LittleCMS to sRGB (plain inversion otherwise);
  16-bit grey keeps its top 8 bits; palette / RGBA / LA images are composited on a WHITE background
  (transparent regions are usually "paper" in web graphics; black would add fake dark borders).
* Animated images (GIF, APNG, WebP) keep their FIRST frame, recorded as ``frames`` in the metadata.
* The content hash is blake2b-128 of the final RGB pixels and their size, so the same picture saved twice
  (different metadata, a PNG and its lossless copy) is one duplicate, and the hash matches the shard bytes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from types import ModuleType

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
        fast_jpeg: take the simplejpeg + OpenCV path for RGB and greyscale JPEGs when both are importable
            (False: Pillow for every image, as before that path existed).
    """

    short_side: int = 256
    min_side: int = 32
    max_pixels: int = 100_000_000
    max_aspect: float = 4.0
    quality: int = 90
    fast_jpeg: bool = True


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


@functools.cache
def fast_codecs() -> tuple[ModuleType, ModuleType] | None:
    """``(simplejpeg, cv2)`` when both import, else None (imported on first use: ~20 ms that --help never pays)."""
    try:
        import cv2
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg, cv2


def conversion_path(options: ConvertOptions) -> str:
    """Which code converts JPEGs: ``"simplejpeg+opencv"`` or ``"pillow"`` (recorded with the build's options)."""
    return "simplejpeg+opencv" if options.fast_jpeg and fast_codecs() is not None else "pillow"


def set_opencv_threads(count: int) -> int:
    """Set OpenCV's thread count for this process and return the previous one (0 without OpenCV).

    Workers call it with 1: the build already runs one process per core, and OpenCV's own threads would fight them
    for the same cores.
    """
    codecs = fast_codecs()
    if codecs is None:
        return 0
    previous = codecs[1].getNumThreads()
    codecs[1].setNumThreads(count)
    return previous


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
    if fmt == "JPEG" and mode in ("RGB", "L") and options.fast_jpeg and (codecs := fast_codecs()) is not None:
        pixels = _decode_resize_jpeg(codecs, data, mode, (w, h), target)
        if pixels is not None:
            pixels = _orient_array(pixels, orientation)
            out_h, out_w = pixels.shape[:2]
            # 4:2:0 as Pillow writes at this quality; baseline, not progressive.
            jpeg = codecs[0].encode_jpeg(pixels, quality=options.quality, colorspace="RGB", colorsubsampling="420")
            return Converted(jpeg=jpeg, width=out_w, height=out_h, orig_width=w, orig_height=h, format=fmt,
                             mode=mode, frames=1, hash=_pixel_hash(pixels, out_w, out_h))
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
    digest = _pixel_hash(rgb.tobytes(), rgb.width, rgb.height)
    out = io.BytesIO()
    rgb.save(out, "JPEG", quality=options.quality, optimize=False, progressive=False)
    return Converted(jpeg=out.getvalue(), width=rgb.width, height=rgb.height, orig_width=w, orig_height=h,
                     format=fmt, mode=mode, frames=frames, hash=digest)


def _pixel_hash(pixels, width: int, height: int) -> str:
    """blake2b-128 hex of 8-bit RGB pixels in row order (bytes or a C-contiguous H x W x 3 array) and their size."""
    digest = hashlib.blake2b(pixels, digest_size=16)
    digest.update(f"{width}x{height}".encode())
    return digest.hexdigest()


def _decode_resize_jpeg(codecs: tuple[ModuleType, ModuleType], data: bytes, mode: str, size: tuple[int, int],
                        target: tuple[int, int]) -> np.ndarray | None:
    """An RGB or greyscale JPEG decoded by libjpeg-turbo and resized to ``target``: H x W x 3 uint8, C order.

    The DCT-domain scale is the smallest power of two (1/2, 1/4, 1/8) that keeps both sides at or above the
    target, as Pillow's ``draft``: libjpeg-turbo has SIMD code for those; its 3/8, 5/8, ... scales measured slower
    than a full decode and 5 dB lower PSNR. The rest is Pillow's antialiased bicubic done the way OpenCV does it
    fast: a separable filter with Pillow's bicubic kernel stretched by the factor (what Pillow weighs around each
    output pixel) and a mild sharpening, then bilinear interpolation at the output positions. The sharpening
    (``[-0.1, 1.2, -0.1]``) offsets the bilinear step's own blur; 0.1 brought the output closest to Pillow's
    (48 dB PSNR against it; 0, 0.15 and 0.2 gave 45, 47 and 45). Filter and bilinear cost 0.65 ms per ~500x375
    photo against Pillow's 2 ms, for a PSNR 1.1 dB below Pillow's against a Lanczos reference and 1.4 dB below
    against an area average (docs/measured/cpu-2026-12-07-conversion); OpenCV's INTER_AREA took 1 ms, and plain
    bilinear aliases (30 dB against Lanczos on the most detailed sample photo).

    Every step is bit-exact across CPUs, so the pixel hashes of two machines agree (duplicates are found across
    parts built on different hardware): the weights are multiples of 1/128, so every sum of products is an exact
    float whatever the SIMD width or FMA use, and INTER_LINEAR_EXACT is OpenCV's bit-exact bilinear. (Float
    weights and INTER_CUBIC change pixels between OpenCV's SIMD and plain code; tests/shards/test_convert.py.)

    Returns:
        The pixels, or None where libjpeg-turbo raises, including on the warnings it raises for in strict mode
        (corrupt or truncated data): the caller then takes the Pillow path, which decides accept or reject.
    """
    simplejpeg, cv2 = codecs
    (w, h), (tw, th) = size, target
    scale = next(s for s in (8, 4, 2, 1) if s == 1 or (-(-w // s) >= tw and -(-h // s) >= th))
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if mode == "L" else "RGB", fastdct=False,
                                        fastupsample=False, min_height=-(-h // scale), min_width=-(-w // scale),
                                        strict=True)
    except Exception:  # noqa: BLE001 - whatever libjpeg-turbo refuses, the Pillow path judges
        return None
    if pixels.shape[:2] != (th, tw):
        kernel_x, kernel_y = _resize_kernel(pixels.shape[1] / tw), _resize_kernel(pixels.shape[0] / th)
        pixels = cv2.sepFilter2D(pixels, -1, kernel_x, kernel_y)
        pixels = cv2.resize(pixels, (tw, th), interpolation=cv2.INTER_LINEAR_EXACT)
    if pixels.ndim == 2 or pixels.shape[2] == 1:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)  # grey replicated, as Pillow's convert("RGB")
    return pixels


def _resize_kernel(factor: float) -> np.ndarray:
    """The filter applied along an axis shrunk by ``factor`` before bilinear sampling (see _decode_resize_jpeg).

    Pillow's bicubic kernel (a = -0.5) stretched by ``factor`` and sampled per source pixel, convolved with the
    sharpening ``[-0.1, 1.2, -0.1]``, in steps of 1/128; end taps of at most one step are dropped (on the
    benchmark's ~500x375 photos: 6% less time, PSNR against Lanczos +0.5 dB there, -0.3 dB on the sample photos).

    Returns:
        float32 weights that are multiples of 1/128 summing to exactly 1 (what is dropped or rounded off goes to
        the centre), odd length, at most ``2 * ceil(2 * factor) + 3``; ``[1]`` where ``factor`` <= 1.
    """
    if factor <= 1:
        return np.ones(1, np.float32)
    radius = math.ceil(2 * factor)
    x = np.abs(np.arange(-radius, radius + 1) / factor)
    bicubic = np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))
    weights = np.convolve(bicubic / bicubic.sum(), [-0.1, 1.2, -0.1])
    steps = np.round(weights * 128)
    while len(steps) > 1 and abs(steps[0]) <= 1:  # end taps of one step: a filter pass each for ~nothing
        steps = steps[1:-1]  # symmetric, so still odd and centred
    steps[len(steps) // 2] += 128 - steps.sum()
    return (steps / 128).astype(np.float32)


def _orient_array(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF ``orientation`` (1-8) to an H x W x C array, as ``_ORIENT``'s Pillow transposes do; C order."""
    if orientation in (5, 6, 7, 8):
        pixels = np.rot90(pixels, {5: 1, 6: -1, 7: -1, 8: 1}[orientation])
        orientation = {5: 4, 6: 1, 7: 4, 8: 1}[orientation]
    if orientation in (2, 3):
        pixels = pixels[:, ::-1]
    if orientation in (3, 4):
        pixels = pixels[::-1]
    return np.ascontiguousarray(pixels)


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
