"""Time one ``shards.build.build_shards`` call in a fresh, light process (used by the shards suite).

The builder's worker pool uses the ``spawn`` start method, which re-imports the parent's ``__main__`` in every
worker. Timed from inside ``python -m benchmarks`` (which imports torch) each worker would pay a torch import
that ``python -m shards build`` never pays, so the suite runs the builder from this module, which imports only
``shards``, as the real command line does.

Usage: ``python -m benchmarks.ingest_timer OUT_DIR WORKERS SHORT_SIDE QUALITY PER_SHARD INPUT...``; prints
``{"seconds": ..., "accepted": ...}`` as the last line of stdout.
"""

from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> None:
    from shards.build import BuildOptions, build_shards

    out, workers, short_side, quality, per_shard, *inputs = argv
    options = BuildOptions(samples_per_shard=int(per_shard), short_side=int(short_side), quality=int(quality),
                           workers=int(workers), progress=False)
    t0 = time.perf_counter()
    manifest = build_shards(inputs, out, options)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "accepted": manifest.total_samples}))


if __name__ == "__main__":
    main(sys.argv[1:])
