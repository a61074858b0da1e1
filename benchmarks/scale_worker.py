"""One point of the scale suite's loader curves, in a process of its own (launched by benchmarks/scale.py).

Builds the real loader (``build_train_loader``, rank ``--rank`` of ``--world-size``, no process group: dealing
needs none) over a shard directory, takes ``--batches`` batches (the next window is prepared ahead in the
meantime, as in training) and writes the timings and this process's peak RSS to ``--out`` as JSON; then, after
the peak is read, times ``read_manifest`` alone in the same process (torch and DALI imported, as in training)::

    python -m benchmarks.scale_worker --shards-dir results/_data/scale/shards-100000 --window-shards 256 \\
        --world-size 10 --backend dali --out /tmp/point.json

With ``--manifest-only`` it only times ``read_manifest`` (parse, no file check) of that directory's manifest:
the manifest-size curve, on fabricated manifests whose files need not exist.

Peak RSS is the kernel's high-water mark of this process (``VmHWM``: interpreter, torch, DALI and the loader),
reset after the imports (``/proc/self/clear_refs``, Linux >= 4.0) so that the imports' own transient peak does not
hide the loader's; ``import_rss_mib`` is the resident size at that point. Where the reset is not allowed the peak
is ``getrusage``'s ``ru_maxrss`` over the whole process (``peak_includes_imports``).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def _status_mib(field: str) -> float:
    """``VmRSS`` or ``VmHWM`` of this process in MiB (0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return 0.0


def _reset_peak() -> bool:
    """Reset the process's peak RSS to its current RSS; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_mib(reset: bool) -> float:
    return _status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards-dir", required=True, help="directory holding manifest.json")
    parser.add_argument("--window-shards", type=int, required=True, help="data.window_shards")
    parser.add_argument("--backend", default="dali", choices=("dali", "pytorch"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--crop", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, default=4, help="batches taken after the first")
    parser.add_argument("--world-size", type=int, default=1, help="ranks the manifest is dealt to")
    parser.add_argument("--rank", type=int, default=0, help="the rank measured")
    parser.add_argument("--repeats", type=int, default=3, help="read_manifest timings (the minimum is reported)")
    parser.add_argument("--manifest-only", action="store_true", help="only time read_manifest")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import nvidia.dali  # noqa: F401 - counted in the import baseline, like torch
    import torch

    from config import Config, replace
    from distributed import DistInfo
    from pipeline import build_train_loader
    from shards.manifest import read_manifest

    def read_time(check_files: bool) -> float:
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            read_manifest(args.shards_dir, check_files=check_files)
            times.append(time.perf_counter() - t)
        return min(times)

    def manifest_memory() -> tuple[int, int]:
        """Bytes the manifest read keeps (what every rank holds while it trains) and its peak (the parsed JSON)."""
        import gc
        import tracemalloc

        gc.collect()
        tracemalloc.start()  # after the timed reads: tracing slows allocation
        try:
            manifest = read_manifest(args.shards_dir, check_files=False)
            gc.collect()
            kept, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        del manifest
        return kept, peak

    if args.manifest_only:
        entries = len(read_manifest(args.shards_dir, check_files=False).shards)
        parse_s = read_time(False)
        kept, peak = manifest_memory()
        Path(args.out).write_text(json.dumps({"ok": True, "entries": entries, "manifest_parse_s": parse_s,
                                              "manifest_bytes_per_entry": kept / entries,
                                              "manifest_peak_bytes_per_entry": peak / entries}))
        return 0

    torch.set_num_threads(1)
    import gc

    gc.collect()
    import_rss = _status_mib("VmRSS")
    reset = _reset_peak()
    cfg = replace(Config(), data={
        "shards": args.shards_dir, "backend": args.backend, "dali_device": "cpu", "crop_size": args.crop,
        "batch_size": args.batch, "batch_size_per_gpu": args.batch, "num_threads": args.threads,
        "shuffle_buffer": 4 * args.batch, "prefetch": 1,
        "window_shards": args.window_shards, "channels_last": False})
    t0, cpu0 = time.perf_counter(), time.process_time()  # CPU time (all threads): less swayed by other processes
    try:
        loader = build_train_loader(cfg, DistInfo(rank=args.rank, world_size=args.world_size))
        # The next window's reader is prepared right after the first batch (not ``prepare_ahead`` batches before
        # the window's end, which these few batches would not reach), so the peak holds both readers, as in training.
        loader.prepare_ahead = 1 << 40
        t1 = time.perf_counter()
        next(loader)
        t2, cpu2 = time.perf_counter(), time.process_time()
        for _ in range(args.batches):
            next(loader)
        upcoming = getattr(loader, "_next", None)
        if hasattr(upcoming, "wait"):  # DALI: the next window's pipeline, built in a background thread
            upcoming.wait()
        t3 = time.perf_counter()
        state_t0 = time.perf_counter()
        state = loader.state_dict()
        state_s = time.perf_counter() - state_t0
        share = loader.rank_pass(0).shards
        result = {
            "ok": True, "shards": len(loader.manifest.shards), "rank_shards": len(share),
            "samples": int(loader.plan.sizes[share].sum()), "world_size": args.world_size,
            "windows_per_pass": loader.windows_per_pass, "batches_per_pass": loader.batches_per_pass,
            "window_shards": len(loader.window_shards_of(loader.window_serial)),
            "construct_s": t1 - t0, "first_batch_s": t2 - t1, "build_s": t2 - t0, "steady_s": t3 - t2,
            "build_cpu_s": cpu2 - cpu0,
            "state_dict_s": state_s, "state_dict_keys": len(state),
            "import_rss_mib": import_rss, "peak_rss_mib": _peak_rss_mib(reset), "peak_includes_imports": not reset,
        }
        loader.close()
        result.update(manifest_parse_s=read_time(False), manifest_s=read_time(True))  # after the peak is read
    except Exception as exc:  # noqa: BLE001 - the old single-reader structure is expected to fail at scale
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        cause = next((line for line in reversed(lines) if "rror" in line), lines[-1] if lines else "")  # DALI: last
        result = {"ok": False, "error": f"{type(exc).__name__}: {lines[0] if lines else ''} ... {cause[:300]}",
                  "after_s": time.perf_counter() - t0, "import_rss_mib": import_rss,
                  "peak_rss_mib": _peak_rss_mib(reset)}
    Path(args.out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
