"""The PyTorch backend checks the next window's shards in a background thread: the training thread's batches keep
coming while the checks run, and the stream, the damage counts and shutdown are as before."""

import threading
import time

import pytest
import torch

import pipeline.shard_check
from distributed import DistInfo
from pipeline import build_train_loader
from tests.pipeline.helpers import make_cfg

# shard_dir: 3 shards of 16 samples; one shard per window and batches of 4 make windows of 4 batches.
MORE = 2  # batches the training thread takes while the next window's check is held


def _cfg(shard_dir):
    return make_cfg(shard_dir, "pytorch", window_shards=1, batch_size=4)


def _check_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("torch-window-check-")]


def test_the_next_windows_check_does_not_block_the_training_thread(shard_dir, monkeypatch):
    cfg = _cfg(shard_dir)
    reference = build_train_loader(cfg, DistInfo())
    try:
        expected = [next(reference) for _ in range(6)]  # window 0 and into window 1
    finally:
        reference.close()

    loader = build_train_loader(cfg, DistInfo())  # window 0's shard is checked here, on this thread
    entered, release = threading.Event(), threading.Event()
    checked_in: list[str] = []
    real_check = pipeline.shard_check.check_shard

    def held_check(tar, index):
        checked_in.append(threading.current_thread().name)
        if threading.current_thread() is threading.main_thread():
            raise AssertionError(f"{tar} checked on the training thread")
        entered.set()
        assert release.wait(30), "the test never released the check"
        return real_check(tar, index)

    monkeypatch.setattr(pipeline.shard_check, "check_shard", held_check)
    try:
        loader.prepare_ahead = 1  # window 1's DataLoader forked at window 0's last batches; its check starts at the first
        got = [next(loader)]
        assert entered.wait(10), "window 1's check did not start"
        waits = []
        for _ in range(MORE):  # the check is held: these batches come only if this thread does not wait for it
            start = time.perf_counter()
            got.append(next(loader))
            waits.append(time.perf_counter() - start)
            assert loader._next is not None and not loader._next.checked() and loader._next.batches is None
        assert (loader.window, loader.batch_in_window) == (0, 1 + MORE) and not release.is_set()
        release.set()
        got += [next(loader) for _ in range(6 - len(got))]  # window 0's last batch waits for the check if need be
        assert loader.windows_prepared_ahead == 1  # the boundary switched to the DataLoader forked ahead
        assert loader.bad_samples == 0
    finally:
        release.set()
        loader.close()
    # window 1's shard, then window 2's (checked from window 1's first batch), each in its own thread
    assert checked_in == ["torch-window-check-1", "torch-window-check-2"], checked_in
    assert not _check_threads()
    for i, ((q1, k1), (q2, k2)) in enumerate(zip(expected, got)):
        assert torch.equal(q1, q2) and torch.equal(k1, k2), f"batch {i} differs"
    print(f"batches while the check was held: {', '.join(f'{w * 1e3:.0f} ms' for w in waits)}")


@pytest.mark.parametrize("when", ["close", "resume"])
def test_a_check_under_way_is_abandoned_by_close_and_resume(shard_dir, monkeypatch, when):
    cfg = _cfg(shard_dir)
    loader = build_train_loader(cfg, DistInfo())
    state = loader.state_dict()
    entered, release = threading.Event(), threading.Event()
    real_check = pipeline.shard_check.check_shard

    def held_check(tar, index):
        entered.set()
        release.wait(30)
        return real_check(tar, index)

    monkeypatch.setattr(pipeline.shard_check, "check_shard", held_check)
    try:
        loader.prepare_ahead = 100
        next(loader)
        assert entered.wait(10) and len(_check_threads()) == 1
        threading.Timer(0.2, release.set).start()  # the shard being checked finishes; the thread stops there
        if when == "close":
            loader.close()
        else:
            loader.load_state_dict(state)
            assert loader._next is None and not _check_threads()
            monkeypatch.setattr(pipeline.shard_check, "check_shard", real_check)
            assert next(loader)[0].shape == (4, 3, 64, 64)
        assert not _check_threads()
    finally:
        release.set()
        loader.close()
    assert not _check_threads()
