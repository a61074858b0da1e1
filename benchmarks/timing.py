"""Wall-clock measurement that a GPU user can trust: warm-up excluded, device synchronised, median of repeats.

CUDA kernels run asynchronously, so reading ``time.perf_counter()`` right after a launch measures the launch,
not the work. Every clock read here is preceded by :func:`synchronize` on the measured device; one repeat
times ``iters`` back-to-back calls (so per-call launch jitter averages out) and the figure reported is the
median over repeats with the min and max next to it.

A loader is different: it re-deals its shards at every pass boundary and pays for a new pipeline (or new
workers) there. :func:`measure_loader` times windows of batches and reports the speed of the windows within a
pass apart from the extra time of the windows that crossed a boundary, which gives the rate for any corpus size.
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

    def __post_init__(self) -> None:
        if not (self.min <= self.median <= self.max and isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"Stats need min <= median <= max (all numbers) and n >= 1; got {self}")

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


@dataclass(frozen=True)
class LoaderThroughput:
    """A loader's speed within a pass, apart from the extra time of the windows that crossed a pass boundary.

    With ``s`` seconds per batch within a pass and ``b`` extra seconds per boundary, a corpus of ``B`` batches
    per pass delivers ``B * items / (B * s + b)`` items/s, so these figures give the rate for any corpus size.
    """

    batches_per_pass: int
    items_per_s: Stats | None  # windows within a pass (None when every window crossed a boundary)
    seconds_per_call: Stats | None
    boundary_s: Stats | None  # per crossing window: its time - window x the median in-pass batch time (signed)
    timed_batches: int


def measure_loader(fn: Callable[[], object], *, items_per_call: int, batches_per_pass: int, warmup: int, window: int,
                   windows: int, device: torch.device | str | None = None,
                   boundary_budget_s: float = 0.0) -> LoaderThroughput:
    """Time a loader in consecutive windows of ``window`` batches after ``warmup`` untimed ones.

    ``fn`` must be the loader's ``next`` from the start of its stream, so that call ``j`` (counted from 0) is the
    first batch of a pass when ``j % batches_per_pass == 0``. A window is a whole number of calls timed as one
    (batches come in bursts from worker processes and prefetch queues; a per-call median would measure the
    bursts): the windows that contain a boundary call are the boundary's, the others give the speed within a
    pass. A window, not a single call, is charged for a boundary because a loader that prepares the next pass
    ahead spends that time in the batches before it and may catch up after it.

    Args:
        fn: returns the next batch.
        items_per_call: pairs per batch.
        batches_per_pass: the loader's batches per pass.
        warmup: untimed calls first (pipeline start-up, worker spawn, queues filling).
        window: calls per timed window.
        windows: timed windows at least.
        device: the device whose queue is drained before each clock read.
        boundary_budget_s: after ``windows`` windows with no boundary crossed, keep timing windows until one
            crosses or this many seconds of timing have passed (0: stop after ``windows``).

    Returns:
        LoaderThroughput; its Stats are over windows.
    """
    if batches_per_pass < 1 or window < 1 or windows < 1 or warmup < 0:
        raise ValueError(f"need batches_per_pass, window, windows >= 1 and warmup >= 0; "
                         f"got {batches_per_pass}, {window}, {windows}, {warmup}")
    for _ in range(warmup):
        fn()
    calls, inside, crossing = warmup, [], []
    t_start = time.perf_counter()
    while len(inside) + len(crossing) < windows or (
            not crossing and time.perf_counter() - t_start < boundary_budget_s):
        crosses = any(j > 0 and j % batches_per_pass == 0 for j in range(calls, calls + window))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(window):
            fn()
        synchronize(device)
        (crossing if crosses else inside).append(time.perf_counter() - start)
        calls += window
    per_call = Stats.of([t / window for t in inside]) if inside else None
    rates = Stats.of([items_per_call * window / t for t in inside]) if inside else None
    boundary = Stats.of([t - window * per_call.median for t in crossing]) if crossing and per_call else None
    return LoaderThroughput(batches_per_pass, rates, per_call, boundary, calls - warmup)


def measure_interleaved(fns: dict[str, Callable[[], object]], *, items_per_call: int | dict[str, int], iters: int,
                        repeats: int, device: torch.device | str | None = None) -> dict[str, Throughput]:
    """Time several already warmed-up ``fns`` in alternating rounds: round r times every fn once.

    On a shared or thermally throttling machine the speed drifts over seconds; timing configurations one
    after the other turns that drift into fake differences, alternating rounds spreads it over all of them,
    so ours and the baseline see the same conditions. Args as in :func:`measure` (no warm-up here);
    ``items_per_call`` may differ per fn (a dict by name).
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
    items = items_per_call if isinstance(items_per_call, dict) else dict.fromkeys(fns, items_per_call)
    return {name: Throughput(items_per_s=Stats.of([items[name] / x for x in xs]), seconds_per_call=Stats.of(xs))
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

    ``data_ready(boundary=True)`` marks a step whose batch was the first of a new pass (shards re-dealt, the
    loader's pipeline or workers replaced): on a small corpus those few steps can hold most of the wait, so
    the share is also reported without them, next to their extra wait.
    """

    def __init__(self, device: torch.device | str | None, sync_before_data: bool = True):
        self.device = device
        self.sync_before_data = sync_before_data
        self.wait_s: list[float] = []
        self.step_s: list[float] = []
        self.boundary: list[bool] = []  # per step: its batch was the first of a pass
        self._t0 = self._t1 = 0.0
        self._at_boundary = False

    def start(self) -> None:
        if self.sync_before_data:
            synchronize(self.device)
        self._t0 = time.perf_counter()

    def data_ready(self, boundary: bool = False) -> None:
        if self.sync_before_data:
            synchronize(self.device)
        self._t1 = time.perf_counter()
        self._at_boundary = boundary

    def stop(self) -> None:
        synchronize(self.device)
        end = time.perf_counter()
        self.wait_s.append(self._t1 - self._t0)
        self.step_s.append(end - self._t0)
        self.boundary.append(self._at_boundary)

    @property
    def data_wait_share(self) -> float:
        """Fraction of the loop's time spent waiting for the next batch."""
        total = sum(self.step_s)
        return sum(self.wait_s) / total if total > 0 else float("nan")

    @property
    def data_wait_share_in_pass(self) -> float:
        """The data-wait share over the steps that did not cross a pass boundary (nan when there are none)."""
        inside = [(w, t) for w, t, b in zip(self.wait_s, self.step_s, self.boundary) if not b]
        total = sum(t for _, t in inside)
        return sum(w for w, _ in inside) / total if total > 0 else float("nan")

    @property
    def boundary_extra_wait_s(self) -> list[float]:
        """Per boundary step: its wait minus the median wait of the steps within a pass (empty without both)."""
        inside = [w for w, b in zip(self.wait_s, self.boundary) if not b]
        if not inside:
            return []
        typical = statistics.median(inside)
        return [w - typical for w, b in zip(self.wait_s, self.boundary) if b]
