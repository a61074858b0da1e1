"""Resume: find the checkpoint to continue from, check it belongs to this run's config, restore everything from it.

``run.resume`` is "auto" (the newest loadable checkpoint in the run directory; truncated or foreign files are
skipped with a warning), "none", a path, or ``wandb:NAME[:ALIAS]`` (a checkpoint logged as a W&B artifact, fetched
by ``training.telemetry.checkpoint_from_artifact``). A checkpoint stores the config of the run that wrote it;
resuming with a different model, data stream or optimisation would silently train something else, so every such
field that differs is named in a one-line error. What only changes how long the run is, what it logs and how often
it checkpoints may change, with one warning line.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import distributed
from config import ConfigError
from training.checkpoint import list_checkpoints, load_checkpoint, restore_rng_state


class ResumeError(ConfigError):
    """``run.resume`` names something this run cannot continue from: not a checkpoint, or another config's run."""


# Fields that may differ between the checkpoint's run and this one: length, cadence, logging, evaluation, where the
# run directory and the shards live. Every other field shapes the model, the data stream or the optimisation.
RESUMABLE = frozenset({
    "run.run_dir", "run.resume", "run.total_steps", "run.total_samples", "run.log_every", "run.checkpoint_every_steps",
    "run.checkpoint_every_minutes", "run.keep_checkpoints", "run.dist_timeout_s", "run.image_log_every",
    "run.knn_every", "run.knn_train", "run.knn_val", "run.knn_k", "run.knn_t", "run.torch_threads",
    "data.shards", "data.prefetch", "data.max_bad_samples",
})
RESUMABLE_PREFIXES = ("run.wandb_",)


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues."""

    path: Path
    step: int
    pairs_seen: int
    wandb_run_id: str | None


def _is_checkpoint(state: Any) -> bool:
    return isinstance(state, dict) and "step" in state and "model" in state


def find_resume_checkpoint(resume: str, directory: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None]:
    """Resolve ``run.resume``: "none", "auto" (newest loadable checkpoint in ``directory``) or an explicit path.

    Returns:
        (path, state), or (None, None) when there is nothing to resume.

    Raises:
        ResumeError: an explicit path that does not exist or is not a training checkpoint.
    """
    if resume == "none":
        return None, None
    if resume != "auto":
        path = Path(resume)
        if not path.is_file():
            raise ResumeError(f"run.resume: checkpoint not found: {path}")
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - whatever torch.load makes of a foreign file, it is not a checkpoint
            first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise ResumeError(f"run.resume: {path} is not a checkpoint of this project ({first})") from None
        if not _is_checkpoint(state):
            raise ResumeError(f"run.resume: {path} is not a training checkpoint (no step and model in it)")
        return path, state
    for path in list_checkpoints(directory):
        try:
            state = load_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, the next one is tried
            warnings.warn(f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}",
                          stacklevel=2)
            continue
        if not _is_checkpoint(state):
            warnings.warn(f"skipping checkpoint {path}: not a training checkpoint", stacklevel=2)
            continue
        return path, state
    return None, None


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    return {f"{group}.{key}": value for group, fields in config.items() if isinstance(fields, dict)
            for key, value in fields.items()}


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Compare the checkpoint's config with this run's, field by field.

    Fields only one side knows (added or renamed since the checkpoint was written) are not compared.

    Returns:
        (forbidden, allowed): ``"group.field old -> new"`` for each differing field that must match (model,
        data stream, optimisation, seed) and for each that may change on resume (:data:`RESUMABLE`).
    """
    old, new = _flat(saved), _flat(current)
    forbidden, allowed = [], []
    for name in new:
        if name in old and old[name] != new[name]:
            change = f"{name} {old[name]!r} -> {new[name]!r}"
            resumable = name in RESUMABLE or name.startswith(RESUMABLE_PREFIXES)
            (allowed if resumable else forbidden).append(change)
    return forbidden, allowed


def resolve_artifact(resume: str, config: dict[str, Any], dist: Any) -> str:
    """``run.resume`` with a ``wandb:NAME[:ALIAS]`` artifact replaced by its local checkpoint file (else unchanged).

    Rank 0 fetches (online: a download) and shares the path or the error, so every rank stops with the same line.

    Raises:
        training.telemetry.ArtifactError: unknown artifact or alias, missing or altered file (a user error, exit 2).
    """
    from training.telemetry import ARTIFACT_PREFIX, ArtifactError, checkpoint_from_artifact

    if not resume.startswith(ARTIFACT_PREFIX):
        return resume
    run = config["run"]
    outcome: str | ArtifactError | None = None
    if dist.is_main:
        try:
            outcome = str(checkpoint_from_artifact(resume, run["run_dir"], run["wandb_mode"], run["wandb_project"],
                                                   run["wandb_entity"]))
        except ArtifactError as exc:
            outcome = exc
    outcome = distributed.broadcast_object(outcome)
    if isinstance(outcome, ArtifactError):
        raise outcome
    return outcome


def load_resume_state(resume: str, directory: str | os.PathLike, config: dict[str, Any],
                      verbose: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """Find and load the checkpoint to resume from and check its config against ``config`` (this run's).

    Args:
        resume: ``run.resume``.
        directory: the run's checkpoint directory.
        config: this run's resolved config as a nested dict.
        verbose: print the warning line about allowed changes (rank 0).

    Raises:
        ResumeError: not a checkpoint, or fields that shape the run differ (each named, old -> new).
    """
    path, state = find_resume_checkpoint(resume, directory)
    if state is None:
        return None, None
    forbidden, allowed = config_changes(state.get("config") or {}, config)
    if forbidden:
        raise ResumeError(f"checkpoint {path} was written with a different config: {'; '.join(forbidden)}. "
                          "Use the checkpoint's values (its run_dir/config.yaml), or a new --run-dir to start over")
    if allowed and verbose:
        length = any(c.startswith(("run.total_steps ", "run.total_samples ")) for c in allowed)
        schedule = " (the lr and momentum schedules follow the new length)" if length else ""
        print(f"warning: resuming {path.name} with {'; '.join(allowed)}{schedule}", file=sys.stderr, flush=True)
    return path, state


def restore(path: Path, state: dict[str, Any], dist: Any, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scaler: torch.amp.GradScaler, loader: Any, bad_data: Any = None) -> ResumePoint:
    """Load model, optimiser, scaler, this rank's loader position and RNG state, and the run's damaged data
    (into ``bad_data``, a :class:`training.bad_data.BadDataLedger`, when given) from a checkpoint.

    A checkpoint written by another number of ranks restores the weights, optimiser and damaged data only: the data
    order restarts (said on stderr), since loader positions and RNG streams are per rank. The damaged data found so
    far still counts towards ``data.max_bad_samples`` (a checkpoint written before the ledger existed has none; its
    loaders' own logs are shared at the first log point).

    Returns:
        The step, pairs seen and W&B run id to continue from.
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if bad_data is not None and "bad_data" in state:
        bad_data.load_state_dict(state["bad_data"])
    if len(state["loader"]) == dist.world_size:
        loader.load_state_dict(state["loader"][dist.rank])
        restore_rng_state(state["rng"][dist.rank], dist.device)
    elif dist.is_main:
        print(f"warning: checkpoint was written by {len(state['loader'])} ranks, this run has {dist.world_size}: "
              "data order restarts (not an exact resume)", file=sys.stderr)
    point = ResumePoint(path, int(state["step"]), int(state["pairs_seen"]), state.get("wandb_run_id"))
    if dist.is_main:
        print(f"resumed from {path} at step {point.step} ({point.pairs_seen} pairs seen)", flush=True)
    return point
