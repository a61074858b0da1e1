"""The run's ledger of damaged data: each damaged shard and sample counted once over ranks, passes and resumes.

The exchange between real gloo ranks is tested in ``tests/faults/test_damaged_shards.py`` (a loader-only run and
a train.py run of 2 ranks); here the ranks' loaders live in one process and their parts are merged in rank order,
as :meth:`BadDataLedger.gather` does after its all-gather.
"""

from __future__ import annotations

import pytest
import torch

from distributed import DistInfo
from pipeline import build_train_loader
from tests.conftest import write_simple_shards
from tests.faults import damage
from tests.pipeline.helpers import make_cfg
from training.bad_data import BadDataLedger
from training.checkpoint import Checkpointer, load_checkpoint
from training.metrics import TooManyBadSamples, check_window
from training.resume import restore


@pytest.fixture(scope="module")
def clean(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    write_simple_shards(sorted(photo_dir.rglob("*.*")), out, per_shard=16)
    return out


def test_a_shard_both_ranks_drop_counts_once_against_the_threshold(clean, tmp_path):
    # Seed 0 deals shard 1 to rank 1 in pass 0 and to rank 0 in pass 1: each rank drops it (16 samples each, 32
    # summed over ranks); the ledger counts its 16 samples once, and the threshold of 16 is not passed.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    damage.empty_file(root / "train-000001.tar")
    cfg = make_cfg(root, "pytorch", batch_size_per_gpu=4, num_threads=1)
    loaders = [build_train_loader(cfg, DistInfo(rank=r, world_size=2)) for r in range(2)]
    ledger = BadDataLedger(loaders[0].manifest.root)
    try:
        for loader in loaders:
            for _ in range(loader.batches_per_pass + 1):  # into pass 1
                next(loader)
        assert [loader.bad_samples for loader in loaders] == [16, 16]
        for _ in range(2):  # two log points: the second finds nothing new to share
            parts = [ledger.unseen(loader.dropped_shards, loader.bad_sample_locations) for loader in loaders]
            for part in parts:
                ledger.merge(part)
        assert [len(p) for p in parts] == [0, 0]
    finally:
        for loader in loaders:
            loader.close()
    assert ledger.count == 16 and ledger.shards == 1 and list(ledger.items) == [("train-000001.tar", "")]
    check_window(9, {"loss": 1.0, "bad_samples": ledger.count}, 16, None, ledger.examples())
    with pytest.raises(TooManyBadSamples, match=rf"16 corrupt samples .*=15\).*{root}/train-000001.tar \(unreadable"):
        check_window(9, {"loss": 1.0, "bad_samples": ledger.count}, 15, None, ledger.examples())


def test_identity_is_shard_and_member_under_the_root():
    ledger = BadDataLedger("/data/shards")
    # Rank 0 found a corrupt JPEG and a cut tail; rank 1 found the same JPEG (the offset plays no part) and later
    # the cut shard unreadable as a whole: its samples already counted are not counted again.
    ledger.merge(ledger.unseen({}, ["/data/shards/a.tar:512:x.jpg", "/data/shards/b.tar:0:y.jpg"]))
    ledger.merge(ledger.unseen({"/data/shards/b.tar": 10}, ["/data/shards/a.tar:1024:x.jpg"]))
    assert ledger.count == 1 + 10 and ledger.shards == 1
    assert ledger.examples(2) == ["/data/shards/a.tar:x.jpg", "/data/shards/b.tar:y.jpg"]
    # After a resume with the shards moved (data.shards may change), the same damage is recognised.
    moved = BadDataLedger("/mnt/copy")
    moved.load_state_dict(ledger.state_dict())
    assert moved.unseen({"/mnt/copy/b.tar": 10}, ["/mnt/copy/a.tar:512:x.jpg"]) == []
    assert moved.unseen({}, ["/elsewhere/c.tar:0:z.jpg"]) == [("/elsewhere/c.tar", "z.jpg", 1)]
    url = BadDataLedger("s3://bucket/shards/")
    assert url.unseen({"s3://bucket/shards/d.tar": 5}, []) == [("d.tar", "", 5)]


class _Loader:
    """What the checkpointer reads of a loader: its position and the damage it found since the last log point."""

    def __init__(self, dropped: dict[str, int], locations: list[str]):
        self.dropped_shards, self.bad_sample_locations = dropped, locations

    def state_dict(self) -> dict:
        return {"pass_index": 0, "bad_sample_locations": list(self.bad_sample_locations)}


def test_the_checkpoint_keeps_the_ledger_and_a_resume_on_other_ranks_restores_it(tmp_path):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ledger = BadDataLedger("/data")
    ledger.merge([("a.tar", "", 16)])  # shared at an earlier log point
    loader = _Loader({"/data/a.tar": 16}, ["/data/b.tar:512:x.jpg"])  # b's sample found since that log point
    checkpointer = Checkpointer(tmp_path, 2, DistInfo(), {"run": {"seed": 1}}, model, optimizer, scaler, loader,
                                bad_data=ledger)
    path = checkpointer.save(5, 40)
    assert ledger.count == 17  # the checkpoint's gather shared it
    state = load_checkpoint(path)
    assert state["bad_data"] == {"items": [["a.tar", "", 16], ["b.tar", "x.jpg", 1]]}
    # Two ranks now: the loader states (one rank's) are not restored, the damage counted so far is.
    resumed = BadDataLedger("/data")
    restore(path, state, DistInfo(rank=0, world_size=2), model, optimizer, scaler, None, resumed)
    assert resumed.items == ledger.items and resumed.count == 17


def test_a_checkpoint_counts_damage_a_check_ahead_of_its_window_found(clean, tmp_path):
    # The DALI loader checks the next window's shards in its preparing thread; the loader's thread counts that damage
    # only later (in next() or state_dict()). A checkpoint taken in between must still hold it in its ledger.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    cfg = make_cfg(root, "pytorch", batch_size_per_gpu=4, num_threads=1, window_shards=1)
    loader = build_train_loader(cfg, DistInfo())
    ledger = BadDataLedger(loader.manifest.root)
    try:
        ahead = int(loader.window_shards_of(1)[0])  # not checked at construction (only window 0 is)
        damage.empty_file(root / loader.manifest.shards[ahead].tar)
        assert loader.shard_checks.check(ahead).damaged and loader.dropped_shards == {}  # found, not yet counted
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        checkpointer = Checkpointer(tmp_path / "ckpt", 2, DistInfo(), {}, model, optimizer, scaler, loader,
                                    bad_data=ledger)
        state = load_checkpoint(checkpointer.save(1, 4))
    finally:
        loader.close()
    name = loader.manifest.shards[ahead].tar
    assert list(state["loader"][0]["dropped_shards"].values()) == [16]  # the loader's own log has it ...
    assert state["bad_data"] == {"items": [[name, "", 16]]} and ledger.count == 16  # ... and so does the ledger
