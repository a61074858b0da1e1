"""A rank's share read window after window: the windows partition the pass, every rank yields the same batches per
pass, the stream is deterministic and the same with or without preparing ahead, and a resume inside a later window
or exactly at a window boundary continues bit for bit, on both backends; the checkpoint never re-deals."""

import io

import pytest
import torch
from PIL import Image

from distributed import DistInfo
from pipeline import build_train_loader
from pipeline.assignment import ShardPlan
from tests.pipeline.helpers import BACKENDS, jpeg, make_cfg, write_shards

# 8 shards of 6 samples, windows of at most 3 shards: windows of 3, 3 and 2 shards (18, 18, 12 samples) yield
# 4, 4 and 3 batches of 4, so a pass is 11 batches (two samples at the end of each window are not drawn; one
# reader over the pass would yield 12).
WINDOW = 3
BATCHES = [4, 4, 3]


@pytest.fixture(scope="module")
def small_shards(photo_dir, tmp_path_factory):
    images = [jpeg(Image.open(p)) for p in sorted(photo_dir.rglob("*.*"))]
    out = tmp_path_factory.mktemp("window_shards")
    write_shards(out, images, per_shard=6)
    return out


def _cfg(shards, backend, **data):
    return make_cfg(shards, backend, **{"window_shards": WINDOW, "batch_size": 4, **data})


def _positions(loader, n: int):
    """``n`` batches and the (pass, window, batch in window) each was drawn at."""
    batches, where = [], []
    for _ in range(n):
        batches.append(next(loader))
        where.append((loader.pass_index, loader.window, loader.batch_in_window))
    return batches, where


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, ((q1, k1), (q2, k2)) in enumerate(zip(a, b)):
        assert torch.equal(q1, q2) and torch.equal(k1, k2), f"batch {i} differs"


def _saved(loader) -> dict:
    buf = io.BytesIO()
    torch.save(loader.state_dict(), buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_windows_partition_every_rank_share_into_equal_batch_counts(small_shards, world):
    loaders = [build_train_loader(_cfg(small_shards, "dali", batch_size_per_gpu=2), DistInfo(rank=r, world_size=world))
               for r in range(world)]
    try:
        per_pass = {loader.batches_per_pass for loader in loaders}
        assert len(per_pass) == 1  # every rank yields the same number of batches
        for p in range(3):
            dealt = []
            for loader in loaders:
                windows = [loader.window_shards_of(p * loader.windows_per_pass + w).tolist()
                           for w in range(loader.windows_per_pass)]
                assert sum(windows, []) == loader.my_shards(p)  # consecutive windows of the reading order
                assert all(len(w) <= WINDOW for w in windows)
                assert sum(loader.window_batches(p * loader.windows_per_pass + w)
                           for w in range(loader.windows_per_pass)) == loader.batches_per_pass
                dealt += loader.my_shards(p)
            assert sorted(dealt) == list(range(8))  # disjoint and covering over the ranks
    finally:
        for loader in loaders:
            loader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_stream_is_deterministic_and_the_same_prepared_ahead(small_shards, backend):
    n = sum(BATCHES) + 1  # a pass (three window boundaries, one a pass boundary) and into the next pass
    streams, places = [], []
    for ahead in (None, 1):  # built at each boundary; prepared at each window's last batch
        loader = build_train_loader(_cfg(small_shards, backend), DistInfo())
        try:
            assert loader.windows_per_pass == 3 and loader.batches_per_pass == sum(BATCHES)
            loader.prepare_ahead = ahead
            batches, where = _positions(loader, n)
            streams.append(batches)
            places.append(where)
            assert loader.windows_prepared_ahead == (0 if ahead is None else 3)
            assert loader.passes_prepared_ahead == (0 if ahead is None else 1)
        finally:
            loader.close()
    in_pass = [(w, b) for w, n_w in enumerate(BATCHES) for b in range(1, n_w + 1)]
    assert places[0] == places[1] == [(0, w, b) for w, b in in_pass] + [(1, 0, 1)]
    _assert_same(streams[0], streams[1])
    # Different windows read different images: no two batches of a pass are the same views.
    firsts = [q[0] for q, _ in streams[0][: sum(BATCHES)]]
    assert all(not torch.equal(a, b) for i, a in enumerate(firsts) for b in firsts[i + 1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_in_a_later_window_and_exactly_at_window_boundaries(small_shards, backend):
    # Checkpoints after 4 batches (window 0 done: exactly at a boundary), 6 (inside window 1, where the PyTorch
    # backend's two streams have both consumed samples) and 11 (the pass done: a window and pass boundary); each
    # resumed stream must continue bit for bit up to batch 13.
    cfg = _cfg(small_shards, backend)
    loader = build_train_loader(cfg, DistInfo())
    reference, states = [], {}
    try:
        for i in range(1, 14):
            reference.append(next(loader))
            if i in (4, 6, 11):
                states[i] = _saved(loader)
    finally:
        loader.close()
    assert [(states[i]["pass_index"], states[i]["window"], states[i]["batch_in_window"]) for i in (4, 6, 11)] == \
        [(0, 0, 4), (0, 1, 2), (0, 2, 3)]
    assert all(len(s) < 20 for s in states.values())  # a compact position, no shard lists
    for i, state in states.items():
        resumed = build_train_loader(cfg, DistInfo())
        try:
            resumed.load_state_dict(state)
            got = [next(resumed) for _ in range(13 - i)]
        finally:
            resumed.close()
        _assert_same(reference[i:], got)


def test_state_dict_never_deals_and_each_pass_is_dealt_once(small_shards, monkeypatch):
    calls = []
    rank_pass = ShardPlan.rank_pass

    def counting(self, pass_index, *args, **kwargs):
        calls.append(pass_index)
        return rank_pass(self, pass_index, *args, **kwargs)

    def forbidden(*_, **__):
        raise AssertionError("the loader re-dealt a pass")

    monkeypatch.setattr(ShardPlan, "rank_pass", counting)  # the loader's one way to deal
    monkeypatch.setattr(ShardPlan, "assign", forbidden)  # every rank's lists: never needed by a loader
    loader = build_train_loader(_cfg(small_shards, "dali"), DistInfo())
    try:
        for _ in range(2 * sum(BATCHES) + 1):
            next(loader)
            before = len(calls)
            loader.state_dict()
            assert len(calls) == before  # a checkpoint reads the position, it does not deal
    finally:
        loader.close()
    assert sorted(set(calls)) == [0, 1, 2] and len(calls) == 3  # once per pass (the next one dealt when prepared)


def test_resume_rejects_another_window_size(small_shards):
    state = build_train_loader(_cfg(small_shards, "pytorch"), DistInfo()).state_dict()
    other = build_train_loader(_cfg(small_shards, "pytorch", window_shards=8), DistInfo())
    with pytest.raises(ValueError, match="windows_per_pass=3 but this run has 1 .*window_shards"):
        other.load_state_dict(state)


def _damage_window_1(root):
    """Cut one shard of pass 0's window 1 inside its sample 3 and empty another; (lost locations, dropped tar)."""
    from tests.faults import damage

    probe = build_train_loader(_cfg(root, "pytorch"), DistInfo())
    cut, empty = [root / probe.manifest.shards[i].tar for i in probe.window_shards_of(1)[:2].tolist()]
    probe.close()
    lost = damage.truncate_inside(cut, cut.with_suffix(".idx"), 3, into=100)
    damage.empty_file(empty)
    return lost, str(empty)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_damaged_shard_is_found_when_its_window_is_prepared(small_shards, tmp_path, capsys, backend):
    # Start-up checks window 0's shards only; window 1's are checked when window 1 is prepared (DALI: in its
    # background thread), then counted once and left out, and window 1 still yields its 4 batches.
    root = tmp_path / "shards"
    import shutil

    shutil.copytree(small_shards, root)
    lost, empty = _damage_window_1(root)
    loader = build_train_loader(_cfg(root, backend), DistInfo())
    try:
        window_1 = loader.window_shards_of(1).tolist()
        assert all(loader.shard_checks.is_checked(i) for i in loader.window_shards_of(0).tolist())
        assert not any(loader.shard_checks.is_checked(i) for i in window_1) and loader.bad_samples == 0
        batches, where = _positions(loader, sum(BATCHES) + 1)
        assert where[3:9] == [(0, 0, 4), (0, 1, 1), (0, 1, 2), (0, 1, 3), (0, 1, 4), (0, 2, 1)]
        assert all(q.shape == (4, 3, 64, 64) and torch.isfinite(q).all() for q, _ in batches)
        assert loader.bad_sample_locations == lost and loader.dropped_shards == {empty: 6}
        assert loader.bad_samples == len(lost) + 6
    finally:
        loader.close()
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(said) == 2 and "truncated at" in said[0] and "empty file" in said[1], said


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_across_a_window_boundary_is_exact_with_a_damaged_window(small_shards, tmp_path, backend):
    # Checkpoints in window 0 (window 1 prepared and checked ahead, or not yet) and exactly at the boundary.
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(small_shards, root)
    lost, _ = _damage_window_1(root)
    cfg = _cfg(root, backend)
    loader = build_train_loader(cfg, DistInfo())
    reference, states = [], {}
    try:
        for i in range(1, 10):
            reference.append(next(loader))
            if i in (2, 4):
                states[i] = _saved(loader)
        bad = loader.bad_samples
    finally:
        loader.close()
    assert bad == len(lost) + 6
    for i, state in states.items():
        resumed = build_train_loader(cfg, DistInfo())
        try:
            resumed.load_state_dict(state)
            got = [next(resumed) for _ in range(9 - i)]
            assert resumed.bad_samples == bad and resumed.bad_sample_locations == lost
        finally:
            resumed.close()
        _assert_same(reference[i:], got)
