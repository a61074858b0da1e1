"""Checkpoints: one dict with everything needed to resume exactly, written atomically, loaded without pickle execution.

A checkpoint holds the model (both encoders, heads, queue and pointer), optimiser, grad scaler, step, pairs seen,
every rank's data-loader position and RNG states, the resolved config and the W&B run id. Rank 0 writes it to a
temporary file, fsyncs and renames it, so a reader sees a complete checkpoint or none; the newest ``keep`` are kept.
``torch.load(weights_only=True)`` refuses arbitrary pickled objects, so only tensors and plain containers go in.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^step-(\d{9})\.pt$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, step: int, keep: int) -> Path:
    """Write ``state`` atomically as ``directory/step-<step>.pt`` and delete all but the newest ``keep``.

    Args:
        state: plain containers and tensors only (it must load with ``weights_only=True``).
        directory: checkpoint directory (created).
        step: optimiser steps completed; names the file.
        keep: how many checkpoints to keep.

    Returns:
        The path written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / checkpoint_name(step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True`` (no arbitrary code execution)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_checkpoint(resume: str, directory: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None]:
    """Resolve ``run.resume``: "none", "auto" (newest loadable checkpoint in ``directory``) or an explicit path.

    A truncated or corrupt checkpoint is skipped with a warning under "auto"; an explicit path must load.
    """
    if resume == "none":
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise FileNotFoundError(f"run.resume: checkpoint not found: {path}")
        return path, load_checkpoint(path)
    for path in list_checkpoints(directory):
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, the next one is tried
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}", stacklevel=2)
            continue
        if not isinstance(state, dict) or "step" not in state or "model" not in state:
            warnings.warn(f"skipping checkpoint {path}: not a training checkpoint", stacklevel=2)
            continue
        return path, state
    return None, None


# ----------------------------------------------------------------------------- RNG state as plain tensors


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """Python, NumPy, torch CPU and (when used) CUDA RNG states, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
