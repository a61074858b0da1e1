"""`shards build` end to end on real photos plus crafted bad files: exact counts, DALI reads every sample,
identical output for any worker count, resume after a kill, parts joined == one whole run, class labels."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shards.build import BuildOptions, build_shards
from shards.manifest import read_manifest
from shards.merge import merge_manifests
from shards.verify import verify_shards
from tests.conftest import REPO
from tests.shards.bad_files import EXPECTED, write_bad_files

PER_SHARD = 8


@pytest.fixture(scope="module")
def corpus(photo_dir, tmp_path_factory) -> Path:
    """The 48 real photos (photos/indoor, photos/outdoor) plus the 14 crafted files in bad/ (62 inputs)."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(photo_dir, root / "photos")
    write_bad_files(root / "bad", sorted((root / "photos").rglob("*.jpg"))[-1])
    return root


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole")
    build_shards([str(corpus)], out, BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False))
    return out


def _files(folder: Path) -> dict[str, bytes]:
    """Every shard, index, stats and manifest file by name (what must be byte-identical between runs)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _all_stats(folder: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.stats.json"))]


def test_counts_per_reason_are_exact(whole):
    rejected = [r for s in _all_stats(whole) for r in s["rejections"]]
    by_reason = {}
    for r in rejected:
        by_reason.setdefault(r["reason"], []).append(Path(r["source"]).name)
    expected = {}
    for name, reason in EXPECTED.items():
        if reason:
            expected.setdefault(reason, []).append(name)
    duplicate_of = next(p for p in by_reason.pop("duplicate"))  # the photo whose copy bad/dup.jpg sorts first
    assert sorted(by_reason) == sorted(expected)
    assert {k: sorted(v) for k, v in by_reason.items()} == {k: sorted(v) for k, v in expected.items()}
    manifest = read_manifest(whole)
    accepted = 48 - 1 + sum(1 for r in EXPECTED.values() if r is None)  # one photo is the copy's duplicate
    assert manifest.total_samples == accepted == 53
    assert manifest.options["inputs"] == 62 and sum(manifest.options["rejected"].values()) == 62 - 53
    assert manifest.options["rejected"]["duplicate"] == 1 and duplicate_of.endswith(".jpg")
    shard_samples = [s.samples for s in manifest.shards]
    assert len(shard_samples) == -(-62 // PER_SHARD) and max(shard_samples) <= PER_SHARD


def test_every_accepted_image_decodes_in_dali_with_the_index_files(whole):
    report = verify_shards(whole, dali=True)
    assert report.ok, report.errors
    assert report.samples == report.dali_samples == 53


def test_worker_count_does_not_change_the_output(corpus, whole, tmp_path):
    build_shards([str(corpus)], tmp_path, BuildOptions(samples_per_shard=PER_SHARD, workers=2, progress=False))
    assert _files(tmp_path) == _files(whole)


def test_resume_rebuilds_torn_and_missing_groups_identically(corpus, whole, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(whole, out)
    (out / "train-000003.stats.json").unlink()  # group 3 was interrupted after its tar, before its stats
    (out / "train-000006.tar").unlink()  # group 6 lost its tar
    (out / "manifest.json").unlink()
    (out / ".train-000007.tar.partial").write_bytes(b"torn")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[0-2].tar")}
    build_shards([str(corpus)], out, BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False))
    assert _files(out) == _files(whole)
    assert not list(out.glob(".*partial"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[0-2].tar")} == before  # skipped, not redone


@pytest.mark.slow
def test_resume_after_kill_is_byte_identical(corpus, whole, tmp_path):
    """SIGKILL a real build process mid-run, rerun the same command: same shards, no duplicate, no loss."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shards", "build", str(corpus), "--out", str(out), "--samples-per-shard",
           str(PER_SHARD), "--workers", "1", "--no-progress", "--short-side", "0"]  # no resize: slower, easier to hit
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.stats.json"))) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    assert proc.poll() is None, "the build finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.stats.json")))
    assert 2 <= done < 8 and not (out / "manifest.json").exists()
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
    reference = tmp_path / "reference"
    build_shards([str(corpus)], reference, BuildOptions(samples_per_shard=PER_SHARD, workers=1, short_side=0,
                                                         progress=False))
    assert _files(out) == _files(reference)
    assert not list(out.glob(".*partial"))


@pytest.mark.parametrize("num_parts", [3])
def test_parts_joined_equal_one_whole_run(corpus, whole, tmp_path, num_parts):
    """Parts in one shared folder: merged, every file (manifest included) equals the whole run's, byte for byte.

    bad/dup.jpg (part 0) and its original photo (a later part) are a cross-part duplicate: each part keeps its
    own copy, and merge-manifests rewrites the later group, as the whole run would have written it.
    """
    shared = tmp_path / "shared"
    for i in range(num_parts):
        build_shards([str(corpus)], shared, BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False,
                                                         part=(i, num_parts)))
    parts_total = sum(json.loads(p.read_text())["total_samples"] for p in shared.glob("manifest.part-*.json"))
    assert parts_total == 54  # the cross-part duplicate is still in both parts
    merge_manifests([str(shared)], shared)
    for p in shared.glob("manifest.part-*.json"):
        p.unlink()
    assert _files(shared) == _files(whole)


def test_parts_in_separate_folders_merge_into_one_manifest(corpus, whole, tmp_path):
    dirs = [tmp_path / f"part{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        build_shards([str(corpus)], d, BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False, part=(i, 2)))
    with pytest.raises(Exception, match="complete run"):
        merge_manifests([str(dirs[0])], tmp_path / "merged")
    merged = merge_manifests([str(d) for d in dirs], tmp_path / "merged")
    reference = read_manifest(whole)
    assert [Path(s.tar).name for s in merged.shards] == [s.tar for s in reference.shards]
    for mine, ref in zip(merged.shards, reference.shards):
        assert merged.tar_path(mine).read_bytes() == reference.tar_path(ref).read_bytes()
        assert merged.index_path(mine).read_bytes() == reference.index_path(ref).read_bytes()
    assert merged.options == reference.options
    assert verify_shards(tmp_path / "merged", dali=False).ok


def test_labels_from_folders(photo_dir, tmp_path):
    manifest = build_shards([str(photo_dir)], tmp_path, BuildOptions(samples_per_shard=16, workers=1, progress=False,
                                                                      labels_from_folders=True))
    assert manifest.classes == ["indoor", "outdoor"]
    from shards.writer import read_index

    seen = set()
    for shard in manifest.shards:
        with open(manifest.tar_path(shard), "rb") as fh:
            for rec in read_index(manifest.index_path(shard)):
                files = {}
                for ext, offset, size, _ in rec.files:
                    fh.seek(offset)
                    files[ext] = fh.read(size)
                meta = json.loads(files["json"])
                folder = Path(meta["source"]).parent.name
                assert files["cls"] == str(manifest.classes.index(folder)).encode() and meta["class"] == folder
                seen.add(folder)
    assert seen == {"indoor", "outdoor"} and manifest.total_samples == 48
    assert verify_shards(tmp_path, dali=True).ok


def test_byte_target_splits_a_group(photo_dir, tmp_path):
    manifest = build_shards([str(photo_dir)], tmp_path, BuildOptions(samples_per_shard=16, max_shard_bytes=150_000,
                                                                      workers=1, progress=False))
    names = [s.tar for s in manifest.shards]
    assert "train-000000-1.tar" in names and manifest.total_samples == 48
    assert all(s.bytes <= 150_000 for s in manifest.shards)
    assert verify_shards(tmp_path, dali=True).ok
