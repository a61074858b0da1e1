"""End-to-end suite: the real training step fed by the real loader from shards, in repeated timed windows.

Built exactly as ``train.py`` builds a run (loader, ``MoCo``, ``build_optimizer``, autocast, ``train.train_step``)
without checkpoints or logging. After ``warmup`` steps, ``repeats`` windows of ``steps`` steps are timed, step by
step: the wait for the next batch (host blocked in ``next()`` while the device is idle, because the previous step
was synchronised) and the whole step. Reported per row: pairs/s and the data-wait share (median and min-max over
the windows), step-time p50/p90/p99 and the GPU utilisation NVML reports (sampled by nvidia-smi, see
benchmarks/profiling.py). Every loader of the pipeline suite feeds the same loop; the tuned PyTorch DataLoader
(benchmarks/tuned_torch_loader.py) is the baseline.

A step whose batch was the first of a new pass (shards re-dealt, a new reader) is a boundary step. The data-wait
share is also reported without them (``data_wait_share_in_pass``, with ``pairs_per_s_in_pass``), next to the
boundary steps' extra wait over a typical step's (``boundary_wait_ms_signed``: about 0 when the next pass's
reader, prepared ahead, had its first batch ready) and their number. The full corpus is 108 batches per pass, so a
full run's 70 steps stay within the first pass (the pipeline suite times a boundary where a loader reaches one);
``--quick`` crosses one.
"""

from __future__ import annotations

import contextlib
import gc
import time

import torch

import config as config_lib
from benchmarks.context import Context
from benchmarks.data import bench_shards
from benchmarks.pipeline_throughput import BASELINE, backends, open_loader
from benchmarks.profiling import GpuUtilSampler
from benchmarks.report import Column, SuiteResult
from benchmarks.timing import Stats, StepClock, percentile, synchronize
from distributed import DistInfo

COLUMNS = [
    Column("pairs_per_s", "pairs/s", "{:,.1f}"),
    Column("data_wait_share", "data wait", "{:.1%}"),
    Column("repeats", "repeats", "{:d}"),
    Column("pairs_per_s_in_pass", "pairs/s in a pass", "{:,.1f}"),
    Column("data_wait_share_in_pass", "wait in a pass", "{:.1%}"),
    Column("boundary_wait_ms_signed", "boundary wait ms", "{:,.0f}"),
    Column("pass_boundaries", "boundaries", "{:,.0f}"),
    Column("step_ms_p50", "step p50 ms", "{:,.1f}"),
    Column("step_ms_p90", "p90 ms", "{:,.1f}"),
    Column("step_ms_p99", "p99 ms", "{:,.1f}"),
    Column("gpu_util_pct", "GPU util %", "{:.0f}"),
]


def run_loop(cfg: config_lib.Config, label: str, device: torch.device, warmup: int, steps: int, repeats: int,
             profiler=None) -> dict:
    """Train ``warmup + repeats x steps`` steps of the real loop; return the timings of each timed window."""
    import train
    from model import MoCo

    torch.manual_seed(cfg.run.seed)
    loader = open_loader(label, cfg, device)
    try:
        model = train.place_model(MoCo(cfg.model), cfg, DistInfo(device=device))
        optimizer, amp, scaler = train.build_optimization(cfg, model, device, config_lib.learning_rate(cfg, 1))
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
        clocks, totals = [], []
        with profiler if profiler is not None else contextlib.nullcontext(), GpuUtilSampler(device) as util:
            for _ in range(repeats):
                clock = StepClock(device, sync_before_data=False)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(clock)
                totals.append(time.perf_counter() - t0)
                clocks.append(clock)
    finally:
        loader.close()
    return {"clocks": clocks, "totals_s": totals, "gpu_util": util.mean, "bad_samples": loader.bad_samples,
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
                                        "steps_per_repeat": s.e2e_steps, "repeats": s.e2e_repeats,
                                        "precision": "auto", "device": str(device)},
                         columns=COLUMNS, plot_metric="pairs_per_s")
    for label, data_upd in backends(device):
        name = f"train loop, {label} loader"
        if not ctx.selects(name):
            continue
        cfg = config_lib.replace(base, data=data_upd)
        gc.collect()
        timing = run_loop(cfg, label, device, s.warmup, s.e2e_steps, s.e2e_repeats, ctx.profiler(f"e2e-{label}"))
        clocks: list[StepClock] = timing["clocks"]
        merged = StepClock(device)
        for c in clocks:
            merged.wait_s += c.wait_s
            merged.step_s += c.step_s
            merged.boundary += c.boundary
        step_ms = [t * 1e3 for t in merged.step_s]
        in_pass_s = [t for t, b in zip(merged.step_s, merged.boundary) if not b]
        extra_ms = [w * 1e3 for w in merged.boundary_extra_wait_s]
        result.add(name, "baseline" if label == BASELINE else label,
                   {"backend": label, "bad_samples": timing["bad_samples"],
                    "batches_per_pass": timing["batches_per_pass"]},
                   pairs_per_s=Stats.of([s.e2e_batch * s.e2e_steps / t for t in timing["totals_s"]]),
                   data_wait_share=Stats.of([c.data_wait_share for c in clocks]),
                   repeats=len(clocks),
                   pairs_per_s_in_pass=s.e2e_batch * len(in_pass_s) / sum(in_pass_s) if in_pass_s else None,
                   data_wait_share_in_pass=merged.data_wait_share_in_pass if in_pass_s else None,
                   boundary_wait_ms_signed=Stats.of(extra_ms) if extra_ms else None,
                   pass_boundaries=sum(merged.boundary) or None,
                   batches_per_pass=timing["batches_per_pass"],
                   step_ms=Stats.of(step_ms),
                   step_ms_p50=percentile(step_ms, 50), step_ms_p90=percentile(step_ms, 90),
                   step_ms_p99=percentile(step_ms, 99),
                   gpu_util_pct=timing["gpu_util"])
    rows = {r.params["backend"]: r.name for r in result.rows}
    for label in ("DALI GPU", "DALI CPU", "PyTorch"):
        if label in rows and BASELINE in rows:
            result.compare(f"train loop pairs/s, {label} vs {BASELINE} loader", rows[label], rows[BASELINE],
                           "pairs_per_s")
    result.markdown_extra = (
        f"{s.e2e_repeats} timed windows of {s.e2e_steps} steps after {s.warmup} warm-up steps: pairs/s and data wait "
        "are the median (min-max) over the windows. Boundary steps: the first step of a new pass (its loader "
        "switched to the re-dealt shards); boundary wait ms is their wait beyond the median wait within a pass "
        "(about 0 when the reader prepared ahead had its first batch ready, negative when that batch came faster "
        "than a typical one; N/A: no boundary in the timed steps). "
        f"{BASELINE} has no pass boundary.")
    return result
