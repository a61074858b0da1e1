"""Measure "decode once, crop twice" against "ROI-decode each view" with DALI CPU operators.

Usage::

    python -m pipeline.decode_strategies SHARD_DIR [--size 64] [--batch 16] [--threads 2] [--batches 20] [--rounds 5]

Both variants run the full v2 two-view graph of :mod:`pipeline.dali_graph` on the same shards; only the
decoding differs. Prints pairs/s per variant (best of ``rounds`` alternating runs after a warm-up batch). On the GPU the same
comparison belongs in the pipeline benchmark (``data.view_decode``).
"""

from __future__ import annotations

import argparse
import time

from nvidia.dali import Pipeline, fn, types

from pipeline.dali_graph import two_views
from pipeline.recipes import MOCO_V2
from shards.manifest import read_manifest


def build(shards: str, view_decode: str, size: int, batch: int, threads: int) -> Pipeline:
    manifest = read_manifest(shards)
    pipe = Pipeline(batch_size=batch, num_threads=threads, device_id=None, seed=0)
    with pipe:
        jpegs = fn.readers.webdataset(paths=[str(manifest.tar_path(s)) for s in manifest.shards],
                                      index_paths=[str(manifest.index_path(s)) for s in manifest.shards],
                                      ext=["jpg"], random_shuffle=True, initial_fill=64, seed=0)
        pipe.set_outputs(*two_views(jpegs, MOCO_V2, size, "cpu", types.FLOAT, "HWC", view_decode))
    pipe.build()
    pipe.run()  # warm-up: allocations, thread start
    return pipe


def pairs_per_second(pipe: Pipeline, batches: int) -> float:
    start = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * pipe.max_batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shards")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pipes = {v: build(args.shards, v, args.size, args.batch, args.threads) for v in ("once", "roi")}
    best = dict.fromkeys(pipes, 0.0)
    for _ in range(args.rounds):  # alternate the variants so that load from other processes hits both alike
        for variant, pipe in pipes.items():
            best[variant] = max(best[variant], pairs_per_second(pipe, args.batches))
    for variant, rate in best.items():
        print(f"{variant:5s} {rate:8.1f} pairs/s  (size {args.size}, batch {args.batch}, threads {args.threads})")


if __name__ == "__main__":
    main()
