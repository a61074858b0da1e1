"""The benchmark corpus: real photos at ImageNet-like size, turned into shards by the real shards builder.

Built once per output directory and reused by the pipeline and e2e suites (and across runs: the manifest is
only rebuilt when the requested size changed). ``--shards DIR`` uses existing shards instead, ``--corpus DIR``
a folder of your own images (both for machines without scikit-image, such as a bare GPU image).
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.context import Context


def bench_corpus(ctx: Context, num_images: int | None = None, formats: bool = False) -> Path:
    """``num_images`` real-photo images (crops of the embedded photos, short side ``ctx.sizes.short_side``), or
    the ``--corpus`` folder as it is when one was given (machines without scikit-image, your own data).

    Args:
        ctx: the run context (sizes, work directory).
        num_images: how many (default ``ctx.sizes.corpus_images``).
        formats: mixed formats like a scraped corpus (PNG, WebP, greyscale JPEG) instead of JPEG only.
    """
    if ctx.corpus_dir is not None:
        return ctx.corpus_dir
    s = ctx.sizes
    n = num_images or s.corpus_images
    out = ctx.work_dir / f"corpus-{n}-{s.short_side[0]}-{s.short_side[1]}{'-mixed' if formats else ''}"
    stamp = out.with_name(out.name + ".complete")  # beside, not inside: the builder would count it as an input
    if not stamp.exists():
        from shards.sample_corpus import write_sample_corpus  # needs scikit-image / scikit-learn

        write_sample_corpus(out, num_images=n, seed=0, short_side=s.short_side, formats=formats)
        stamp.write_text(json.dumps({"images": n, "formats": formats}))
    return out


def bench_shards(ctx: Context) -> Path:
    """Shards of :func:`bench_corpus` written by the real builder at their own size; returns the shard directory.

    ``short_side=0`` keeps the ~500 x 375 photos as they are (the builder's default 256 would shrink them), so
    the loaders decode ImageNet-sized JPEGs.
    """
    from shards.build import BuildOptions, build_shards

    if ctx.shard_dir is not None:
        return ctx.shard_dir
    corpus = bench_corpus(ctx)
    out = ctx.work_dir / f"shards-{corpus.name}-{ctx.sizes.images_per_shard}"
    if not (out / "manifest.json").exists():
        build_shards([str(corpus)], out, BuildOptions(samples_per_shard=ctx.sizes.images_per_shard, short_side=0,
                                                      progress=False))
    ctx.shard_dir = out
    return out
