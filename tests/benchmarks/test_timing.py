"""Pass-aware timing: steady speed within a pass vs the extra cost per pass boundary, against a scripted clock and
a real loader."""

from __future__ import annotations

import math

import pytest

from benchmarks import timing
from benchmarks.timing import StepClock, measure_passes


class FakeLoader:
    """A loader whose batches take ``base`` seconds and whose first batch of every pass after the first takes
    ``extra`` seconds more, on a scripted clock (no sleeping, exact figures)."""

    def __init__(self, per_pass: int, base: float, extra: float):
        self.per_pass, self.base, self.extra = per_pass, base, extra
        self.now, self.calls = 0.0, 0

    def clock(self) -> float:
        return self.now

    def __call__(self) -> None:
        boundary = self.calls > 0 and self.calls % self.per_pass == 0
        self.now += self.base + (self.extra if boundary else 0.0)
        self.calls += 1


@pytest.mark.parametrize("per_pass, warmup, passes", [(1, 0, 3), (6, 1, 2), (8, 5, 4), (3, 7, 1)])
@pytest.mark.parametrize("extra", [0.0, 0.4])
def test_measure_passes_separates_steady_speed_from_boundary_cost(monkeypatch, per_pass, warmup, passes, extra):
    loader = FakeLoader(per_pass, base=0.01, extra=extra)
    monkeypatch.setattr(timing.time, "perf_counter", loader.clock)
    tp = measure_passes(loader, items_per_call=8, batches_per_pass=per_pass, warmup=warmup, passes=passes)
    warmup_calls = math.ceil(max(warmup, 1) / per_pass) * per_pass  # whole passes: timing starts at a boundary
    assert loader.calls == warmup_calls + passes * per_pass
    assert tp.batches_per_pass == per_pass and tp.boundary_s.n == passes
    if per_pass > 1:
        assert tp.steady_seconds_per_call.median == pytest.approx(0.01)
        assert tp.steady_items_per_s.median == pytest.approx(800)
        assert tp.boundary_s.median == pytest.approx(extra)
    # amortised over whole passes: B x items / (B x steady + boundary), the formula the report gives
    assert tp.items_per_s.median == pytest.approx(8 * per_pass / (per_pass * 0.01 + extra))


def test_measure_passes_rejects_empty_windows():
    with pytest.raises(ValueError):
        measure_passes(lambda: None, items_per_call=1, batches_per_pass=0, warmup=0, passes=1)
    with pytest.raises(ValueError):
        measure_passes(lambda: None, items_per_call=1, batches_per_pass=4, warmup=0, passes=0)


def test_step_clock_splits_boundary_steps(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
    clock = StepClock("cpu")
    for wait, boundary in [(0.1, False), (0.1, False), (2.1, True), (0.3, False)]:
        clock.start()
        now[0] += wait
        clock.data_ready(boundary=boundary)
        now[0] += 1.0  # the step itself
        clock.stop()
    assert clock.boundary == [False, False, True, False]
    assert clock.data_wait_share == pytest.approx(2.6 / 6.6)
    assert clock.data_wait_share_in_pass == pytest.approx(0.5 / 3.5)
    assert clock.boundary_extra_wait_s == pytest.approx([2.0])  # 2.1 s against the in-pass median of 0.1 s


def test_step_clock_without_boundaries():
    clock = StepClock("cpu")
    for _ in range(3):
        clock.start()
        clock.data_ready()
        clock.stop()
    assert clock.boundary_extra_wait_s == [] and 0 <= clock.data_wait_share_in_pass <= 1
    assert 0 <= clock.data_wait_share <= 1 and len(clock.step_s) == 3
    assert all(w <= s for w, s in zip(clock.wait_s, clock.step_s))


@pytest.mark.parametrize("backend", ["dali", "pytorch"])
def test_measure_passes_on_a_real_loader(shard_dir, backend):
    from distributed import DistInfo
    from pipeline import build_train_loader
    from tests.pipeline.helpers import make_cfg

    loader = build_train_loader(make_cfg(shard_dir, backend), DistInfo())
    try:
        tp = measure_passes(loader.__next__, items_per_call=loader.local_batch_size,
                            batches_per_pass=loader.batches_per_pass, warmup=1, passes=2)
        assert loader.pass_index == 2 and loader.batch_in_pass == loader.batches_per_pass  # whole passes timed
    finally:
        loader.close()
    assert tp.batches_per_pass == 6
    for stats in (tp.items_per_s, tp.steady_items_per_s, tp.steady_seconds_per_call):
        assert stats.n == 2 and 0 < stats.min <= stats.median <= stats.max and math.isfinite(stats.max)
    assert math.isfinite(tp.boundary_s.median)
