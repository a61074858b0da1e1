"""The next pass's reader prepared ahead of the boundary: the same stream bit for bit as building it at the
boundary, across boundaries, after a mid-pass resume and after a corrupt sample; errors surface at the boundary."""

import io

import pytest
import torch

from distributed import DistInfo
from pipeline import build_train_loader
from tests.pipeline.helpers import BACKENDS, make_cfg
from tests.pipeline.test_bad_samples import corrupt_shards  # noqa: F401 - the fixture

STEPS = 15  # 6 batches per pass: two boundaries and part of a third pass


def _stream(cfg, n: int, prepare_ahead, state: dict | None = None, after=None):
    """``n`` batches of a fresh loader with ``prepare_ahead`` (None: build at the boundary); the loader closed."""
    loader = build_train_loader(cfg, DistInfo())
    try:
        loader.prepare_ahead = prepare_ahead
        if state is not None:
            loader.load_state_dict(state)
        batches = [next(loader) for _ in range(n)]
        if after is not None:
            after(loader)
        return batches, loader
    finally:
        loader.close()


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, ((q1, k1), (q2, k2)) in enumerate(zip(a, b)):
        assert torch.equal(q1, q2) and torch.equal(k1, k2), f"batch {i} differs"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ahead", [1, 100])  # at the last batch of a pass; right after the first
def test_prepared_ahead_stream_is_the_boundary_built_stream(shard_dir, backend, ahead):
    cfg = make_cfg(shard_dir, backend)
    reference, ref_loader = _stream(cfg, STEPS, None)
    got, loader = _stream(cfg, STEPS, ahead)
    assert ref_loader.passes_prepared_ahead == 0
    assert loader.pass_index == 2 and loader.passes_prepared_ahead == 2  # both boundaries switched, none rebuilt
    _assert_same(reference, got)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_mid_pass_while_the_next_pass_is_prepared(shard_dir, backend):
    cfg = make_cfg(shard_dir, backend)
    reference, _ = _stream(cfg, 4 + STEPS, None)
    loader = build_train_loader(cfg, DistInfo())
    try:
        loader.prepare_ahead = 100
        for _ in range(4):
            next(loader)
        assert loader._next is not None  # the checkpoint is taken while pass 1 is being prepared
        buf = io.BytesIO()
        torch.save(loader.state_dict(), buf)
    finally:
        loader.close()
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed, resumed_loader = _stream(cfg, STEPS, 100, state=state)
    assert resumed_loader.passes_prepared_ahead == 3  # batches 4 to 18: boundaries at 6, 12 and 18
    _assert_same(reference[4:], resumed)


def test_dali_corrupt_sample_found_after_the_next_pass_was_started(corrupt_shards):  # noqa: F811
    # With prepare_ahead=100 pass 1 is started after the first batch, before the corrupt sample of pass 0 is
    # met: the pipeline prepared without it is thrown away and prepared again without the bad sample.
    cfg = make_cfg(corrupt_shards, "dali")
    reference, ref_loader = _stream(cfg, 13, None)
    got, loader = _stream(cfg, 13, 100)
    assert ref_loader.bad_samples == loader.bad_samples == 1
    assert loader.passes_prepared_ahead == 2
    _assert_same(reference, got)


@pytest.mark.parametrize("where", ["elsewhere", "in_the_window"])
def test_dali_bad_set_changed_at_the_boundary_builds_afresh_only_for_the_window(shard_dir, where):
    cfg = make_cfg(shard_dir, "dali")
    reference, _ = _stream(cfg, 8, None)
    loader = build_train_loader(cfg, DistInfo())
    try:
        loader.prepare_ahead = 100
        got = [next(loader) for _ in range(6)]
        assert loader._next is not None
        # A find in a shard the prepared window does not read leaves its pipeline as the boundary would build it;
        # one in a shard it reads (a member no record owns: the stream is unchanged) makes the boundary rebuild.
        tar = "/elsewhere/train-999999.tar" if where == "elsewhere" else str(shard_dir / "train-000001.tar")
        loader.bad.add(f"{tar}:1536:no-such-member.jpg")
        got += [next(loader) for _ in range(2)]
        assert loader.passes_prepared_ahead == (where == "elsewhere") and loader.pass_index == 1
    finally:
        loader.close()
    _assert_same(reference, got)


def test_dali_background_build_error_surfaces_at_the_boundary(shard_dir, monkeypatch):
    from pipeline.dali_loader import DaliLoader

    make_pipe = DaliLoader._make_pipe

    def failing(self, pass_index, restarts, bad, checkpoint=None):
        if pass_index == 1:
            raise FileNotFoundError("train-000001.tar vanished")
        return make_pipe(self, pass_index, restarts, bad, checkpoint)

    monkeypatch.setattr(DaliLoader, "_make_pipe", failing)
    loader = build_train_loader(make_cfg(shard_dir, "dali"), DistInfo())
    try:
        for _ in range(6):  # pass 0 is unaffected by the failed build of pass 1
            next(loader)
        with pytest.raises(FileNotFoundError, match="vanished") as info:
            next(loader)
        assert any("pass 1" in note and "background thread" in note for note in info.value.__notes__)
    finally:
        loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_close_while_the_next_pass_is_being_prepared(shard_dir, backend):
    loader = build_train_loader(make_cfg(shard_dir, backend), DistInfo())
    loader.prepare_ahead = 100
    next(loader)
    assert loader._next is not None
    loader.close()
    assert loader._next is None
