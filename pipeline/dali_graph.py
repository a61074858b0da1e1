"""The DALI operator graph: encoded JPEGs -> two independently augmented, normalised views (GPU or CPU).

Colour jitter. torchvision's ColorJitter applies brightness, contrast, saturation and hue in a random
order per image. We apply them in one fixed order and keep the result order-independent instead:
brightness (x*b), contrast around the image's mean luma (m + c*(x - m)), saturation (scale of the
chroma around the luma, which is what blending with the ITU-R 601 grayscale image does) and hue (a
rotation of the chroma in YIQ) are all linear maps that commute with each other once the contrast
centre is the mean luma, because brightness scales that mean by b and the chroma operations leave luma
untouched. So the random order changes nothing except through the clamping to [0, 255] between steps
(rare at jitter 0.4) and torchvision's HSV hue versus DALI's YIQ hue rotation. Grayscale (saturation 0)
commutes too, which is why the v1 order (grayscale before the jitter) needs no separate path here.
Random application (p=0.8 jitter, p=0.5 blur, p=0.2 grayscale) uses identity parameters for the samples
that skip an operation, so the batch never splits into conditional sub-batches.
"""

from __future__ import annotations

from nvidia.dali import fn, math, types

from pipeline.recipes import Recipe


def _factor(apply, strength: float):
    """1 + apply * (U[1-s, 1+s] - 1): the jitter factor for applied samples, 1 (identity) otherwise."""
    if strength <= 0:
        return 1.0
    return 1.0 + apply * (fn.random.uniform(range=[1.0 - strength, 1.0 + strength]) - 1.0)


def _to_gpu(x):
    return x.gpu() if hasattr(x, "gpu") else x


def augment_view(image, recipe: Recipe, size: int, dtype, layout: str, crop: bool = True, gpu: bool = False):
    """One augmented view of a batch of decoded RGB images (HWC uint8, on the CPU or the GPU).

    Args:
        image: decoded images, or (with ``crop=False``) images already cropped by an ROI decoder.
        recipe: the augmentation recipe.
        size: output side S in pixels.
        dtype: DALI output dtype (types.FLOAT or types.FLOAT16).
        layout: "HWC" (for channels_last tensors) or "CHW".
        crop: apply the random resized crop here (False when the decoder already cropped).
        gpu: ``image`` lives on the GPU; the per-sample random factors (CPU) are copied there for arithmetic.

    Returns:
        The normalised view, S x S x 3 (HWC) or 3 x S x S per sample.
    """
    if crop:
        view = fn.random_resized_crop(image, size=[size, size], random_area=list(recipe.crop_scale),
                                      random_aspect_ratio=list(recipe.crop_ratio), antialias=True)
    else:
        view = fn.resize(image, size=[size, size], antialias=True)

    apply_jitter = fn.random.coin_flip(probability=recipe.jitter_p)
    brightness = _factor(apply_jitter, recipe.brightness)
    contrast = _factor(apply_jitter, recipe.contrast)
    saturation = _factor(apply_jitter, recipe.saturation)
    hue_degrees = apply_jitter * fn.random.uniform(range=[-360.0 * recipe.hue, 360.0 * recipe.hue]) if recipe.hue else 0.0
    gray = fn.random.coin_flip(probability=recipe.grayscale_p)

    # b * (m + c * (x - m)) with m the mean luma: computed as arithmetic so that it runs on the GPU too
    # (brightness_contrast's contrast_center would need m on the CPU).
    mean_luma = fn.reductions.mean(fn.color_space_conversion(view, image_type=types.RGB, output_type=types.GRAY))
    gain, offset = brightness * contrast, brightness * (1.0 - contrast)
    if gpu:
        gain, offset = _to_gpu(gain), _to_gpu(offset)
    scaled = view * gain + mean_luma * offset
    view = fn.cast(math.clamp(scaled, 0.0, 255.0), dtype=types.UINT8)
    view = fn.hsv(view, hue=hue_degrees, saturation=saturation * (1 - gray))

    if recipe.blur_p > 0:
        apply_blur = fn.random.coin_flip(probability=recipe.blur_p)
        sigma = fn.random.uniform(range=list(recipe.blur_sigma))
        # sigma 1e-3 gives the kernel [0, 1, 0]: an exact identity for the samples that skip the blur.
        view = fn.gaussian_blur(view, sigma=apply_blur * sigma + (1 - apply_blur) * 1e-3)

    flip = fn.random.coin_flip(probability=recipe.flip_p)
    return fn.crop_mirror_normalize(view, mirror=flip, dtype=dtype, output_layout=layout,
                                    mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std])


def two_views(jpegs, recipe: Recipe, size: int, decode_device: str, dtype, layout: str, view_decode: str = "once",
              decoder_args: dict | None = None):
    """Decode and make the query and key views.

    Args:
        jpegs: encoded images from the reader.
        decode_device: "mixed" (GPU, nvJPEG and the hardware decoder) or "cpu".
        view_decode: "once" decodes each image once and crops it twice; "roi" decodes only each view's
            crop window (two partial decodes per image).
        decoder_args: extra fn.decoders.* arguments (memory hints, hw_decoder_load).

    Returns:
        (view_q, view_k).
    """
    decoder_args = decoder_args or {}
    if view_decode == "once":
        image = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB, **decoder_args)
        return tuple(augment_view(image, recipe, size, dtype, layout, gpu=decode_device == "mixed") for _ in range(2))
    views = []
    for _ in range(2):
        crop = fn.decoders.image_random_crop(jpegs, device=decode_device, output_type=types.RGB,
                                             random_area=list(recipe.crop_scale),
                                             random_aspect_ratio=list(recipe.crop_ratio), **decoder_args)
        views.append(augment_view(crop, recipe, size, dtype, layout, crop=False, gpu=decode_device == "mixed"))
    return tuple(views)
