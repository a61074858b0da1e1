"""GPU utilisation over a region, sampled by ``nvidia-smi`` in the background (pynvml is often not installed)."""

from __future__ import annotations

import shutil
import subprocess

import torch


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
