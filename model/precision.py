"""Mixed precision: which autocast dtype a run uses, and whether autocast is on right now."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means fp32 without autocast.

    ``auto`` is bf16 on CUDA devices that support it (no loss scaling needed), fp32 otherwise (CPU autocast
    is slower than fp32 on most CPUs). ``fp16`` needs a GradScaler: ``GradScaler(enabled=dtype is torch.float16)``.

    Args:
        precision: OptimConfig.precision, one of auto, bf16, fp16, fp32.
        device: the training device.
    """
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    raise ValueError(f"precision must be auto, bf16, fp16 or fp32; got {precision!r}")


def active_autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` at this moment, or None when autocast is off there."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: per-device functions
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    if not enabled:
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
