#!/usr/bin/env python
"""Requests the loaders send to an S3 store per pass, counted by moto's request recorder on 127.0.0.1.

    cd /work/main && OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python docs/measured/s3-requests-2026-12-07/requests.py \
        > docs/measured/s3-requests-2026-12-07/requests.jsonl

48 photos (shards.sample_corpus, seed 0) built into s3:// shards of 4, 8, 16 and 48 samples; each backend takes
6 batches of 8 pairs (one pass), then a fresh loader takes 30 (five passes); the difference over 4 passes is the
steady cost of a pass (what the first pass adds once: shard-check probes, index downloads, is left out).
"""

from __future__ import annotations

import collections
import json
import os
import sys
import tempfile
from pathlib import Path

from shards import storage
from shards.build import BuildOptions, build_shards
from shards.sample_corpus import write_sample_corpus
from tests.pipeline.helpers import make_cfg, take
from tests.shards.s3_server import start_s3_server


def count(server, url: str, backend: str, batches: int) -> collections.Counter:
    storage._cache.clear()  # each run downloads its index files, as a fresh process does
    with server.recording() as requests:
        take(make_cfg(url, backend), batches)
        return collections.Counter((m, p.split("?")[0].rsplit(".", 1)[-1]) for m, p, _r in requests())


def main() -> None:
    server = start_s3_server()
    try:
        server.client().create_bucket(Bucket="data")
        os.environ.update(server.env)
        with tempfile.TemporaryDirectory() as tmp:
            write_sample_corpus(Path(tmp), num_images=48, seed=0)
            for per_shard in (4, 8, 16, 48):
                url = f"s3://data/per-{per_shard}"
                manifest = build_shards([tmp], url, BuildOptions(samples_per_shard=per_shard, workers=1,
                                                                 progress=False))
                for backend in ("dali", "pytorch"):
                    one, five = count(server, url, backend, 6), count(server, url, backend, 30)
                    row = {"backend": backend, "samples_per_shard": per_shard, "shards": len(manifest.shards),
                           "shard_mib": round(manifest.total_bytes / len(manifest.shards) / 2**20, 3),
                           "tar_gets_per_pass": (five[("GET", "tar")] - one[("GET", "tar")]) / 4,
                           "tar_heads_per_pass": (five[("HEAD", "tar")] - one[("HEAD", "tar")]) / 4,
                           "idx_gets_per_run": five[("GET", "idx")], "samples_per_pass": manifest.total_samples}
                    row["tar_gets_per_sample"] = round(row["tar_gets_per_pass"] / manifest.total_samples, 3)
                    print(json.dumps(row), flush=True)
                    print(f"{backend:8s} {per_shard:3d}/shard: {row['tar_gets_per_pass']:6.1f} GETs/pass "
                          f"({row['tar_gets_per_sample']:.2f}/sample), {row['tar_heads_per_pass']:5.1f} HEADs/pass, "
                          f"{row['idx_gets_per_run']} index GETs/run", file=sys.stderr)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
