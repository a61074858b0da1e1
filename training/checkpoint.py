"""Checkpoints: one dict with everything needed to resume exactly, written atomically by rank 0, loaded without pickle.

A checkpoint holds the model (both encoders, heads, queue and pointer), optimiser, grad scaler, step, pairs seen,
every rank's data-loader position and RNG states, the run's distinct damaged data (``training.bad_data``), the
resolved config and the W&B run id. :class:`Checkpointer`
gathers the ranks' parts and rank 0 writes them to a temporary file, fsyncs and renames it, so a reader sees a
complete checkpoint or none; the newest ``keep`` are kept. A write that cannot succeed leaves the earlier
checkpoints as they were: free space is checked first (against the last checkpoint's size), a failed write removes
its temporary file, temporary files of writers that died (SIGKILL mid-write) are swept when a run starts, and a
model whose weights are no longer finite is never written. ``torch.load(weights_only=True)`` refuses arbitrary
pickled objects, so only tensors and plain containers go in.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

import distributed

CHECKPOINT_RE = re.compile(r"^step-(\d{9})\.pt$")
TEMPORARY_RE = re.compile(r"^\.step-\d{9}\.pt\.tmp-(\d+)$")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the earlier checkpoints are untouched."""


class NonFiniteState(RuntimeError):
    """The model's weights are NaN or infinite: writing them would replace the last good checkpoint with garbage."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}.pt"


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, newest (highest step) first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)), reverse=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def sweep_temporary_files(directory: str | os.PathLike) -> list[Path]:
    """Delete the ``.step-*.pt.tmp-PID`` files of writers that are gone (killed mid-write); return what was removed.

    This process's own PID counts as gone: it has written nothing yet, and a container restarts a job under the
    same PID, which would otherwise keep a dead run's leftovers forever.
    """
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for path in directory.iterdir():
        match = TEMPORARY_RE.match(path.name)
        if match and (int(match.group(1)) == os.getpid() or not _pid_alive(int(match.group(1)))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def free_bytes(directory: str | os.PathLike) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s filesystem."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """The tensors of a nested container of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    return []


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested container (a lower bound for its size on disk)."""
    return sum(t.numel() * t.element_size() for t in tensors_in(obj))


def save_checkpoint(state: dict[str, Any], directory: str | os.PathLike, step: int, keep: int) -> Path:
    """Write ``state`` atomically as ``directory/step-<step>.pt`` and delete all but the newest ``keep``.

    Before writing, checkpoints beyond the newest ``keep`` are removed and the free space is checked against
    the size of the last checkpoint (or the state's tensors for the first one).

    Args:
        state: plain containers and tensors only (it must load with ``weights_only=True``).
        directory: checkpoint directory (created).
        step: optimiser steps completed; names the file.
        keep: how many checkpoints to keep.

    Returns:
        The path written.

    Raises:
        CheckpointWriteError: not enough free space, or the write failed; no temporary file is left behind and
            every earlier checkpoint is as it was.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(directory)
    for old in existing[keep:]:
        old.unlink(missing_ok=True)
    final = directory / checkpoint_name(step)
    last = existing[0] if existing else None
    needed = max(last.stat().st_size if last is not None else 0, tensor_bytes(state))
    needed = int(needed * 1.05) + (1 << 20)  # loader states and pickling overhead vary a little between writes
    free = free_bytes(directory)
    resumable = f"the run resumes from {last.name} when relaunched" if last is not None else "no checkpoint exists yet"
    if free < needed:
        raise CheckpointWriteError(
            f"not enough free space for checkpoint {final}: {free / 2**20:.0f} MiB free, about "
            f"{needed / 2**20:.0f} MiB needed; free space or lower --keep-checkpoints ({resumable})")
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write (ENOSPC, EIO) as RuntimeError
        tmp.unlink(missing_ok=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointWriteError(f"writing checkpoint {final} failed ({reason}; {free_bytes(directory) / 2**20:.0f} "
                                   f"MiB free); {resumable}") from None
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


def all_finite(obj: Any) -> bool:
    """True when every floating-point tensor in a nested container is free of NaN and infinity (one host sync)."""
    checks = [torch.isfinite(t).all() for t in tensors_in(obj) if torch.is_floating_point(t)]
    return bool(torch.stack(checks).all()) if checks else True


class Checkpointer:
    """Writes the run's checkpoints: every rank's loader position and RNG state, one file written by rank 0.

    Every rank calls :meth:`save` at the same step (it holds collectives); the outcome is shared, so a refused
    or failed write stops every rank with the same message.

    Args:
        directory: where the checkpoints go (``run_dir/checkpoints``); temporary files of dead writers are swept.
        keep: how many checkpoints to keep.
        dist: this process's place in the job.
        config: the resolved config as a nested dict (stored in every checkpoint).
        model, optimizer, scaler, loader: what is saved (the loader must have ``state_dict()``).
        run_id: the W&B run id, stored so a resumed run continues the same W&B run.
        start_step: the step of the checkpoint this run resumed from (it needs no second write), or None.
        on_saved: called on rank 0 with (path, step) after each write (e.g. upload as a W&B artifact).
        bad_data: the run's ledger of damaged data (:class:`training.bad_data.BadDataLedger`), or None. Each
            save's gather also exchanges what the ranks found since the last log point, so the ledger written is
            complete (the ``loader`` must then have ``dropped_shards`` and ``bad_sample_locations``).
    """

    def __init__(self, directory: str | os.PathLike, keep: int, dist: Any, config: dict[str, Any],
                 model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, loader: Any,
                 run_id: str | None = None, start_step: int | None = None, on_saved: Any = None,
                 bad_data: Any = None):
        self.directory = Path(directory)
        self.keep, self.dist, self.config = keep, dist, config
        self.model, self.optimizer, self.scaler, self.loader = model, optimizer, scaler, loader
        self.run_id, self.on_saved, self.bad_data = run_id, on_saved, bad_data
        if dist.is_main:
            for path in sweep_temporary_files(self.directory):
                print(f"removed {path.name}, left by a checkpoint write that was interrupted", flush=True)
        newest = list_checkpoints(self.directory)
        self.last_path: Path | None = newest[0] if newest else None
        self.last_step = start_step  # the step the model is at when it matches a checkpoint on disk (resumed)

    def save(self, step: int, pairs_seen: int) -> Path:
        """Write the checkpoint of ``step`` (a collective: every rank calls it at the same step).

        Raises:
            NonFiniteState: the weights are NaN or infinite (nothing is written).
            CheckpointWriteError: the write failed (nothing is left half-written).
        """
        # The loader's state first: taking it counts the damage its checks ahead of a window found meanwhile, which
        # the ledger must then hold too.
        loader_state = self.loader.state_dict()
        unseen = [] if self.bad_data is None else self.bad_data.unseen(self.loader.dropped_shards,
                                                                       self.loader.bad_sample_locations)
        parts = distributed.all_gather_object({"loader": loader_state, "rng": capture_rng_state(self.dist.device),
                                                "bad_data": unseen})
        if self.bad_data is not None:
            for part in parts:  # on every rank, in rank order: the ledgers stay identical
                self.bad_data.merge(part["bad_data"])
        failure = None
        if self.dist.is_main:
            model_state = self.model.state_dict()
            kept = (f"the last good checkpoint {self.last_path} is kept" if self.last_path
                    else "no checkpoint was written")
            try:
                if not all_finite(model_state):
                    raise NonFiniteState(f"the weights are NaN or infinite at step {step}: training diverged; {kept} "
                                         "(lower --lr / --base-lr, add --warmup-steps or --grad-clip)")
                save_checkpoint({
                    "model": model_state, "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                    "step": step, "pairs_seen": pairs_seen, "loader": [p["loader"] for p in parts],
                    "rng": [p["rng"] for p in parts], "config": self.config, "wandb_run_id": self.run_id,
                    "world_size": self.dist.world_size,
                    **({"bad_data": self.bad_data.state_dict()} if self.bad_data is not None else {}),
                }, self.directory, step, self.keep)
            except (NonFiniteState, CheckpointWriteError) as exc:
                failure = exc
        failure = distributed.broadcast_object(failure)  # every rank stops with rank 0's message
        if failure is not None:
            raise failure
        self.last_path, self.last_step = self.directory / checkpoint_name(step), step
        if self.dist.is_main and self.on_saved is not None:
            self.on_saved(self.last_path, step)
        return self.last_path


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
