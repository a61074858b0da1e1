"""Wall-clock measurement that a GPU user can trust: warm-up excluded, device synchronised, median of repeats.

CUDA kernels run asynchronously, so reading ``time.perf_counter()`` right after a launch measures the launch,
not the work. Every clock read here is preceded by :func:`synchronize` on the measured device; one repeat
times ``iters`` back-to-back calls (so per-call launch jitter averages out) and the figure reported is the
median over repeats with the min and max next to it.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU, where work is already done when a call returns)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Stats:
    """Median, min and max of one figure over ``n`` repeats."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("Stats.of needs at least one value")
        return cls(float(statistics.median(values)), float(min(values)), float(max(values)), len(values))

    def scaled(self, factor: float) -> Stats:
        """The same statistics multiplied by a positive ``factor`` (keeps min <= median <= max)."""
        lo, hi = sorted((self.min * factor, self.max * factor))
        return Stats(self.median * factor, lo, hi, self.n)

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Throughput:
    """Items per second and seconds per call, each as Stats over repeats."""

    items_per_s: Stats
    seconds_per_call: Stats


def measure(fn: Callable[[], object], *, items_per_call: int, warmup: int, iters: int, repeats: int,
            device: torch.device | str | None = None) -> Throughput:
    """Time ``fn`` after ``warmup`` untimed calls: ``repeats`` repeats of ``iters`` calls each.

    Args:
        fn: one unit of work (a training step, a loader batch); its return value is ignored.
        items_per_call: images (or pairs) processed by one call, to turn time into throughput.
        warmup: untimed calls first (allocator, cuDNN autotune, compile, loader pipelines filling).
        iters: calls per timed repeat.
        repeats: timed repeats; the median is reported with min and max.
        device: the device whose queue is drained before each clock read.

    Returns:
        Throughput with items/s and s/call over the repeats.
    """
    if iters < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"need iters >= 1, repeats >= 1, warmup >= 0; got {iters}, {repeats}, {warmup}")
    for _ in range(warmup):
        fn()
    per_call: list[float] = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - start) / iters)
    seconds = Stats.of(per_call)
    rates = Stats.of([items_per_call / s for s in per_call])
    return Throughput(items_per_s=rates, seconds_per_call=seconds)


def measure_interleaved(fns: dict[str, Callable[[], object]], *, items_per_call: int, iters: int, repeats: int,
                        device: torch.device | str | None = None) -> dict[str, Throughput]:
    """Time several already warmed-up ``fns`` in alternating rounds: round r times every fn once.

    On a shared or thermally throttling machine the speed drifts over seconds; timing configurations one
    after the other turns that drift into fake differences, alternating rounds spreads it over all of them,
    so ours and the baseline see the same conditions. Args as in :func:`measure` (no warm-up here).
    """
    if iters < 1 or repeats < 1:
        raise ValueError(f"need iters >= 1 and repeats >= 1; got {iters}, {repeats}")
    per_call: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            synchronize(device)
            per_call[name].append((time.perf_counter() - start) / iters)
    return {name: Throughput(items_per_s=Stats.of([items_per_call / x for x in xs]), seconds_per_call=Stats.of(xs))
            for name, xs in per_call.items()}


class StepClock:
    """Per-step timestamps for a loop: how long each step waited for data and how long it took in all.

    Usage::

        clock = StepClock(device)
        for _ in range(steps):
            clock.start()
            batch = next(loader)
            clock.data_ready()
            train_step(batch)
            clock.stop()

    ``stop()`` always synchronises, so a step's time is its real device time. With ``sync_before_data=False``
    ``start()`` and ``data_ready()`` do not synchronise (the previous ``stop()`` already drained the device), so
    the measured wait is exactly the time the host blocked in ``next()`` while the device sat idle.
    """

    def __init__(self, device: torch.device | str | None, sync_before_data: bool = True):
        self.device = device
        self.sync_before_data = sync_before_data
        self.wait_s: list[float] = []
        self.step_s: list[float] = []
        self._t0 = self._t1 = 0.0

    def start(self) -> None:
        if self.sync_before_data:
            synchronize(self.device)
        self._t0 = time.perf_counter()

    def data_ready(self) -> None:
        if self.sync_before_data:
            synchronize(self.device)
        self._t1 = time.perf_counter()

    def stop(self) -> None:
        synchronize(self.device)
        end = time.perf_counter()
        self.wait_s.append(self._t1 - self._t0)
        self.step_s.append(end - self._t0)

    @property
    def data_wait_share(self) -> float:
        """Fraction of the loop's time spent waiting for the next batch."""
        total = sum(self.step_s)
        return sum(self.wait_s) / total if total > 0 else float("nan")
