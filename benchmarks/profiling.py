"""Instruments around a measured region: a torch.profiler trace (``--profile``, never sprinkled in loops) and the
GPU utilisation NVML reports (sampled by ``nvidia-smi``; pynvml is often not installed)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
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


class GpuUtilSampler:
    """Context manager: mean ``utilization.gpu`` (%) of one GPU while the region runs, or None where unmeasurable.

    Runs ``nvidia-smi --query-gpu=utilization.gpu -lms 100`` beside the region (no host sync, no work in the
    measured process); falls back to one ``torch.cuda.utilization`` read at exit when nvidia-smi is absent.
    NVML's figure is the share of time at least one kernel was running, not how busy the SMs were.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.mean: float | None = None
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> GpuUtilSampler:
        if self.device.type == "cuda" and shutil.which("nvidia-smi"):
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc: object) -> bool:
        if self._proc is not None:
            self._proc.terminate()
            out, _ = self._proc.communicate(timeout=10)
            values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
            self.mean = sum(values) / len(values) if values else None
        elif self.device.type == "cuda":
            try:
                self.mean = float(torch.cuda.utilization(self.device))
            except Exception:  # pynvml missing or NVML unavailable: not measurable here
                self.mean = None
        return False
