"""read_manifest time and memory per entry on a fabricated manifest, in the tree given (after import torch, DALI).

    python docs/measured/cpu-2026-12-07-scale/manifest-memory/compare.py TREE ENTRIES [WORK]

TREE: a checkout of this repository (``git archive 19ea6de | tar -x -C /tmp/base`` gives the one-object-per-entry
manifest); WORK: where the fabricated manifest is written (default /tmp/manifest-compare).
"""

import gc
import importlib
import sys
import time
import tracemalloc
from pathlib import Path


def main(tree: str, entries: int, work: str = "/tmp/manifest-compare") -> None:
    sys.path.insert(0, tree)
    importlib.import_module("nvidia.dali")  # imported as training does: the gc pause matters after them
    importlib.import_module("torch")
    fabricated_manifest = importlib.import_module("benchmarks.scale").fabricated_manifest
    read_manifest = importlib.import_module("shards.manifest").read_manifest
    folder = fabricated_manifest(Path(work), entries)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        manifest = read_manifest(folder, check_files=False)
        times.append(time.perf_counter() - start)
        del manifest
    start = time.perf_counter()
    sizes = [s.samples for s in read_manifest(folder, check_files=False).shards]  # what the loader used to do
    with_column = time.perf_counter() - start
    del sizes
    gc.collect()
    tracemalloc.start()
    manifest = read_manifest(folder, check_files=False)
    gc.collect()
    kept, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    us = sorted(t / entries * 1e6 for t in times)
    print(f"{tree}: {entries} entries read min {us[0]:.2f} median {us[2]:.2f} us/entry, read + samples list "
          f"{with_column / entries * 1e6:.2f} us/entry, kept {kept / entries:.0f} B/entry, peak {peak / entries:.0f} "
          f"B/entry ({len(manifest.shards)} read)")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), *sys.argv[3:])
