"""Offline tools that turn an uncurated image corpus into validated WebDataset shards for the DALI reader.

Command line (see ``python -m shards --help``)::

    python -m shards build INPUT... --out DIR [--prefix train] [--samples-per-shard 10000] [--max-shard-bytes B]
                     [--short-side 256] [--workers N] [--part i/n] [--labels-from-folders] [--path-column C]
    python -m shards verify DIR            # index == tar, every JPEG decodes (Pillow, then DALI CPU); exit 1 on a problem
    python -m shards stats DIR             # totals, rejections by reason, JPEG size histogram
    python -m shards merge-manifests PART_DIRS... --out DIR [--hash-prefix k/m]

Python API::

    from shards.build import BuildOptions, build_shards
    manifest = build_shards(["photos/"], "shards/", BuildOptions(samples_per_shard=500, workers=8))
    from shards.verify import verify_shards          # -> VerifyReport(ok, errors, samples, dali_samples)
    from shards.merge import merge_manifests         # (part dirs, out dir) -> Manifest
    from shards.summary import summarize             # (dir) -> ShardSummary
    from shards.manifest import read_manifest        # what the training pipeline reads

Modules: ``sources`` (inputs, or one part's share of them, streamed in a fixed order), ``tables`` (CSV / parquet
rows of paths), ``metadata`` (what a sample carries besides its JPEG), ``convert`` (decode,
validate, RGB, resize, JPEG, hash), ``groups`` (input slice -> shard(s) + stats file, resume), ``digests``
(compact dedup set, hash-prefix slices), ``build`` (parallel ordered build, dedup, parts), ``merge``, ``verify``,
``summary``, ``writer`` / ``manifest`` (the tar + DALI index + manifest.json contract).

Output (``DIR``): ``<prefix>-000000.tar``, ``-000001`` ... (contiguous; a part writes ``<prefix>-pIIII-000000.tar``
... and merge-manifests renames them into one sequence), each with ``.idx`` (DALI v1.2 index), and
``<namespace>-g<group>.stats.json`` per group; samples ``<key>.jpg`` (RGB JPEG), ``<key>.json`` (key, source,
width, height, orig_width, orig_height, format, mode, frames, hash; ``class`` when labelled; a table row's other
columns and an input tar's ``.json`` fields), ``<key>.cls`` (class index as ASCII) with --labels-from-folders or
from an input tar, ``<key>.txt`` (an input tar's caption); the key is the 10-digit index of the input in its
part's input stream (``pIIII-`` in front for a part). ``manifest.json`` (or ``manifest.part-IIII-of-NNNN.json``
for a part) lists the shards, their brace ``pattern``, the options, the input / rejection totals and the sorted
``classes``.
"""
