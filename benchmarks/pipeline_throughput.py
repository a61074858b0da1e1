"""Pipeline suite: pairs/s of each loader backend on the same shards, against a tuned PyTorch DataLoader.

The shards are built once per run by the real builder from real photos at ImageNet-like size (benchmarks/data.py;
the full suites' corpus is 108 batches of 256 per pass). Each configuration builds its loader, discards
``warmup`` batches (pipeline start-up, worker spawn, prefetch queues filling) and then times consecutive windows
of batches (benchmarks.timing.measure_loader); a batch counts as delivered when its tensors are on the loader's
output device (synchronised).

Loaders: DALI GPU and DALI CPU (``pipeline.dali_loader``), the product's PyTorch backend (``pipeline.torch_loader``,
built for exact resume: a new DataLoader per pass, one worker per shard at most) and the baseline, a DataLoader
tuned for speed alone (benchmarks/tuned_torch_loader.py: persistent workers on every core, reduced-size decode,
pinned memory, no pass boundary). Each DALI backend and the product PyTorch backend are compared with the tuned
baseline at the same threads and batch.

Every pass boundary re-deals the shards and gives the product loaders a new reader, prepared ahead in the
background. So a loader has two figures: pairs/s within a pass (the windows that crossed no boundary) and the
extra time of a window that crossed one (``boundary_ms_signed``: negative when the reader prepared ahead had its
first batches ready, made during the previous pass; see the table notes). A corpus of ``B`` batches per pass then runs at ``B * batch / (B * batch_ms +
boundary_ms) * 1000`` pairs/s. ``--quick`` times both on its small corpus; the full suites cross a boundary only
where a loader reaches one within ``boundary_budget_s`` of timing.
"""

from __future__ import annotations

import gc

import torch

import config as config_lib
from benchmarks.context import Context
from benchmarks.data import bench_shards
from benchmarks.report import Column, SuiteResult
from benchmarks.timing import measure_loader
from distributed import DistInfo

COLUMNS = [
    Column("pairs_per_s", "pairs/s in a pass", "{:,.1f}"),
    Column("pairs_per_s_per_thread", "per thread", "{:,.1f}"),
    Column("batch_ms", "batch ms", "{:,.1f}"),
    Column("boundary_ms_signed", "boundary ms", "{:,.0f}"),
    Column("batches_per_pass", "batches/pass", "{:,.0f}"),
    Column("timed_batches", "timed batches", "{:,.0f}"),
]
BASELINE = "PyTorch tuned"


def _dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def backends(device: torch.device) -> list[tuple[str, dict]]:
    """(label, data-config updates) for every loader backend this machine can run; views land on ``device``."""
    out = []
    if _dali_available():
        if device.type == "cuda":
            out.append(("DALI GPU", {"backend": "dali", "dali_device": "gpu"}))
        out.append(("DALI CPU", {"backend": "dali", "dali_device": "cpu"}))
    out.append(("PyTorch", {"backend": "pytorch"}))
    out.append((BASELINE, {"backend": "pytorch"}))
    return out


def open_loader(label: str, cfg: config_lib.Config, device: torch.device):
    """The loader called ``label`` for ``cfg``: the tuned baseline, or the product's ``build_train_loader``."""
    if label == BASELINE:
        from benchmarks.tuned_torch_loader import TunedTorchLoader
        from pipeline.base import resolve_dtype
        from pipeline.recipes import RECIPES

        d = cfg.data
        return TunedTorchLoader(d.shards, d.batch_size, d.num_threads, RECIPES[d.recipe], d.crop_size, device,
                                resolve_dtype(cfg, device), d.channels_last, seed=cfg.run.seed)
    from pipeline import build_train_loader

    return build_train_loader(cfg, DistInfo(device=device))


def run(ctx: Context) -> SuiteResult:
    s = ctx.sizes
    shards = bench_shards(ctx)
    sweep: list[tuple[int, int]] = [(t, max(s.pipeline_batches)) for t in s.pipeline_threads]
    sweep += [(max(s.pipeline_threads), b) for b in s.pipeline_batches if b != max(s.pipeline_batches)]
    result = SuiteResult("pipeline", config={"shards": str(shards), "crop_size": s.pipeline_crop, "recipe": "v2",
                                             "sweep_threads_batch": sweep, "warmup_batches": s.pipeline_warmup,
                                             "window_batches": s.pipeline_window, "windows": s.pipeline_windows,
                                             "boundary_budget_s": s.boundary_budget_s,
                                             "corpus": _corpus_facts(shards)},
                         columns=COLUMNS, plot_metric="pairs_per_s")
    device = ctx.device
    # ROI decoding per view vs decode once + crop twice (pipeline/__init__.py leaves the GPU verdict to this
    # benchmark): one extra configuration at the most threads and the largest batch, on the GPU only.
    top = [(max(s.pipeline_threads), max(s.pipeline_batches))]
    plan = [(label, upd, sweep) for label, upd in backends(device)]
    if device.type == "cuda" and _dali_available():
        plan.append(("DALI GPU roi", {"backend": "dali", "dali_device": "gpu", "view_decode": "roi"}, top))
    for label, data_upd, points in plan:
        for threads, batch in points:
            name = f"{label} threads={threads} batch={batch}"
            if not ctx.selects(name):
                continue
            cfg = config_lib.replace(config_lib.Config(), data={
                "shards": str(shards), "crop_size": s.pipeline_crop, "batch_size": batch, "num_threads": threads,
                "recipe": "v2", "shuffle_buffer": min(256, 4 * batch), **data_upd,
            }, run={"device": device.type})
            loader = open_loader(label, cfg, device)
            per_pass = loader.batches_per_pass
            boundaries = getattr(loader, "has_pass_boundaries", True)
            try:
                with ctx.profiler(f"pipeline-{label}-{threads}-{batch}"):
                    tp = measure_loader(loader.__next__, items_per_call=batch,
                                        batches_per_pass=per_pass if boundaries else 2**62, warmup=s.pipeline_warmup,
                                        window=s.pipeline_window, windows=s.pipeline_windows, device=device,
                                        boundary_budget_s=s.boundary_budget_s if boundaries else 0.0)
                bad = loader.bad_samples
            finally:
                loader.close()
                del loader
                gc.collect()
            rate = tp.items_per_s
            result.add(name, "baseline" if label == BASELINE else label,
                       {"backend": label, "threads": threads, "batch": batch, "device": str(device),
                        "batches_per_pass": per_pass, "bad_samples": bad},
                       pairs_per_s=rate, pairs_per_s_per_thread=rate.scaled(1 / threads) if rate else None,
                       batch_ms=tp.seconds_per_call.scaled(1e3) if rate else None,
                       boundary_ms_signed=tp.boundary_s.scaled(1e3) if tp.boundary_s else None,
                       batches_per_pass=per_pass, timed_batches=tp.timed_batches)
    names = {r.name for r in result.rows}
    once, roi = f"DALI GPU threads={top[0][0]} batch={top[0][1]}", f"DALI GPU roi threads={top[0][0]} batch={top[0][1]}"
    if once in names and roi in names:
        result.compare("DALI GPU decode once + crop twice vs ROI decode per view", once, roi, "pairs_per_s")
    for label, _ in backends(device):
        if label == BASELINE:
            continue
        for threads, batch in sweep:
            ours, base = f"{label} threads={threads} batch={batch}", f"{BASELINE} threads={threads} batch={batch}"
            if ours in names and base in names:
                result.compare(f"{label} vs {BASELINE} within a pass, threads={threads} batch={batch}", ours, base,
                               "pairs_per_s")
    result.markdown_extra = (
        f"pairs/s in a pass: the timed windows of {s.pipeline_window} batches that crossed no pass boundary. boundary "
        "ms: what the window that crossed one took beyond the in-pass time (N/A: no boundary within the timed "
        "batches). It is negative when the boundary cost less than nothing: the loaders prepare the next pass's "
        "reader ahead (DALI as soon as a pass of at most 256 batches starts, the PyTorch backend (prefetch + 1) x "
        "workers batches before the end), so its first batches are already made at the boundary and come at once, "
        "and the work that made them slowed the in-pass windows instead. A pass of B batches takes B x batch ms + "
        "boundary ms either way, so a corpus of B batches per pass runs at B x batch / (B x batch ms + boundary ms) "
        f"x 1000 pairs/s. {BASELINE}: the baseline DataLoader tuned for speed alone "
        "(benchmarks/tuned_torch_loader.py), which has no pass boundary.")
    return result


def _corpus_facts(shards) -> dict:
    from shards.manifest import read_manifest

    manifest = read_manifest(shards)
    return {"images": manifest.total_samples, "shards": len(manifest.shards),
            "mean_sample_kib": manifest.total_bytes / max(manifest.total_samples, 1) / 1024}
