"""What a run shows and records: the progress bar, metrics.jsonl, W&B (optional), summary.json and the loss curve.

Only rank 0 writes. Metrics arrive already reduced (train.py reduces them every ``log_every`` steps, the only
time the host waits for the device); between those steps :meth:`RunLogger.advance` moves the bar without reading
any device value. Every metrics.jsonl record and every plain log line carries a UTC timestamp.

W&B is used when installed and ``run.wandb_mode`` is not "disabled" (offline needs no account or network). Training
metrics go to W&B as ``train/<name>``, evaluations as ``eval/<name>``; the run takes its name, tags, group and notes
from ``run.wandb_*``; the end-of-run summary (throughput, step-time percentiles) is written to the W&B summary as it
is to summary.json. The run id is chosen here, stored in checkpoints and reused on resume (``resume="allow"``) so a
preempted run stays one W&B run; :func:`checkpoint_from_artifact` fetches a checkpoint logged as a W&B artifact.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import math
import os
import secrets
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.recipes import IMAGENET_MEAN, IMAGENET_STD


def new_run_id() -> str:
    return secrets.token_hex(4)


def utc_now() -> str:
    """The current time as ISO 8601 UTC with milliseconds (``2026-12-03T22:41:07.123Z``), as logs carry it."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def infonce_chance_loss(queue_size: int) -> float:
    """InfoNCE loss of an encoder that cannot tell the positive from the K negatives: ln(K + 1)."""
    return math.log(queue_size + 1)


def view_pair_grid(view_q: torch.Tensor, view_k: torch.Tensor, max_pairs: int = 8) -> torch.Tensor:
    """Denormalised query/key views side by side: an (H*P) x (2W) x 3 uint8 image, one pair per row.

    Args:
        view_q, view_k: N x 3 x H x W normalised views (any dtype / memory format / device).
    """
    n = min(max_pairs, view_q.shape[0])
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    q = view_q[:n].detach().float().cpu() * std + mean
    k = view_k[:n].detach().float().cpu() * std + mean
    rows = torch.cat([q, k], dim=3)  # n x 3 x H x 2W
    grid = torch.cat(list(rows), dim=1)  # 3 x nH x 2W
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def start_wandb(mode: str, project: str, config: dict[str, Any], directory: str | os.PathLike | None,
                entity: str = "", run_id: str | None = None, name: str | None = None,
                tags: Sequence[str] | None = None, group: str | None = None, notes: str | None = None,
                job_type: str | None = None):
    """``wandb.init`` as every entry point here calls it, or None when mode is "disabled" or wandb is not installed.

    "offline" writes the run under ``directory/wandb`` and needs no account or network (``wandb sync`` uploads it
    later); empty name, tags, group and notes leave W&B's defaults.
    """
    if mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        print("wandb is not installed: no W&B logging", file=sys.stderr)
        return None
    return wandb.init(project=project, entity=entity or None, id=run_id, resume="allow" if run_id else None,
                      config=config, dir=str(directory) if directory else None, mode=mode, name=name or None,
                      tags=list(tags or []) or None, group=group or None, notes=notes or None, job_type=job_type)


ARTIFACT_PREFIX = "wandb:"


class ArtifactError(FileNotFoundError):
    """A ``wandb:`` resume source that cannot be resolved to a checkpoint file; the message is one line."""


def checkpoint_from_artifact(spec: str, run_dir: str | os.PathLike, wandb_mode: str = "offline",
                             project: str = "moco", entity: str = "") -> Path:
    """The local checkpoint file of a W&B model artifact, for ``--resume wandb:NAME[:ALIAS]``.

    ``NAME`` is an artifact logged by :meth:`RunLogger.log_checkpoint_artifact` (``checkpoint-<run id>``), optionally
    ``ENTITY/PROJECT/NAME``; ``ALIAS`` is ``latest`` (default), ``step-N`` or ``vN``. Online, the artifact is
    downloaded with the W&B API into ``run_dir/checkpoints/artifacts/`` (credentials as for any online run). Offline
    (or disabled), nothing can be downloaded: the artifact is looked up in the offline runs under ``run_dir/wandb``,
    whose records point at W&B's staged copy of each logged file; that copy is checked against the artifact's
    MD5 digest before use. ``wandb sync`` uploads and then deletes the staged copies: resume a synced run online.

    Raises:
        ArtifactError: an unknown artifact or alias, a missing or altered staged file, or not exactly one file.
    """
    ref = spec[len(ARTIFACT_PREFIX):] if spec.startswith(ARTIFACT_PREFIX) else spec
    name, _, alias = ref.rpartition(":") if ":" in ref else (ref, "", "latest")
    if not name or not alias:
        raise ArtifactError(f"--resume {spec}: expected wandb:NAME[:ALIAS], e.g. wandb:checkpoint-1a2b3c4d:latest")
    if wandb_mode == "online":
        import wandb

        full = name if name.count("/") == 2 else "/".join(x for x in (entity, project, name) if x)
        try:
            artifact = wandb.Api().artifact(f"{full}:{alias}", type="model")
            root = Path(artifact.download(root=str(Path(run_dir) / "checkpoints" / "artifacts" / f"{name.split('/')[-1]}-{alias}")))
        except Exception as exc:  # noqa: BLE001 - the API raises many types (CommError, ValueError, HTTP errors)
            raise ArtifactError(f"--resume {spec}: cannot fetch W&B artifact {full}:{alias} "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
        files = sorted(f for f in root.rglob("*") if f.is_file())
    else:
        files = [_offline_artifact_file(spec, name.split("/")[-1], alias, Path(run_dir) / "wandb")]
    if len(files) != 1:
        raise ArtifactError(f"--resume {spec}: the artifact holds {len(files)} files, expected one checkpoint")
    return files[0]


def _offline_artifact_file(spec: str, name: str, alias: str, wandb_dir: Path) -> Path:
    """The staged file of the newest version of artifact ``name`` with ``alias`` logged by an offline run."""
    from training.wandb_offline import offline_run_files, read_records

    versions: list[tuple[str, list[str], list]] = []  # (digest, aliases, manifest entries), in logging order
    for run_file in offline_run_files(wandb_dir):
        for record in read_records(run_file):
            if record.WhichOneof("record_type") == "artifact" and record.artifact.name == name:
                art = record.artifact
                versions.append((art.digest, list(art.aliases), list(art.manifest.contents)))
    if not versions:
        raise ArtifactError(f"--resume {spec}: no artifact {name!r} in the offline W&B runs under {wandb_dir} "
                            "(offline runs can only resume from artifacts they logged themselves; online: --wandb-mode online)")
    distinct = list(dict.fromkeys(digest for digest, _, _ in versions))  # W&B numbers versions by new digest: v0, v1..
    if alias.startswith("v") and alias[1:].isdigit():
        matches = [v for v in versions if int(alias[1:]) < len(distinct) and v[0] == distinct[int(alias[1:])]]
    else:
        matches = [v for v in versions if alias in v[1]]
    if not matches:
        raise ArtifactError(f"--resume {spec}: artifact {name!r} has no version {alias!r} "
                            f"(aliases: {', '.join(sorted({a for v in versions for a in v[1]}))})")
    entries = matches[-1][2]
    if len(entries) != 1:
        raise ArtifactError(f"--resume {spec}: the artifact holds {len(entries)} files, expected one checkpoint")
    entry = entries[0]
    staged = Path(entry.local_path)
    if not staged.is_file():
        raise ArtifactError(f"--resume {spec}: W&B's staged copy {staged} is gone (deleted by `wandb sync`?); "
                            "resume online with --wandb-mode online")
    digest = hashlib.md5()
    with open(staged, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    if base64.b64encode(digest.digest()).decode() != entry.digest:
        raise ArtifactError(f"--resume {spec}: the staged copy {staged} does not match the artifact's MD5 digest")
    return staged


class RunLogger:
    """Rank-0 sink for metrics: console progress, JSON lines, W&B.

    Args:
        run_dir: the run directory (metrics.jsonl, summary.json, loss_curve.png go here).
        config: the resolved config as a nested dict (stored in W&B).
        total_steps: planned optimiser steps (for the ETA).
        enabled: False on ranks other than 0 (every call becomes a no-op).
        wandb_mode, wandb_project, wandb_entity: W&B settings; mode "disabled" skips W&B entirely.
        run_id: W&B run id to resume, or None to start a new one.
        name, tags, group, notes: the W&B run's display name, tags, group and notes; None takes
            ``run.wandb_name`` / ``wandb_tags`` / ``wandb_group`` / ``wandb_notes`` from ``config`` (empty: W&B's
            own default).
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], total_steps: int, enabled: bool,
                 wandb_mode: str = "offline", wandb_project: str = "moco", wandb_entity: str = "",
                 run_id: str | None = None, *, name: str | None = None, tags: Sequence[str] | None = None,
                 group: str | None = None, notes: str | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.run_id = run_id or new_run_id()
        self.queue_size = (config.get("model") or {}).get("queue_size")
        self.wandb = None
        self.history: list[dict[str, Any]] = []
        self.evals: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self._start = time.monotonic()
        self._progress = None
        self._fields = ""
        if not enabled:
            return
        self._progress = _live_progress(total_steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        run_cfg = config.get("run") or {}
        self.wandb = start_wandb(
            wandb_mode, wandb_project, config, self.run_dir, entity=wandb_entity, run_id=self.run_id,
            name=run_cfg.get("wandb_name") if name is None else name,
            tags=run_cfg.get("wandb_tags") if tags is None else tags,
            group=run_cfg.get("wandb_group") if group is None else group,
            notes=run_cfg.get("wandb_notes") if notes is None else notes, job_type="pretrain")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record training metrics reduced at ``step``; update the bar (terminal) or print one line (log file)."""
        if not self.enabled:
            return
        now = utc_now()
        record = {"step": step, "time": now, **metrics}
        self.history.append(record)
        self._write(record)
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        self._fields = (
            f"loss {metrics.get('loss', math.nan):.4f}  "
            f"acc1 {metrics.get('acc1', math.nan):5.1f}  lr {metrics.get('lr', 0):.4g}  "
            f"{metrics.get('pairs_per_s', 0.0):8.1f} pairs/s  data-wait {100 * metrics.get('data_wait_share', 0):4.1f}%"
        )
        if metrics.get("bad_samples"):
            self._fields += f"  bad samples {int(metrics['bad_samples'])}"
        if self._progress is not None:  # a terminal: one live bar (with rich's ETA) + the last metrics
            progress, task = self._progress
            progress.update(task, completed=step, metrics=self._fields)
        else:  # a log file (cluster jobs): one timestamped line per log step, with its own ETA
            remaining = (self.total_steps - step) * metrics.get("step_time_s", 0.0)
            print(f"{now} step {step:>7d}/{self.total_steps}  {self._fields}  "
                  f"elapsed {_hms(time.monotonic() - self._start)}  ETA {_hms(remaining)}", flush=True)

    def advance(self, step: int) -> None:
        """Move the progress bar to ``step`` (call it every step): no device value is read, so no host sync."""
        if self.enabled and self._progress is not None:
            progress, task = self._progress
            progress.update(task, completed=step)

    def log_eval(self, step: int, metrics: dict[str, float], chance: float | None = None) -> None:
        """Record evaluation results (e.g. kNN top-1 in percent) at ``step``.

        Args:
            step: optimiser steps completed when the evaluation ran.
            metrics: name -> value; W&B gets them as ``eval/<name>``.
            chance: the top-1 (percent) of guessing, drawn as a reference line next to the loss curve.
        """
        if not self.enabled:
            return
        now = utc_now()
        record = {"step": step, "time": now, **metrics}
        if chance is not None:
            record["chance_top1"] = chance
        self.evals.append(record)
        self._write(record)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        line = f"{now} step {step:>7d}  eval " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        if self._progress is not None:
            self._progress[0].console.print(line)  # above the live bar, which stays in place
        else:
            print(line, flush=True)

    def log_images(self, step: int, view_q: torch.Tensor, view_k: torch.Tensor) -> None:
        """Log a grid of example (query, key) view pairs."""
        if not self.enabled or self.wandb is None:
            return
        import wandb

        grid = view_pair_grid(view_q, view_k).numpy()
        self.wandb.log({"train/views": wandb.Image(grid, caption="query | key")}, step=step)

    def log_checkpoint_artifact(self, path: Path, step: int) -> None:
        """Log a checkpoint file as version of the artifact ``checkpoint-<run id>`` (aliases ``latest``, ``step-N``).

        ``--resume wandb:checkpoint-<run id>:latest`` (see :func:`checkpoint_from_artifact`) continues from it.
        """
        if not self.enabled or self.wandb is None:
            return
        import wandb

        artifact = wandb.Artifact(f"checkpoint-{self.run_id}", type="model", metadata={"step": step})
        artifact.add_file(str(path))
        self.wandb.log_artifact(artifact, aliases=["latest", f"step-{step}"])

    def _write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def record_step_time(self, seconds: float) -> None:
        self.step_times.append(seconds)

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write summary.json (throughput and step-time percentiles) and loss_curve.png; close W&B."""
        if not self.enabled:
            return summary
        if self._progress is not None:
            self._progress[0].stop()
        if self.step_times:
            times = sorted(self.step_times)
            summary["step_time_s"] = {
                "p50": statistics.median(times),
                "p90": times[min(len(times) - 1, int(0.9 * len(times)))],
                "p99": times[min(len(times) - 1, int(0.99 * len(times)))],
            }
        if self.evals:
            summary["eval"] = eval_summary(self.evals)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self._plot_loss()
        if self.wandb is not None:
            # The whole summary.json, percentiles included; the train/ history keys keep their last values apart.
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str, dict))})
            self.wandb.finish()
        self._jsonl.close()
        return summary

    def _plot_loss(self) -> None:
        """loss_curve.png: the loss with its chance level ln(K+1); next to it, evaluations with their chance level."""
        # A resumed run appends to metrics.jsonl: the last record of a step wins.
        losses, evals, chance = {}, {}, {}
        for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
            for key, value in record.items():
                if key.endswith("top1") and key != "chance_top1":
                    evals.setdefault(key, {})[record["step"]] = value
                    if "chance_top1" in record:
                        chance[key] = record["chance_top1"]
        if not losses:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
        ax = axes[0, 0]
        steps = sorted(losses)
        ax.plot(steps, [losses[s] for s in steps], marker=".", label="InfoNCE loss")
        if self.queue_size:
            level = infonce_chance_loss(self.queue_size)
            ax.axhline(level, color="grey", linestyle="--", label=f"chance ln(K+1) = {level:.2f} (K={self.queue_size})")
        ax.set_xlabel("step")
        ax.set_ylabel("InfoNCE loss")
        ax.set_title("MoCo pre-training loss")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
        if evals:
            ax = axes[0, 1]
            for key, points in sorted(evals.items()):
                steps = sorted(points)
                line, = ax.plot(steps, [points[s] for s in steps], marker="o", label=key)
                if key in chance:
                    ax.axhline(chance[key], color=line.get_color(), linestyle="--", alpha=0.6,
                               label=f"chance ({chance[key]:.1f}%)")
            ax.set_xlabel("step")
            ax.set_ylabel("top-1 (%)")
            ax.set_title("held-out evaluation (step 0 = random init)")
            ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss_curve.png", dpi=100)
        plt.close(fig)


def eval_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per evaluation metric: its first and last value (step 0 is random init), their difference and chance level."""
    out: dict[str, dict[str, float]] = {}
    for record in sorted(records, key=lambda r: r["step"]):
        for key, value in record.items():
            if key in ("step", "time", "chance_top1") or not isinstance(value, (int, float)):
                continue
            entry = out.setdefault(key, {"first_step": record["step"], "first": value})
            entry.update(last_step=record["step"], last=value, gain=value - entry["first"])
            if "chance_top1" in record:
                entry["chance"] = record["chance_top1"]
    return out


def _live_progress(total_steps: int):
    """A rich progress bar when stdout is a terminal (None otherwise, or without rich): (Progress, task id)."""
    try:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:
        return None
    console = Console()
    if not console.is_terminal:
        return None
    # One ETA: rich's, from the bar's own rate (train.py advances it every step).
    progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=24), TextColumn("ETA"),
                        TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"), console=console)
    task = progress.add_task("train", total=total_steps, metrics="")
    progress.start()
    return progress, task


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
