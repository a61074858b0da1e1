"""Wall-clock measurement that a GPU user can trust: warm-up excluded, device synchronised, median of repeats.

CUDA kernels run asynchronously, so reading ``time.perf_counter()`` right after a launch measures the launch,
not the work. Every clock read here is preceded by :func:`synchronize` on the measured device; one repeat
times ``iters`` back-to-back calls (so per-call launch jitter averages out) and the figure reported is the
median over repeats with the min and max next to it.

A loader is different: it re-deals its shards at every pass boundary and pays for a new pipeline (or new
workers) there, so a window of a few batches is either fast or dominated by one boundary, and its median says
nothing. :func:`measure_passes` times whole passes and reports the speed within a pass and the extra cost per
boundary separately, which gives the amortised speed for a corpus of any size.
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


@dataclass(frozen=True)
class PassThroughput:
    """A loader timed over whole passes, split into its speed within a pass and its cost at a pass boundary.

    With ``s`` seconds per batch within a pass and ``b`` extra seconds per boundary, a corpus of ``B`` batches
    per pass delivers ``B * items / (B * s + b)`` items/s: so these figures give the amortised rate for any
    corpus size, not only the benchmark's.
    """

    batches_per_pass: int
    items_per_s: Stats  # amortised over whole passes of the measured corpus (boundary included)
    steady_items_per_s: Stats  # within a pass: the mean over the batches after the first of each pass
    steady_seconds_per_call: Stats
    boundary_s: Stats  # extra seconds per pass: pass time - batches_per_pass x steady batch time (noise: signed)


def measure_passes(fn: Callable[[], object], *, items_per_call: int, batches_per_pass: int, warmup: int, passes: int,
                   device: torch.device | str | None = None) -> PassThroughput:
    """Time ``passes`` whole passes of a loader, one call at a time, each pass starting at its boundary.

    ``fn`` must be the loader's ``next`` from the start of the stream (pass 0, batch 0), so that every
    ``batches_per_pass``-th call crosses a pass boundary. The ``warmup`` untimed calls are rounded up to the end
    of a pass (pipeline start-up is not a boundary cost); each timed pass then begins with the batch that
    crosses the boundary (re-dealt shards, new pipeline or workers). Per pass: the steady batch time is the
    mean of its calls after the first (a mean, not a median, because worker processes deliver in bursts: one
    slow call, then several prefetched ones), and the boundary cost is what the pass took beyond
    ``batches_per_pass`` steady batches, i.e. the first call's excess. The split is only meaningful when a pass
    is longer than the loader's pipeline depth (workers x prefetch): a pass that ends while the prefetched
    batches are still arriving shows a steady speed that is really the prefetch draining, while the amortised
    ``items_per_s`` stays exact either way.

    Args:
        fn: returns the next batch.
        items_per_call: pairs per batch.
        batches_per_pass: the loader's batches per pass (constant over passes).
        warmup: untimed calls at least, rounded up to a whole number of passes.
        passes: timed passes; the statistics are over passes.
        device: the device whose queue is drained before each clock read.

    Returns:
        PassThroughput with Stats over the timed passes.
    """
    if batches_per_pass < 1 or passes < 1 or warmup < 0:
        raise ValueError(f"need batches_per_pass >= 1, passes >= 1, warmup >= 0; "
                         f"got {batches_per_pass}, {passes}, {warmup}")
    for _ in range(-(-max(warmup, 1) // batches_per_pass) * batches_per_pass):
        fn()
    rates, steady_rates, steady_s, boundary_s = [], [], [], []
    for _ in range(passes):
        times = []
        for _ in range(batches_per_pass):
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        steady = statistics.fmean(times[1:]) if batches_per_pass > 1 else times[0]
        rates.append(items_per_call * batches_per_pass / sum(times))
        steady_rates.append(items_per_call / steady)
        steady_s.append(steady)
        boundary_s.append(sum(times) - batches_per_pass * steady)
    return PassThroughput(batches_per_pass, Stats.of(rates), Stats.of(steady_rates), Stats.of(steady_s),
                          Stats.of(boundary_s))


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
