"""The metrics window: no host read per step, means and counts reduced over ranks, evaluation time left out."""

import math

import pytest
import torch

import training.metrics as metrics_module
from training.metrics import MetricsWindow, NonFiniteLoss, TooManyBadSamples, check_window


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(metrics_module.time, "perf_counter", fake)
    return fake


def step_metrics(loss: float, acc1: float = 50.0) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(loss), "acc1": torch.tensor(acc1), "acc5": torch.tensor(90.0)}


def test_adding_a_step_never_reads_a_device_value(monkeypatch):
    window = MetricsWindow(torch.device("cpu"), pairs_per_step=8)

    def host_read(*args, **kwargs):
        raise AssertionError("a per-step host read of a tensor")

    for name in ("item", "tolist", "cpu", "__float__", "__bool__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    for loss in (1.0, 2.0, 3.0):
        window.add(step_metrics(loss))
    monkeypatch.undo()
    assert window.steps == 3 and window.read()["loss"] == pytest.approx(2.0)


def test_read_averages_the_window_sums_counts_and_starts_a_new_window(clock):
    window = MetricsWindow(torch.device("cpu"), pairs_per_step=8)
    for loss, acc1, wait in ((1.0, 10.0, 0.5), (3.0, 30.0, 0.5)):
        with window.waiting_for_data():
            clock.now += wait
        clock.now += 1.5  # the step itself
        window.add(step_metrics(loss, acc1))
    logged = window.read(bad_samples=4)
    assert logged["loss"] == pytest.approx(2.0) and logged["acc1"] == pytest.approx(20.0)
    assert logged["bad_samples"] == 4 and isinstance(logged["bad_samples"], int)
    assert logged["step_time_s"] == pytest.approx(2.0) and logged["pairs_per_s"] == pytest.approx(4.0)
    assert logged["data_wait_share"] == pytest.approx(0.25)
    clock.now += 1.0
    window.add(step_metrics(5.0))
    assert window.read()["loss"] == pytest.approx(5.0)  # the previous window's sums are gone


def test_evaluation_inside_the_window_is_not_training_time(clock):
    window = MetricsWindow(torch.device("cpu"), pairs_per_step=16)
    clock.now += 1.0
    window.add(step_metrics(1.0))
    with window.paused():  # a kNN evaluation
        clock.now += 30.0
    clock.now += 1.0
    window.add(step_metrics(1.0))
    logged = window.read()
    assert logged["step_time_s"] == pytest.approx(1.0) and logged["pairs_per_s"] == pytest.approx(16.0)


def test_window_checks_stop_on_a_non_finite_loss_and_on_too_many_bad_samples():
    check_window(20, {"loss": 4.2, "bad_samples": 3}, 3, None, [])
    for bad in (math.nan, math.inf):
        with pytest.raises(NonFiniteLoss, match=r"loss is (nan|inf) .* step 20: training diverged; the last good "
                                                r"checkpoint ck/step-000000010.pt is kept"):
            check_window(20, {"loss": bad, "bad_samples": 0}, 3, "ck/step-000000010.pt", [])
    with pytest.raises(TooManyBadSamples, match=r"4 corrupt samples skipped \(> data.max_bad_samples=3\).*a.tar:x"):
        check_window(20, {"loss": 4.2, "bad_samples": 4}, 3, None, ["root/a.tar:x.jpg"])
