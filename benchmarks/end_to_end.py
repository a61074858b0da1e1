"""End-to-end suite: the real training step fed by the real loader from shards, for a fixed number of steps.

Built exactly as ``train.py`` builds a run (loader, ``MoCo``, ``build_optimizer``, autocast, ``train.train_step``)
without checkpoints or logging. After ``warmup`` steps, ``steps`` steps are timed one by one: the wait for
the next batch (host blocked in ``next()`` while the device is idle, because the previous step was
synchronised) and the whole step. Reported: pairs/s over the timed steps, the share of time spent waiting for
data, step-time p50/p90/p99 and the GPU utilisation NVML reports over the timed steps (sampled by nvidia-smi,
see benchmarks/gpu_util.py). The PyTorch loader backend runs the same loop in the same run as the baseline.

The benchmark corpus is a few batches per pass (2048 images: 8 batches of 256), so the timed steps cross
several pass boundaries, where the loader re-deals its shards; a boundary that the loader does not hide turns
into one long data wait that a corpus with thousands of batches per pass would amortise. So the data-wait share
is also reported over the steps within a pass (``data_wait_share_in_pass``, with ``pairs_per_s_in_pass``),
next to the extra wait of the boundary steps over a typical step's wait (``boundary_wait_ms_signed``), the
number of boundaries timed and the corpus's ``batches_per_pass``.
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch

import config as config_lib
from benchmarks.context import Context
from benchmarks.data import bench_shards
from benchmarks.gpu_util import GpuUtilSampler
from benchmarks.pipeline_throughput import backends
from benchmarks.report import Column, SuiteResult
from benchmarks.timing import Stats, StepClock, percentile, synchronize
from distributed import DistInfo

COLUMNS = [
    Column("pairs_per_s", "pairs/s", "{:,.1f}"),
    Column("data_wait_share", "data wait", "{:.1%}"),
    Column("pairs_per_s_in_pass", "pairs/s in a pass", "{:,.1f}"),
    Column("data_wait_share_in_pass", "wait in a pass", "{:.1%}"),
    Column("boundary_wait_ms_signed", "boundary wait ms", "{:,.0f}"),
    Column("pass_boundaries", "boundaries", "{:,.0f}"),
    Column("step_ms_p50", "step p50 ms", "{:,.1f}"),
    Column("step_ms_p90", "p90 ms", "{:,.1f}"),
    Column("step_ms_p99", "p99 ms", "{:,.1f}"),
    Column("gpu_util_pct", "GPU util %", "{:.0f}"),
]


def run_loop(cfg: config_lib.Config, device: torch.device, warmup: int, steps: int, profiler=None) -> dict:
    """Train ``warmup + steps`` steps of the real loop; return per-step timings of the last ``steps``."""
    import train
    from pipeline import build_train_loader

    torch.manual_seed(cfg.run.seed)
    loader = build_train_loader(cfg, DistInfo(device=device))
    try:
        model, optimizer, amp, scaler = train.build_model_and_optimizer(
            cfg, DistInfo(device=device), config_lib.learning_rate(cfg, 1))
        model.train()
        batches = iter(loader)

        def step(clock: StepClock | None) -> None:
            if clock:
                clock.start()
            view_q, view_k = next(batches)
            if clock:
                clock.data_ready(boundary=loader.pass_index > 0 and loader.batch_in_pass == 1)
            train.train_step(model, optimizer, scaler, view_q, view_k, cfg.model.momentum, amp, cfg.optim.grad_clip)
            if clock:
                clock.stop()

        for _ in range(warmup):
            step(None)
        synchronize(device)  # the warm-up's queued work must not land in the first timed step
        clock = StepClock(device, sync_before_data=False)
        t0 = time.perf_counter()
        with profiler if profiler is not None else contextlib.nullcontext(), GpuUtilSampler(device) as util:
            for _ in range(steps):
                step(clock)
        total = time.perf_counter() - t0
    finally:
        loader.close()
    return {"clock": clock, "total_s": total, "gpu_util": util.mean, "bad_samples": loader.bad_samples,
            "batches_per_pass": loader.batches_per_pass}


def run(ctx: Context) -> SuiteResult:
    s, device = ctx.sizes, ctx.device
    shards = bench_shards(ctx)
    base = config_lib.replace(config_lib.Config(), data={
        "shards": str(shards), "crop_size": s.crop_size, "batch_size": s.e2e_batch,
        "num_threads": max(s.pipeline_threads), "shuffle_buffer": min(256, 4 * s.e2e_batch),
    }, model={"arch": s.arch, "queue_size": s.queue_sizes[-1]}, optim={"precision": "auto"},
        run={"device": device.type})
    result = SuiteResult("e2e", config={"shards": str(shards), "arch": s.arch, "crop_size": s.crop_size,
                                        "batch": s.e2e_batch, "queue_size": s.queue_sizes[-1],
                                        "threads": max(s.pipeline_threads), "warmup_steps": s.warmup,
                                        "timed_steps": s.e2e_steps, "precision": "auto", "device": str(device)},
                         columns=COLUMNS, plot_metric="pairs_per_s")
    for label, data_upd in backends(device):
        name = f"train loop, {label} loader"
        if not ctx.selects(name):
            continue
        cfg = config_lib.replace(base, data=data_upd)
        gc.collect()
        timing = run_loop(cfg, device, s.warmup, s.e2e_steps, ctx.profiler(f"e2e-{label}"))
        clock: StepClock = timing["clock"]
        step_ms = [t * 1e3 for t in clock.step_s]
        in_pass_s = [t for t, b in zip(clock.step_s, clock.boundary) if not b]
        extra_ms = [w * 1e3 for w in clock.boundary_extra_wait_s]
        result.add(name, "baseline" if label == "PyTorch" else label,
                   {"backend": label, "bad_samples": timing["bad_samples"],
                    "batches_per_pass": timing["batches_per_pass"]},
                   pairs_per_s=s.e2e_batch * len(step_ms) / timing["total_s"],
                   data_wait_share=clock.data_wait_share,
                   pairs_per_s_in_pass=s.e2e_batch * len(in_pass_s) / sum(in_pass_s) if in_pass_s else None,
                   data_wait_share_in_pass=clock.data_wait_share_in_pass if in_pass_s else None,
                   boundary_wait_ms_signed=Stats.of(extra_ms) if extra_ms else None,
                   pass_boundaries=sum(clock.boundary) or None,
                   batches_per_pass=timing["batches_per_pass"],
                   step_ms=Stats.of(step_ms),
                   step_ms_p50=percentile(step_ms, 50), step_ms_p90=percentile(step_ms, 90),
                   step_ms_p99=percentile(step_ms, 99),
                   gpu_util_pct=timing["gpu_util"])
    rows = {r.params["backend"]: r.name for r in result.rows}
    for label in ("DALI GPU", "DALI CPU"):
        if label in rows and "PyTorch" in rows:
            result.compare(f"train loop pairs/s, {label} vs PyTorch loader", rows[label], rows["PyTorch"],
                           "pairs_per_s")
    return result
