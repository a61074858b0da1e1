"""The scaling worker on 2 real gloo CPU ranks (what the scaling suite launches per GPU count on a GPU machine)."""

from __future__ import annotations

import pytest

from benchmarks.scaling import gpu_counts, run_point


def test_gpu_counts():
    assert gpu_counts(1) == [1]
    assert gpu_counts(2) == [1, 2]
    assert gpu_counts(3) == [1, 2, 3]
    assert gpu_counts(8) == [1, 2, 4, 8]


@pytest.mark.slow
def test_worker_on_two_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    point = run_point(2, ["--arch", "resnet18", "--crop", "32", "--batch-per-rank", "8", "--queue-size", "40",
                          "--warmup", "1", "--iters", "1", "--repeats", "2"], tmp_path / "p.json", timeout=300)
    assert point["world_size"] == 2 and point["shuffle_bn"] == "all_to_all"
    assert 0 < point["pairs_per_s"]["min"] <= point["pairs_per_s"]["median"] <= point["pairs_per_s"]["max"]
