"""What a run shows and records: the progress line, metrics.jsonl, W&B (optional), summary.json and the loss curve.

Only rank 0 writes. Metrics arrive already reduced (train.py reduces them every ``log_every`` steps, the only
time the host waits for the device). W&B is used when installed and ``run.wandb_mode`` is not "disabled"; the
run id is chosen here, stored in checkpoints and reused on resume (``resume="allow"``) so a preempted run stays
one W&B run.
"""

from __future__ import annotations

import json
import math
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.recipes import IMAGENET_MEAN, IMAGENET_STD


def new_run_id() -> str:
    return secrets.token_hex(4)


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


class RunLogger:
    """Rank-0 sink for metrics: console progress, JSON lines, W&B.

    Args:
        run_dir: the run directory (metrics.jsonl, summary.json, loss_curve.png go here).
        config: the resolved config as a nested dict (stored in W&B).
        total_steps: planned optimiser steps (for the ETA).
        enabled: False on ranks other than 0 (every call becomes a no-op).
        wandb_mode, wandb_project, wandb_entity: W&B settings; mode "disabled" skips W&B entirely.
        run_id: W&B run id to resume, or None to start a new one.
    """

    def __init__(self, run_dir: Path, config: dict[str, Any], total_steps: int, enabled: bool,
                 wandb_mode: str = "offline", wandb_project: str = "moco", wandb_entity: str = "",
                 run_id: str | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.run_id = run_id or new_run_id()
        self.wandb = None
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self._start = time.monotonic()
        self._progress = None
        if not enabled:
            return
        self._progress = _live_progress(total_steps)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        if wandb_mode != "disabled":
            try:
                import wandb
            except ImportError:
                print("wandb is not installed: logging to metrics.jsonl only", file=sys.stderr)
            else:
                self.wandb = wandb.init(
                    project=wandb_project, entity=wandb_entity or None, id=self.run_id, resume="allow",
                    config=config, dir=str(self.run_dir), mode=wandb_mode,
                )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics reduced at ``step`` and print the progress line."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        self.history.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        elapsed = time.monotonic() - self._start
        pairs_per_s = metrics.get("pairs_per_s", 0.0)
        remaining = (self.total_steps - step) * metrics.get("step_time_s", 0.0)
        fields = (
            f"loss {metrics.get('loss', math.nan):.4f}  "
            f"acc1 {metrics.get('acc1', math.nan):5.1f}  lr {metrics.get('lr', 0):.4g}  "
            f"{pairs_per_s:8.1f} pairs/s  data-wait {100 * metrics.get('data_wait_share', 0):4.1f}%  "
            f"elapsed {_hms(elapsed)}  ETA {_hms(remaining)}"
        )
        if metrics.get("bad_samples"):
            fields += f"  bad samples {int(metrics['bad_samples'])}"
        if self._progress is not None:  # a terminal: one live bar + metrics, updated in place
            progress, task = self._progress
            progress.update(task, completed=step, metrics=fields)
        else:  # a log file (cluster jobs): one line per log step
            print(f"step {step:>7d}/{self.total_steps}  {fields}", flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record evaluation results (e.g. kNN top-1) at ``step``."""
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        print(f"step {step:>7d}  " + "  ".join(f"{k} {v:.2f}" for k, v in metrics.items()), flush=True)

    def log_images(self, step: int, view_q: torch.Tensor, view_k: torch.Tensor) -> None:
        """Log a grid of example (query, key) view pairs."""
        if not self.enabled or self.wandb is None:
            return
        import wandb

        grid = view_pair_grid(view_q, view_k).numpy()
        self.wandb.log({"views": wandb.Image(grid, caption="query | key")}, step=step)

    def log_checkpoint_artifact(self, path: Path, step: int) -> None:
        if not self.enabled or self.wandb is None:
            return
        import wandb

        artifact = wandb.Artifact(f"checkpoint-{self.run_id}", type="model", metadata={"step": step})
        artifact.add_file(str(path))
        self.wandb.log_artifact(artifact)

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
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self._plot_loss()
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
            self.wandb.finish()
        self._jsonl.close()
        return summary

    def _plot_loss(self) -> None:
        # A resumed run appends to metrics.jsonl: the last record of a step wins.
        by_step = {}
        for line in (self.run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                by_step[record["step"]] = record["loss"]
        if not by_step:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = sorted(by_step)
        ax.plot(steps, [by_step[s] for s in steps], marker=".")
        ax.set_xlabel("step")
        ax.set_ylabel("InfoNCE loss")
        ax.set_title("MoCo pre-training loss")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.run_dir / "loss_curve.png", dpi=100)
        plt.close(fig)


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
    progress = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=24), TimeRemainingColumn(),
                        TextColumn("{task.fields[metrics]}"), console=console)
    task = progress.add_task("train", total=total_steps, metrics="")
    progress.start()
    return progress, task


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
