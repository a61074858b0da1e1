"""The manifest's columnar shard entries: the same entries as the list they replace, at a fraction of the memory."""

from __future__ import annotations

import gc
import json
import pickle
import tracemalloc

import numpy as np
import pytest

from shards.manifest import Manifest, ManifestError, ShardEntry, read_manifest, write_manifest
from shards.shard_table import ShardTable


def _entries(n: int, derived_index: bool = True) -> list[ShardEntry]:
    """``n`` entries as a build writes them (several stats files), or with index names of their own."""
    return [ShardEntry(tar=f"part-{k % 3}/train-{k:06d}.tar",
                       index=f"part-{k % 3}/train-{k:06d}.idx" if derived_index else f"idx/{k}.index",
                       samples=1000 + k, bytes=(k + 1) * 3_000_000_000, max_sample_bytes=k % 7,
                       stats=f"stats-{k % 4}.json" if k % 5 else "")
            for k in range(n)]


@pytest.mark.parametrize("n", [0, 1, 5, 4096, 4097, 9000])
@pytest.mark.parametrize("derived_index", [True, False])
def test_the_table_is_the_list_it_was_made_from(n, derived_index):
    entries = _entries(n, derived_index)
    table = ShardTable.from_entries(entries)
    assert len(table) == n and list(table) == entries and table == entries and table == tuple(entries)
    assert [table[k] for k in range(n)] == entries  # one at a time (the loaders' access) as in bulk (iteration)
    assert table[1:n:3] == entries[1:n:3] and table[-3:] == entries[-3:] and table[n:] == []
    if n:
        assert table[-1] == entries[-1] and table[-n] == entries[0]
        assert all(type(v) is int for v in (table[-1].samples, table[-1].bytes, table[-1].max_sample_bytes))
    with pytest.raises(IndexError):
        table[n]
    with pytest.raises(IndexError):
        table[-n - 1]
    assert table.samples.tolist() == [e.samples for e in entries] and table.tars() == [e.tar for e in entries]
    assert table.indexes() == [e.index for e in entries]
    with pytest.raises(ValueError):
        table.samples[:1] = 5  # read-only: the entries are immutable
    assert pickle.loads(pickle.dumps(table)) == entries  # a manifest sent to a spawned process
    assert table != entries + [ShardEntry("x.tar", "x.idx", 1, 1)] and table != [ShardEntry("x.tar", "x.idx", 1, 1)]


def test_a_manifest_round_trips_through_its_json(tmp_path):
    entries = _entries(50, derived_index=False)[:25] + _entries(50)[25:]  # some index names derived, some not
    manifest = Manifest(shards=entries, options={"short_side": 160}, root=tmp_path)
    assert isinstance(manifest.shards, ShardTable)
    assert manifest.total_samples == sum(e.samples for e in entries)
    assert manifest.total_bytes == sum(e.bytes for e in entries) > 2**31  # int64, not int32
    assert manifest.max_sample_bytes == max(e.max_sample_bytes for e in entries)
    write_manifest(manifest, tmp_path)
    again = read_manifest(tmp_path, check_files=False)
    assert again == manifest and again.to_json() == json.loads((tmp_path / "manifest.json").read_text())
    assert Manifest(shards=[]).total_samples == 0 and Manifest(shards=[]).max_sample_bytes == 0


def test_read_manifest_keeps_under_100_bytes_per_entry(tmp_path):
    # One dataclass per entry (fields in the parsed JSON dict) kept ~560 B per entry; every rank holds the manifest.
    n = 20_000
    shards = [{"tar": f"train-{k:07d}.tar", "index": f"train-{k:07d}.idx", "samples": 10_000,
               "bytes": 1_100_000_000 + k, "max_sample_bytes": 300_000 + k, "stats": f"stats-{k // 5000}.json"}
              for k in range(n)]
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": shards}))
    gc.collect()
    tracemalloc.start()
    try:
        manifest = read_manifest(tmp_path, check_files=False)
        gc.collect()
        kept, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept / n < 100, f"{kept / n:.0f} B per entry"
    assert manifest.shards[n - 1] == ShardEntry(**shards[-1]) and np.array_equal(
        manifest.shards.bytes, [s["bytes"] for s in shards])


@pytest.mark.parametrize(("bad", "says"), [
    ({"samples": 0}, "shard 7 (train-000007.tar): samples must be an integer >= 1, got 0"),
    ({"index": ""}, "shard 7 (train-000007.tar): index must be a file name, got ''"),
    ({"stats": 3}, "shard 7 (train-000007.tar): stats must be a file name or empty, got 3"),
    ({"extra": 1}, "shard 7 (train-000007.tar) has unknown fields extra"),
])
def test_a_bad_entry_after_good_ones_is_named(tmp_path, bad, says):
    # The fast path checks whole columns; the entry that fails is then named by the entry-by-entry checks.
    shards = [{"tar": f"train-{k:06d}.tar", "index": f"train-{k:06d}.idx", "samples": 3, "bytes": 10}
              for k in range(10)]
    shards[7].update(bad)
    (tmp_path / "manifest.json").write_text(json.dumps({"version": 1, "shards": shards}))
    with pytest.raises(ManifestError, match="shards build") as info:
        read_manifest(tmp_path, check_files=False)
    assert says in str(info.value)
