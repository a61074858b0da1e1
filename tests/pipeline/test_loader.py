"""Both backends behind build_train_loader: shapes, dtype, layout, per-rank batch counts, exact resume."""

import io

import pytest
import torch

from distributed import DistInfo
from pipeline import build_train_loader
from shards.manifest import ManifestError
from tests.pipeline.helpers import BACKENDS, make_cfg, take


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_shape_dtype_layout(shard_dir, backend):
    (batch,), loader = take(make_cfg(shard_dir, backend), 1)
    q, k = batch
    assert loader.local_batch_size == 8 and loader.batches_per_pass == 6  # 48 samples / 8
    for view in (q, k):
        assert view.shape == (8, 3, 64, 64) and view.dtype == torch.float32 and view.device.type == "cpu"
        assert view.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(view).all()
    assert (q - k).abs().mean() > 0.1  # independent augmentations of the same images
    assert not torch.equal(q[0], q[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_views_dtype_and_contiguous_layout_options(shard_dir, backend):
    cfg = make_cfg(shard_dir, backend, dtype="bfloat16", channels_last=False, batch_size=4)
    ((q, k),), _ = take(cfg, 1)
    assert q.dtype == k.dtype == torch.bfloat16 and q.shape == (4, 3, 64, 64) and q.is_contiguous()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_yields_the_same_number_of_batches(shard_dir, world):
    # 3 shards of 16: world 2 splits them 32 / 16, so both ranks yield floor(16 / 4) = 4 batches per pass.
    cfg = make_cfg(shard_dir, "dali", batch_size_per_gpu=4)
    loaders = [build_train_loader(cfg, DistInfo(rank=r, world_size=world)) for r in range(world)]
    counts = {loader.batches_per_pass for loader in loaders}
    assert counts == {{1: 12, 2: 4, 3: 4}[world]}
    shards = [loader.my_shards(0) for loader in loaders]
    assert sorted(i for s in shards for i in s) == [0, 1, 2]
    # The last rank runs a whole pass and moves into the next one without running dry.
    last = loaders[-1]
    for _ in range(last.batches_per_pass + 1):
        q, _ = next(last)
        assert q.shape == (4, 3, 64, 64)
    assert last.pass_index == 1 and last.batch_in_pass == 1
    for loader in loaders:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_bit_exact_across_a_pass_boundary(shard_dir, backend):
    cfg = make_cfg(shard_dir, backend)
    loader = build_train_loader(cfg, DistInfo())
    for _ in range(4):
        next(loader)
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    expected = [next(loader) for _ in range(5)]  # crosses from pass 0 (6 batches) into pass 1
    loader.close()
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    got, resumed = take(cfg, 5, state=state)
    assert resumed.pass_index == 1
    for (q1, k1), (q2, k2) in zip(expected, got):
        assert torch.equal(q1, q2) and torch.equal(k1, k2)


def test_resume_rejects_a_different_world_size(shard_dir):
    cfg = make_cfg(shard_dir, "dali", batch_size_per_gpu=4)
    state = build_train_loader(cfg, DistInfo()).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        build_train_loader(cfg, DistInfo(rank=0, world_size=2)).load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_index_file_is_an_error_before_training(shard_dir, tmp_path, backend):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    (copy / "train-000001.idx").unlink()
    with pytest.raises(ManifestError, match="missing index file: .*train-000001.idx"):
        build_train_loader(make_cfg(copy, backend), DistInfo())
