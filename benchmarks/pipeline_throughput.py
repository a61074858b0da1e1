"""Pipeline suite: pairs/s of each loader backend (DALI GPU, DALI CPU, PyTorch) on the same shards.

The shards are built once per run by the real builder from real photos at ImageNet-like size (about 500 x 375,
see benchmarks/data.py). Each configuration builds the real loader (``pipeline.build_train_loader``), discards
at least ``warmup`` batches up to the end of a pass (pipeline start-up, worker spawn, prefetch queues filling)
and then times ``passes`` whole passes batch by batch; a batch counts as delivered when its tensors are on the
loader's output device (synchronised).

Every pass boundary re-deals the shards and gives the loader a new reader, so a loader has two speeds: within a
pass (``pairs_per_s``, the steady state) and the extra time each boundary costs (``boundary_ms_signed``; signed
because a loader that hides its boundary measures about 0, give or take noise). With ``batches_per_pass`` of
the corpus used, a corpus of ``B`` batches per pass runs at ``B * batch / (B * batch_ms + boundary_ms) * 1000``
pairs/s; ``pairs_per_s_this_corpus`` is that figure measured for the benchmark corpus itself. A small corpus
(the benchmark's 2048 images are 8 batches of 256) makes the boundary dominate; ImageNet (5000 batches per
pass) hides a boundary of a few seconds.

Sweeps: threads / workers at the largest batch size, and batch size at the most threads. The PyTorch backend
(webdataset + torchvision v2 + DataLoader workers) is the baseline; each DALI backend is compared with it at
the same threads and batch.
"""

from __future__ import annotations

import gc

import torch

import config as config_lib
from benchmarks.context import Context
from benchmarks.data import bench_shards
from benchmarks.report import Column, SuiteResult
from benchmarks.timing import measure_passes
from distributed import DistInfo

COLUMNS = [
    Column("pairs_per_s", "pairs/s in a pass", "{:,.1f}"),
    Column("pairs_per_s_per_thread", "per thread", "{:,.1f}"),
    Column("batch_ms", "batch ms", "{:,.1f}"),
    Column("boundary_ms_signed", "boundary ms", "{:,.0f}"),
    Column("batches_per_pass", "batches/pass", "{:,.0f}"),
    Column("pairs_per_s_this_corpus", "pairs/s this corpus", "{:,.1f}"),
]
MAX_TIMED_BATCHES = 1024  # a --shards corpus with long passes: fewer timed passes (at least one)


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
    return out


def _loader_fn(cfg: config_lib.Config, device: torch.device):
    from pipeline import build_train_loader

    loader = build_train_loader(cfg, DistInfo(device=device))
    batches = iter(loader)

    def next_batch() -> object:
        return next(batches)

    return loader, next_batch


def run(ctx: Context) -> SuiteResult:
    s = ctx.sizes
    shards = bench_shards(ctx)
    sweep: list[tuple[int, int]] = [(t, max(s.pipeline_batches)) for t in s.pipeline_threads]
    sweep += [(max(s.pipeline_threads), b) for b in s.pipeline_batches if b != max(s.pipeline_batches)]
    result = SuiteResult("pipeline", config={"shards": str(shards), "crop_size": s.pipeline_crop, "recipe": "v2",
                                             "sweep_threads_batch": sweep, "warmup_batches": s.pipeline_warmup,
                                             "timed_passes": s.pipeline_passes, "corpus": _corpus_facts(shards)},
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
            loader, next_batch = _loader_fn(cfg, device)
            per_pass = loader.batches_per_pass
            try:
                with ctx.profiler(f"pipeline-{label}-{threads}-{batch}"):
                    tp = measure_passes(next_batch, items_per_call=batch, batches_per_pass=per_pass,
                                        warmup=s.pipeline_warmup, device=device,
                                        passes=max(1, min(s.pipeline_passes, MAX_TIMED_BATCHES // per_pass)))
                bad = loader.bad_samples
            finally:
                loader.close()
                del loader
                gc.collect()
            result.add(name, "baseline" if label == "PyTorch" else label,
                       {"backend": label, "threads": threads, "batch": batch, "device": str(device),
                        "batches_per_pass": per_pass, "bad_samples": bad},
                       pairs_per_s=tp.steady_items_per_s, pairs_per_s_per_thread=tp.steady_items_per_s.scaled(1 / threads),
                       batch_ms=tp.steady_seconds_per_call.scaled(1e3), boundary_ms_signed=tp.boundary_s.scaled(1e3),
                       batches_per_pass=per_pass, pairs_per_s_this_corpus=tp.items_per_s)
    names = {r.name for r in result.rows}
    once, roi = f"DALI GPU threads={top[0][0]} batch={top[0][1]}", f"DALI GPU roi threads={top[0][0]} batch={top[0][1]}"
    if once in names and roi in names:
        result.compare("DALI GPU decode once + crop twice vs ROI decode per view", once, roi, "pairs_per_s")
    for label, _ in backends(device):
        if label == "PyTorch":
            continue
        for threads, batch in sweep:
            ours, base = f"{label} threads={threads} batch={batch}", f"PyTorch threads={threads} batch={batch}"
            if ours in names and base in names:
                result.compare(f"{label} vs PyTorch within a pass, threads={threads} batch={batch}", ours, base,
                               "pairs_per_s")
                result.compare(f"{label} vs PyTorch over whole passes of this corpus, threads={threads} "
                               f"batch={batch}", ours, base, "pairs_per_s_this_corpus")
    result.markdown_extra = ("Amortised pairs/s for a corpus of B batches per pass: "
                             "B x batch / (B x batch ms + boundary ms) x 1000.")
    return result


def _corpus_facts(shards) -> dict:
    from shards.manifest import read_manifest

    manifest = read_manifest(shards)
    return {"images": manifest.total_samples, "shards": len(manifest.shards),
            "mean_sample_kib": manifest.total_bytes / max(manifest.total_samples, 1) / 1024}
