"""The metrics window: step metrics summed on the device, read and reduced over ranks only every ``log_every`` steps.

Reading a device tensor (``.item()``, ``.tolist()``) makes the host wait for every queued kernel, so a per-step read
would serialise the host with the GPU. The window adds each step's loss and accuracies into device tensors (no sync)
and times the host's wait for data; :meth:`MetricsWindow.read` syncs once, averages over the window and the ranks,
turns the wall time into throughput and starts the next window. Time spent on evaluation inside a window
(:meth:`MetricsWindow.paused`) is not training time and is left out of throughput and step time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator

import torch

import distributed


class TrainingFault(RuntimeError):
    """A reason to stop the run that every rank sees in the same reduced values (reported once, as one line)."""


class NonFiniteLoss(TrainingFault):
    """The loss averaged over a log window is NaN or infinite: the run cannot recover from here."""


class TooManyBadSamples(TrainingFault):
    """More distinct corrupt samples were skipped, over all ranks and passes, than ``data.max_bad_samples`` allows."""


class MetricsWindow:
    """Running sums of per-step device metrics and host timings between two log steps.

    Args:
        device: where the step's metrics live.
        pairs_per_step: pairs one step consumes over all ranks (the global batch), for pairs/s.
        names: the metrics of a step, summed and averaged.
    """

    def __init__(self, device: torch.device, pairs_per_step: int, names: tuple[str, ...] = ("loss", "acc1", "acc5")):
        self.device = device
        self.pairs_per_step = pairs_per_step
        self.names = names
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(len(self.names), device=self.device)
        self.steps = 0
        self.data_wait_s = 0.0
        self.excluded_s = 0.0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        """Time the block as the host waiting for the next batch."""
        t0 = time.perf_counter()
        yield
        self.data_wait_s += time.perf_counter() - t0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's wall time (evaluation, image logging) out of the window's training time."""
        self._sync()  # steps queued before the block must be counted as training, not as the block's time
        t0 = time.perf_counter()
        yield
        self._sync()
        self.excluded_s += time.perf_counter() - t0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """Add one step's metrics (0-dim device tensors): device-side adds only, no host sync."""
        self.sums += torch.stack([metrics[k].float() for k in self.names])
        self.steps += 1

    def read(self, **counts: float) -> dict[str, float]:
        """Averages over the window and the ranks, throughput and data-wait share; starts the next window.

        This is the only place the host waits for the device in the loop (a collective every rank reaches).

        Args:
            counts: host-side counters of this rank (e.g. damaged items it has not shared yet), summed over ranks
                in the same all-reduce as the metrics.

        Returns:
            Each metric's mean over the window and the ranks, each count's sum over ranks, ``pairs_per_s``,
            ``step_time_s`` and ``data_wait_share`` (of training time).
        """
        local = torch.cat([self.sums / max(self.steps, 1),
                           torch.tensor([float(v) for v in counts.values()], device=self.device)])
        totals = distributed.all_reduce_sum(local).tolist()
        self._sync()
        train_s = max(time.perf_counter() - self.start - self.excluded_s, 1e-9)
        steps = max(self.steps, 1)
        world = distributed.world_size()
        out = {name: total / world for name, total in zip(self.names, totals)}
        out.update({name: int(total) for name, total in zip(counts, totals[len(self.names):])})
        out.update(pairs_per_s=self.steps * self.pairs_per_step / train_s, step_time_s=train_s / steps,
                   data_wait_share=min(self.data_wait_s / train_s, 1.0))
        self._reset()
        return out

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def check_window(step: int, logged: dict[str, float], max_bad_samples: int, last_checkpoint: object,
                 bad_examples: list[str]) -> None:
    """Stop the run on what a log window shows (every rank sees the same reduced values, so all stop together).

    Args:
        step: the step the window ends at.
        logged: :meth:`MetricsWindow.read` with ``bad_samples``, the run's distinct lost samples
            (``training.bad_data.BadDataLedger.count``, the same on every rank).
        max_bad_samples: ``data.max_bad_samples``.
        last_checkpoint: the newest checkpoint on disk (named in the message), or None.
        bad_examples: a few of the damaged shards and samples, from any rank (named in the message).

    Raises:
        NonFiniteLoss: the mean loss is NaN or infinite.
        TooManyBadSamples: more than ``max_bad_samples`` distinct corrupt samples were skipped over all ranks.
    """
    if not math.isfinite(logged["loss"]):
        kept = f"the last good checkpoint {last_checkpoint} is kept" if last_checkpoint else "no checkpoint was written"
        raise NonFiniteLoss(f"loss is {logged['loss']} in the log window ending at step {step}: training diverged; "
                            f"{kept} (lower --lr / --base-lr, add --warmup-steps or --grad-clip)")
    if logged.get("bad_samples", 0) > max_bad_samples:
        raise TooManyBadSamples(
            f"{logged['bad_samples']} corrupt samples skipped (> data.max_bad_samples={max_bad_samples}): the shards "
            f"look broken, e.g. {', '.join(bad_examples[:3])}; check them with "
            "`python -m shards verify`, or raise --max-bad-samples")
