"""Shards in object storage end to end, against a real S3-compatible server on 127.0.0.1 (moto, see s3_server.py).

`shards build --out s3://...` writes the same bytes as a local build, an interrupted build resumes without a torn
object, sources are read from the store, and train.py trains from ``--shards s3://...`` on both backends: the
same losses as from the local copy of the same shards, and a run killed mid-way resumes exactly.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards import storage
from tests.conftest import REPO, write_simple_shards

STEPS = 6


def _train_args(shards: str | Path, run_dir: Path, backend: str, **overrides) -> list[str]:
    """A tiny real run (ResNet-18 at 32 px, batch 8) that checkpoints every 2 steps."""
    args = {
        "shards": shards, "run-dir": run_dir, "total-steps": STEPS, "arch": "resnet18", "crop-size": 32,
        "batch-size": 8, "queue-size": 16, "num-threads": 1, "shuffle-buffer": 8, "split-bn-groups": 2,
        "lr": 0.01, "schedule": "constant", "log-every": 1, "checkpoint-every-steps": 2,
        "checkpoint-every-minutes": 0, "image-log-every": 0, "wandb-mode": "disabled", "device": "cpu",
        "backend": backend, "seed": 3, "knn-every": 0,
    }
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def _env(server) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**base, **server.env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true"}


def _train(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def _upload(folder: Path, url: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            storage.put_file(path, storage.join(url, path.name))


@pytest.fixture(scope="module")
def remote_shards(s3_server, photo_dir, tmp_path_factory) -> tuple[Path, str]:
    """The same shards locally and under s3://data/train-shards (24 photos, 3 shards of 8)."""
    local = tmp_path_factory.mktemp("local-shards")
    write_simple_shards(sorted(photo_dir.rglob("*.*"))[:24], local, per_shard=8)
    import s3fs

    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("AWS_")]}
    os.environ.update(s3_server.env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        _upload(local, "s3://data/train-shards")
    finally:
        for key in s3_server.env:
            os.environ.pop(key, None)
        os.environ.update(saved)
        s3fs.S3FileSystem.clear_instance_cache()
    return local, "s3://data/train-shards"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_training_from_s3_matches_local_and_resumes_exactly_after_a_kill(backend, s3_server, remote_shards,
                                                                         tmp_path):
    local, url = remote_shards
    env = _env(s3_server)
    reference = _train(_train_args(local, tmp_path / "local", backend), env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _losses(tmp_path / "local")
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "remote"
    args = _train_args(url, run_dir, backend)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(_losses(run_dir)) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    reached = max(_losses(run_dir))
    assert reached < STEPS
    resumed = _train(args, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {reached // 2 * 2}" in resumed.stdout
    assert _losses(run_dir) == expected  # from the store: the local run's stream, and exact across the kill


def test_training_errors_from_the_store_are_one_line(s3_server, remote_shards, tmp_path):
    env = _env(s3_server)
    cases = {
        "s3://data/no-such-prefix": "shard manifest not found: s3://data/no-such-prefix/manifest.json",
        "s3://no-such-bucket/shards": "no such bucket (no-such-bucket)",
        "s3:/data/train-shards": "malformed URL",
    }
    for shards, message in cases.items():
        proc = _train(_train_args(shards, tmp_path / "run", "pytorch"), env)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    proc = _train(_train_args(remote_shards[1], tmp_path / "run", "pytorch"), {**env, "AWS_SECRET_ACCESS_KEY": "no"})
    assert proc.returncode == 2 and "access denied" in proc.stderr, proc.stderr[-2000:]
    assert not Path(REPO / "s3:").exists()
