"""Wrong ``--shards`` and broken manifests: one line naming the file and the fix, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from shards.manifest import ManifestError, read_manifest
from tests.conftest import REPO


def _manifest_with(shard_dir: Path, tmp_path: Path, **fields) -> Path:
    """A copy of the shard directory whose first shard entry has ``fields`` set (None: removed)."""
    out = tmp_path / "shards"
    shutil.copytree(shard_dir, out)
    raw = json.loads((out / "manifest.json").read_text())
    for name, value in fields.items():
        if value is None:
            raw["shards"][0].pop(name)
        else:
            raw["shards"][0][name] = value
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


@pytest.mark.parametrize(("fields", "says"), [
    ({"samples": "16"}, "shard 0 (train-000000.tar): samples must be an integer >= 1, got '16'"),
    ({"samples": "many"}, "samples must be an integer >= 1, got 'many'"),
    ({"samples": -3}, "samples must be an integer >= 1, got -3"),
    ({"samples": 0}, "samples must be an integer >= 1, got 0"),
    ({"samples": True}, "samples must be an integer >= 1, got True"),
    ({"bytes": 1.5}, "bytes must be an integer >= 0, got 1.5"),
    ({"samples": None}, "shard 0 (train-000000.tar) lacks samples"),
    ({"index": None}, "lacks index"),
    ({"tar": 7}, "tar must be a file name, got 7"),
    ({"checksum": "abc"}, "has unknown fields checksum"),
    ({"stats": ["a.json"]}, "stats must be a file name or empty, got ['a.json']"),
    ({"bytes": 1 << 63}, f"bytes must be below 2**63, got {1 << 63}"),
    ({"max_sample_bytes": -1}, "max_sample_bytes must be an integer >= 0, got -1"),
])
def test_bad_shard_fields_are_named(shard_dir, tmp_path, fields, says):
    root = _manifest_with(shard_dir, tmp_path, **fields)
    with pytest.raises(ManifestError, match="python -m shards build") as info:
        read_manifest(root)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_not_utf8_not_json_not_a_manifest(tmp_path):
    cases = {"latin.json": "é".encode("latin-1") * 10, "broken.json": b'{"shards": [', "list.json": b"[1, 2]"}
    says = {"latin.json": "not UTF-8 text", "broken.json": "is not valid JSON (Expecting value, line 1 column 13)",
            "list.json": 'not a shard manifest (no "shards" list)'}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ManifestError, match=r"\(|shards build") as info:
            read_manifest(tmp_path / name)
        assert says[name] in str(info.value), info.value


def test_a_tar_an_image_folder_and_a_folder_of_tars(shard_dir, photo_dir, tmp_path):
    with pytest.raises(ManifestError, match="is a tar shard, not a manifest: pass the directory"):
        read_manifest(shard_dir / "train-000000.tar")
    with pytest.raises(ManifestError, match=f"{photo_dir} holds images, not shards: .*shards build {photo_dir}"):
        read_manifest(photo_dir)  # the images sit in class folders one level down
    tars = tmp_path / "tars"
    tars.mkdir()
    shutil.copy(shard_dir / "train-000000.tar", tars)
    with pytest.raises(ManifestError, match=r"no manifest.json in .* \(it holds 1 .tar files\).*merge-manifests"):
        read_manifest(tars)
    with pytest.raises(ManifestError, match="shard manifest not found"):
        read_manifest(tmp_path / "nowhere")


@pytest.mark.slow
def test_train_says_one_line_and_exits_2(photo_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "--shards", str(photo_dir), "--run-dir",
                           str(tmp_path / "run"), "--total-steps", "1", "--device", "cpu", "--wandb-mode", "disabled"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert f"{photo_dir} holds images, not shards: build shards from it first with `python -m shards build" in lines[0]


def test_entries_read_fast_are_the_checked_dataclass(shard_dir, tmp_path):
    # read_manifest keeps the entries as columns (shards.shard_table, O(shards) per rank): the entries it gives back
    # must be the same values, defaults included, and behave as the frozen dataclass does.
    import dataclasses

    from shards.manifest import ShardEntry

    root = _manifest_with(shard_dir, tmp_path, max_sample_bytes=None, stats=None)
    raw = json.loads((root / "manifest.json").read_text())["shards"]
    entries = read_manifest(root).shards
    assert entries == [ShardEntry(**s) for s in raw] and entries[0].max_sample_bytes == 0 and entries[0].stats == ""
    assert dataclasses.replace(entries[1], samples=3).samples == 3 and len({*entries, *entries}) == len(entries)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entries[0].samples = 5


def test_a_missing_file_in_a_sub_folder_is_named(shard_dir, tmp_path):
    # File existence is checked by one listing per folder: shards in a sub-folder are found, a missing one named.
    root = tmp_path / "shards"
    shutil.copytree(shard_dir, root)
    (root / "part-1").mkdir()
    raw = json.loads((root / "manifest.json").read_text())
    for key in ("tar", "index"):
        os.replace(root / raw["shards"][1][key], root / "part-1" / raw["shards"][1][key])
        raw["shards"][1][key] = "part-1/" + raw["shards"][1][key]
    (root / "manifest.json").write_text(json.dumps(raw))
    assert read_manifest(root).shards[1].tar == "part-1/train-000001.tar"
    (root / "part-1" / "train-000001.idx").unlink()
    with pytest.raises(ManifestError, match=r"^missing index file: .*part-1/train-000001\.idx$"):
        read_manifest(root)
