"""Optional torch.profiler capture around a measured region, switched by ``--profile`` (never sprinkled in loops)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


@contextlib.contextmanager
def profiled(name: str, out_dir: Path | None) -> Iterator[None]:
    """Record a Chrome trace of the enclosed region into ``out_dir/<name>.trace.json`` (no-op when out_dir is None).

    Open the trace in chrome://tracing or https://ui.perfetto.dev. The top ops by self time are also written
    to ``<name>.top.txt``. Profiling slows the region down: timings taken with it on are marked in the JSON.
    """
    if out_dir is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    out_dir.mkdir(parents=True, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    with profile(activities=activities, record_shapes=False, profile_memory=True) as prof:
        yield
    prof.export_chrome_trace(str(out_dir / f"{safe}.trace.json"))
    sort_by = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    (out_dir / f"{safe}.top.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=25))
