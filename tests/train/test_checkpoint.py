"""Checkpoint files: atomic writes, keep-last-K, corrupt files skipped, weights_only loading, RNG round trip."""

import random

import numpy as np
import pytest
import torch

from training.checkpoint import capture_rng_state, list_checkpoints, load_checkpoint, restore_rng_state, save_checkpoint
from training.resume import ResumeError, find_resume_checkpoint


def _state(step):
    return {"model": {"w": torch.full((3,), float(step))}, "step": step, "config": {"run": {"seed": 1}}}


def test_keeps_newest_k_and_leaves_no_temporary_files(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000040.pt", "step-000000030.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000030.pt", "step-000000040.pt"]


def test_auto_resume_skips_truncated_and_foreign_files(tmp_path):
    save_checkpoint(_state(10), tmp_path, 10, keep=5)
    good = save_checkpoint(_state(20), tmp_path, 20, keep=5)
    truncated = tmp_path / "step-000000030.pt"
    truncated.write_bytes(good.read_bytes()[:100])
    torch.save({"hello": 1}, tmp_path / "step-000000040.pt")
    with pytest.warns(UserWarning, match="skipping"):
        path, state = find_resume_checkpoint("auto", tmp_path)
    assert path == good and state["step"] == 20


def test_resume_none_and_missing_explicit_path(tmp_path):
    save_checkpoint(_state(10), tmp_path, 10, keep=5)
    assert find_resume_checkpoint("none", tmp_path) == (None, None)
    assert find_resume_checkpoint("auto", tmp_path / "empty") == (None, None)
    with pytest.raises(ResumeError, match="checkpoint not found"):
        find_resume_checkpoint(str(tmp_path / "nope.pt"), tmp_path)


def test_loading_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"step": 1, "model": {}, "x": Evil()}, tmp_path / "step-000000001.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        load_checkpoint(tmp_path / "step-000000001.pt")


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    save_checkpoint({"rng": capture_rng_state(torch.device("cpu")), "step": 1, "model": {}}, tmp_path, 1, keep=1)
    expected = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng_state(load_checkpoint(list_checkpoints(tmp_path)[0])["rng"], torch.device("cpu"))
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])
