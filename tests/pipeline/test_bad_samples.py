"""A shard with a planted corrupt JPEG: the loader keeps yielding and reports the one bad sample."""

import pytest
import torch

from distributed import DistInfo
from pipeline import build_train_loader
from pipeline.bad_samples import decodes, filtered_index, parse_location
from shards.writer import read_index
from tests.pipeline.helpers import BACKENDS, jpeg, make_cfg, take, write_shards

BAD = 20  # sample index of the corrupt JPEG (in the second shard)


@pytest.fixture(scope="module")
def corrupt_shards(photo_dir, tmp_path_factory):
    from PIL import Image

    images = [jpeg(Image.open(p)) for p in sorted(photo_dir.rglob("*.*"))]
    images[BAD] = images[BAD][: len(images[BAD]) // 2]  # truncated mid-scan: every decoder rejects it
    assert not decodes(images[BAD])
    out = tmp_path_factory.mktemp("corrupt")
    write_shards(out, images, per_shard=16)
    return out


def _expected_location(shards) -> str:
    tar = shards / "train-000001.tar"
    name = f"{BAD:09d}.jpg"
    offset = next(f[1] for r in read_index(shards / "train-000001.idx") for f in r.files if f[3] == name)
    return f"{tar}:{offset}:{name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_is_skipped_counted_and_located(corrupt_shards, backend, capsys):
    cfg = make_cfg(corrupt_shards, backend)
    got, loader = take(cfg, 12)  # two passes of 6 batches: the bad sample is met in the first
    assert len(got) == 12 and all(q.shape == (8, 3, 64, 64) and torch.isfinite(q).all() for q, _ in got)
    assert loader.bad_samples == 1
    assert loader.bad_sample_locations == [_expected_location(corrupt_shards)]
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert said == [f"warning: skipped an unreadable sample at {_expected_location(corrupt_shards)}"]  # once


def test_dali_resume_after_a_skipped_sample_is_exact(corrupt_shards):
    cfg = make_cfg(corrupt_shards, "dali")
    loader = build_train_loader(cfg, DistInfo())
    first = [next(loader) for _ in range(5)]
    assert loader.bad_samples == 1 and loader.bad.bad_batches == 1 and len(first) == 5
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]
    loader.close()
    got, resumed = take(cfg, 4, state=state)
    assert resumed.bad_samples == 1
    for (q1, k1), (q2, k2) in zip(expected, got):
        assert torch.equal(q1, q2) and torch.equal(k1, k2)


def test_location_round_trip_and_filtered_index(corrupt_shards, tmp_path):
    tar, offset, name = parse_location(_expected_location(corrupt_shards))
    assert tar.endswith("train-000001.tar") and name == f"{BAD:09d}.jpg" and offset > 0
    kept = read_index(filtered_index(corrupt_shards / "train-000001.idx", {name}, tmp_path))
    assert len(kept) == 15 and all(r.key != f"{BAD:09d}" for r in kept)
