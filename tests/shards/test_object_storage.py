"""Shards in object storage end to end, against a real S3-compatible server on 127.0.0.1 (moto, see s3_server.py).

`shards build --out s3://...` writes the same bytes as a local build, an interrupted build resumes without a torn
object, sources are read from the store, and train.py trains from ``--shards s3://...`` on both backends: the
same losses as from the local copy of the same shards, and a run killed mid-way resumes exactly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from shards import storage
from shards.build import BuildOptions, build_shards
from shards.manifest import read_manifest
from tests.conftest import REPO, write_simple_shards
from tests.train.test_train_loop import losses

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


def _names(server, prefix: str) -> list[str]:
    """The objects directly under ``prefix`` of bucket ``data`` (hidden ones, e.g. a write probe, left out)."""
    listed = server.client().list_objects_v2(Bucket="data", Prefix=prefix + "/").get("Contents", [])
    names = [o["Key"][len(prefix) + 1:] for o in listed]
    return [n for n in names if "/" not in n and not n.startswith(".")]


def _objects(server, prefix: str) -> dict[str, bytes]:
    """Every object directly under ``prefix``, by name, with its bytes (what a local build's folder holds)."""
    client = server.client()
    return {n: client.get_object(Bucket="data", Key=f"{prefix}/{n}")["Body"].read() for n in _names(server, prefix)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _cli(args: list[str], server, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shards", *args], env={**_env(server), **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def _jpegs(folder: Path) -> list[bytes]:
    out = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            out += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return out


PER_SHARD = 8
OPTIONS = BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False)


@pytest.fixture(scope="module")
def local_build(photo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local-build")
    build_shards([str(photo_dir)], out, OPTIONS)
    return out


def test_build_into_object_storage_writes_what_a_local_build_writes(s3_env, photo_dir, local_build):
    manifest = build_shards([str(photo_dir)], "s3://data/built", OPTIONS)
    assert _objects(s3_env, "built") == _files(local_build)  # every shard, index, stats file and the manifest
    assert manifest.root == "s3://data/built" and not Path("s3:").exists()
    remote = read_manifest("s3://data/built")
    assert remote.total_samples == read_manifest(local_build).total_samples > 0
    assert storage.read_bytes(remote.tar_path(remote.shards[0])) == (local_build / remote.shards[0].tar).read_bytes()


@pytest.mark.slow
def test_a_killed_build_leaves_no_torn_object_and_resumes_to_the_same_objects(s3_server, photo_dir, tmp_path):
    """SIGKILL a real `shards build --out s3://...` mid-run: what is in the bucket is complete; a rerun finishes."""
    # Groups of 2 (24 of them) and no resize, so the build is still far from done when the listing that sees two
    # finished groups returns, however loaded the machine (with groups of 4 it once finished in between).
    cmd = ["build", str(photo_dir), "--out", "s3://data/killed", "--samples-per-shard", "2", "--workers", "1",
           "--no-progress", "--short-side", "0"]
    proc = subprocess.Popen([sys.executable, "-m", "shards", *cmd], env=_env(s3_server), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if sum(name.endswith(".stats.json") for name in _names(s3_server, "killed")) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    reference = tmp_path / "reference"
    build_shards([str(photo_dir)], reference, BuildOptions(samples_per_shard=2, workers=1, short_side=0,
                                                           progress=False))
    expected = _files(reference)
    partial = _objects(s3_server, "killed")
    assert "manifest.json" not in partial and 2 <= sum(n.endswith(".stats.json") for n in partial)
    assert all(data == expected[name] for name, data in partial.items())  # whole objects only: none torn
    done = _cli(cmd, s3_server)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after" in done.stderr
    assert _objects(s3_server, "killed") == expected


def test_sources_in_object_storage(s3_env, photo_dir, local_build, tmp_path):
    """A prefix of images, a list file of URLs (one missing) and a tar, all in the bucket."""
    photos = sorted(p for p in photo_dir.rglob("*") if p.is_file())
    for p in photos:
        storage.put_file(p, f"s3://data/photos/{p.relative_to(photo_dir).as_posix()}")
    out = tmp_path / "from-prefix"
    manifest = build_shards(["s3://data/photos"], out, OPTIONS)
    local = read_manifest(local_build)
    assert manifest.total_samples == local.total_samples and manifest.options["inputs"] == len(photos)

    assert sorted(_jpegs(out)) == sorted(_jpegs(local_build))  # the same images, in the store's key order
    listed = [f"s3://data/photos/{p.relative_to(photo_dir).as_posix()}" for p in photos[:5]]
    storage.write_bytes("s3://data/lists/five.txt", "\n".join([*listed, "s3://data/photos/missing.jpg"]).encode())
    shards = tmp_path / "tar-shards"
    write_simple_shards(photos[5:9], shards, per_shard=4)
    storage.put_file(shards / "train-000000.tar", "s3://data/tars/four.tar")
    mixed = build_shards(["s3://data/lists/five.txt", "s3://data/tars/four.tar"], tmp_path / "mixed", OPTIONS)
    assert mixed.options["inputs"] == 10 and mixed.options["rejected"] == {"unreadable": 1}
    assert mixed.total_samples == 9


@pytest.fixture(scope="module")
def remote_shards(s3_server, photo_dir, local_build) -> tuple[Path, str]:
    """``shards build --out s3://data/train-shards``; with the identical local build (48 photos, 6 shards of 8)."""
    import s3fs

    saved = {k: os.environ.pop(k) for k in [k for k in os.environ if k.startswith("AWS_")]}
    os.environ.update(s3_server.env)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        build_shards([str(photo_dir)], "s3://data/train-shards", OPTIONS)
    finally:
        for key in s3_server.env:
            os.environ.pop(key, None)
        os.environ.update(saved)
        s3fs.S3FileSystem.clear_instance_cache()
    return local_build, "s3://data/train-shards"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["pytorch", "dali"])
def test_training_from_s3_matches_local_and_resumes_exactly_after_a_kill(backend, s3_server, remote_shards,
                                                                         tmp_path):
    local, url = remote_shards
    env = _env(s3_server)
    reference = _train(_train_args(local, tmp_path / "local", backend), env)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = losses(tmp_path / "local")
    assert sorted(expected) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "remote"
    args = _train_args(url, run_dir, backend)
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(losses(run_dir)) >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    reached = max(losses(run_dir))
    assert reached < STEPS
    resumed = _train(args, env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {reached // 2 * 2}" in resumed.stdout
    assert losses(run_dir) == expected  # from the store: the local run's stream, and exact across the kill


def test_training_errors_from_the_store_are_one_line(s3_env, remote_shards, tmp_path, monkeypatch, capsys):
    import s3fs

    import train

    monkeypatch.chdir(tmp_path)
    cases = {
        "s3://data/no-such-prefix": "shard manifest not found: s3://data/no-such-prefix/manifest.json",
        "s3://no-such-bucket/shards": "no such bucket (no-such-bucket)",
        "s3:/data/train-shards": "malformed URL",
        "gs:/data/train-shards": "malformed URL",
        remote_shards[1]: "access denied",  # with a wrong secret, below
    }
    for shards, message in cases.items():
        if message == "access denied":
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
            s3fs.S3FileSystem.clear_instance_cache()
        assert train.main(_train_args(shards, tmp_path / "run", "pytorch")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "gs:").exists()


def test_build_errors_with_object_storage_are_one_line(s3_env, photo_dir, tmp_path, monkeypatch, capsys):
    from shards.__main__ import main

    monkeypatch.chdir(tmp_path)
    cases = [
        ([str(photo_dir), "--out", "s3:/data/x"], "malformed URL 's3:/data/x'"),
        ([str(photo_dir), "--out", "ftp://data/x"], "unsupported URL scheme ftp://"),
        ([str(photo_dir), "--out", "s3://no-such-bucket/x"], "no such bucket (no-such-bucket)"),
        (["s3://data/nothing-here", "--out", str(tmp_path / "o")], "input not found: no object under s3://data/"),
        (["s3://data/lists/absent.txt", "--out", str(tmp_path / "o")], "input not found: s3://data/lists/absent.txt"),
    ]
    for args, message in cases:
        assert main(["build", *args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "s3:").exists() and not (tmp_path / "ftp:").exists()

    import s3fs

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3fs.S3FileSystem.clear_instance_cache()
    assert main(["build", str(photo_dir), "--out", "s3://data/x", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "access denied" in err[0] and "check the credentials" in err[0], err
