"""Pass-aware loader timing: speed within a pass vs the extra time of the window that crossed a pass boundary,
against a scripted clock and real loaders."""

from __future__ import annotations

import math

import pytest

from benchmarks import timing
from benchmarks.timing import StepClock, measure_loader


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


@pytest.mark.parametrize("per_pass, warmup, window, windows, crossing", [
    (24, 6, 4, 5, 1),  # the --quick shape: one window of five holds the boundary
    (8, 1, 2, 6, 1),
    (6, 0, 3, 6, 2),  # the boundary at call 6 is the first call of a window, 12 the first of the next but one
    (100, 10, 10, 4, 0),  # no boundary within the timed batches
])
@pytest.mark.parametrize("extra", [0.0, 0.4])
def test_measure_loader_separates_in_pass_speed_from_boundary_time(monkeypatch, per_pass, warmup, window, windows,
                                                                   crossing, extra):
    loader = FakeLoader(per_pass, base=0.01, extra=extra)
    monkeypatch.setattr(timing.time, "perf_counter", loader.clock)
    tp = measure_loader(loader, items_per_call=8, batches_per_pass=per_pass, warmup=warmup, window=window,
                        windows=windows)
    assert loader.calls == warmup + windows * window and tp.timed_batches == windows * window
    assert tp.seconds_per_call.median == pytest.approx(0.01) and tp.items_per_s.median == pytest.approx(800)
    assert tp.seconds_per_call.n == windows - crossing
    if crossing:
        assert tp.boundary_s.n == crossing and tp.boundary_s.median == pytest.approx(extra)
    else:
        assert tp.boundary_s is None


def test_measure_loader_keeps_timing_until_a_boundary_within_its_budget(monkeypatch):
    loader = FakeLoader(20, base=0.01, extra=0.3)
    monkeypatch.setattr(timing.time, "perf_counter", loader.clock)
    tp = measure_loader(loader, items_per_call=1, batches_per_pass=20, warmup=2, window=4, windows=2,
                        boundary_budget_s=10.0)
    assert tp.boundary_s.n == 1 and tp.boundary_s.median == pytest.approx(0.3)
    assert loader.calls == 2 + 5 * 4  # the fifth window, calls 18-21, holds call 20
    loader = FakeLoader(1000, base=0.01, extra=0.3)
    monkeypatch.setattr(timing.time, "perf_counter", loader.clock)
    tp = measure_loader(loader, items_per_call=1, batches_per_pass=1000, warmup=0, window=10, windows=2,
                        boundary_budget_s=0.5)
    assert tp.boundary_s is None and 0.5 <= loader.calls * 0.01 <= 0.5 + 0.1 + 1e-9  # stopped by the budget


def test_measure_loader_rejects_empty_windows():
    with pytest.raises(ValueError):
        measure_loader(lambda: None, items_per_call=1, batches_per_pass=0, warmup=0, window=1, windows=1)
    with pytest.raises(ValueError):
        measure_loader(lambda: None, items_per_call=1, batches_per_pass=4, warmup=0, window=1, windows=0)


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
def test_measure_loader_on_a_real_loader(shard_dir, backend):
    from distributed import DistInfo
    from pipeline import build_train_loader
    from tests.pipeline.helpers import make_cfg

    loader = build_train_loader(make_cfg(shard_dir, backend), DistInfo())
    try:
        tp = measure_loader(loader.__next__, items_per_call=loader.local_batch_size,
                            batches_per_pass=loader.batches_per_pass, warmup=1, window=2, windows=4)
        assert loader.pass_index == 1 and loader.batch_in_pass == 3  # 9 batches: one boundary crossed
    finally:
        loader.close()
    assert loader.batches_per_pass == 6 and tp.timed_batches == 8
    for stats in (tp.items_per_s, tp.seconds_per_call):
        assert stats.n == 3 and 0 < stats.min <= stats.median <= stats.max and math.isfinite(stats.max)
    assert tp.boundary_s.n == 1 and math.isfinite(tp.boundary_s.median)


def test_tuned_loader_delivers_normalised_views_without_pass_boundaries(shard_dir):
    import torch

    from benchmarks.tuned_torch_loader import TunedTorchLoader
    from pipeline.recipes import MOCO_V2

    loader = TunedTorchLoader(str(shard_dir), batch=4, workers=2, recipe=MOCO_V2, size=32, device=torch.device("cpu"),
                              dtype=torch.float32, channels_last=True)
    try:
        batches = [next(loader) for _ in range(15)]  # more than a pass (48 images, 12 batches): the stream goes on
    finally:
        loader.close()
    assert loader.batches_per_pass == 12 and loader.pass_index == 0 and loader.bad_samples == 0
    q, k = batches[-1]
    assert q.shape == k.shape == (4, 3, 32, 32) and q.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(q, k)  # two different random views of the same images
    assert -3 < q.mean() < 3 and 0.3 < q.std() < 3  # normalised with the recipe's mean and std
