"""What a benchmark ran on: CPU model and cores, GPU name and count, driver, torch/DALI/CUDA versions, git commit."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS tells us)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from nvidia-smi, or None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    return dali.__version__


def machine_info() -> dict[str, Any]:
    """A JSON-ready description of this machine and its software stack."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_names = [torch.cuda.get_device_name(i) for i in range(gpus)]
    try:
        import torchvision

        tv = torchvision.__version__
    except ImportError:
        tv = None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_cores": usable_cores(),
        "gpu_count": gpus,
        "gpu_names": gpu_names,
        "gpu_name": gpu_names[0] if gpu_names else None,
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if gpus else None,
        "driver": nvidia_driver() if gpus else None,
        "torch": torch.__version__,
        "torchvision": tv,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpus else None,
        "dali": dali_version(),
    }


def device_label(info: dict[str, Any]) -> str:
    """A one-line label for tables and the README: ``1x NVIDIA H100 80GB HBM3`` or ``CPU: AMD EPYC (2 cores)``."""
    if info.get("gpu_count"):
        return f"{info['gpu_count']}x {info['gpu_name']}"
    return f"CPU: {info['cpu_model']} ({info['cpu_cores']} cores)"


def git_provenance() -> dict[str, Any]:
    """The commit measured and whether the tree had uncommitted changes.

    ``BENCH_GIT_COMMIT`` (``<sha>`` or ``<sha>-dirty``) wins: a copy of the code without ``.git``, such as the one
    ``scripts/gpu_measure.sh`` carries to a GPU machine, is told its commit that way.
    """
    given = os.environ.get("BENCH_GIT_COMMIT", "")
    if given:
        return {"commit": given.removesuffix("-dirty"), "dirty": given.endswith("-dirty")}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}
