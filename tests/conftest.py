"""Shared fixtures: small real photos and shards made from them, plus a torchrun launcher for gloo tests."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from shards.manifest import Manifest, write_manifest
from shards.sample_corpus import write_sample_corpus
from shards.writer import ShardWriter

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """48 real-photo images (crops of the scikit-image / scikit-learn samples) in mixed formats."""
    out = tmp_path_factory.mktemp("photos")
    write_sample_corpus(out, num_images=48, seed=0)
    return out


def write_simple_shards(images: list[Path], out_dir: Path, per_shard: int, prefix: str = "train") -> Manifest:
    """Re-encode ``images`` as RGB JPEG into shards with ShardWriter (a minimal stand-in for `shards build`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for start in range(0, len(images), per_shard):
        writer = ShardWriter(out_dir, f"{prefix}-{start // per_shard:06d}")
        for i, path in enumerate(images[start:start + per_shard], start):
            buf = io.BytesIO()
            Image.open(path).convert("RGB").save(buf, "JPEG", quality=90)
            writer.write(f"{i:09d}", {"jpg": buf.getvalue(), "json": json.dumps({"source": str(path)}).encode()})
        entries.append(writer.close())
    manifest = Manifest(shards=entries, prefix=prefix, root=out_dir)
    write_manifest(manifest, out_dir)
    return manifest


@pytest.fixture(scope="session")
def shard_dir(photo_dir, tmp_path_factory) -> Path:
    """Shards (uneven sizes: 16, 16, 16 -> with 48 images) with index files and manifest.json."""
    out = tmp_path_factory.mktemp("shards")
    write_simple_shards(sorted(photo_dir.rglob("*.*")), out, per_shard=16)
    return out


def run_torchrun(script: str | Path, nproc: int, args: list[str] = (), timeout: float = 300,
                 extra_env: dict[str, str] | None = None, torchrun_args: list[str] = ()) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``nproc`` CPU ranks (gloo); fail the test with its output on error."""
    from distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(extra_env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", *torchrun_args, str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc
