"""`shards build` end to end on real photos plus crafted bad files: exact counts, DALI reads every sample,
identical output for any worker count, resume after a kill, parts (of folders and of list files) that cover
every input once and merge into one contiguous set with cross-part duplicates removed once, class labels."""

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
import webdataset as wds

from shards.build import BuildError, BuildOptions, build_shards
from shards.convert import ConvertOptions, conversion_path
from shards.digests import DIGEST_SIZE, decode_digests
from shards.manifest import ManifestError, read_manifest
from shards.merge import find_duplicates, merge_manifests
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
    (out / "train-g000003.stats.json").unlink()  # group 3 was interrupted after its tar, before its stats
    (out / "train-000006.tar").unlink()  # group 6 lost its tar (later groups are redone too: names follow on)
    (out / "manifest.json").unlink()
    (out / ".train-000007.tar.partial").write_bytes(b"torn")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[0-2].tar")}
    build_shards([str(corpus)], out, BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False))
    assert _files(out) == _files(whole)
    assert not list(out.glob(".*partial"))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-00000[0-2].tar")} == before  # skipped, not redone



def test_the_jpeg_conversion_path_is_recorded_and_never_mixed_on_resume(corpus, whole, tmp_path, monkeypatch):
    """Stats and manifest say which code converted the JPEGs; a resume with the other path is refused, because its
    pixels (and so the duplicate hashes) would differ from the groups already written."""
    import shards.convert

    path = conversion_path(ConvertOptions())
    assert read_manifest(whole).options["conversion"] == path
    assert {s["options"]["conversion"] for s in _all_stats(whole)} == {path}
    if path == "pillow":
        return  # simplejpeg / OpenCV not installed: there is no other path to mix in
    shutil.copytree(whole, tmp_path / "out")
    monkeypatch.setattr(shards.convert, "fast_codecs", lambda: None)
    with pytest.raises(BuildError, match="other options"):
        build_shards([str(corpus)], tmp_path / "out", BuildOptions(samples_per_shard=PER_SHARD, workers=1,
                                                                    progress=False))

def test_groups_written_before_the_recorded_conversion_path_still_resume(corpus, tmp_path, monkeypatch):
    """Stats of a build made before ``path_column`` and ``conversion`` were recorded (it used Pillow) resume as
    Pillow-path groups, not as groups "built with other options"."""
    import shards.convert

    monkeypatch.setattr(shards.convert, "fast_codecs", lambda: None)
    options = BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False)
    out = tmp_path / "out"
    build_shards([str(corpus)], out, options)
    tars = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    stats_files = sorted(out.glob("*.stats.json"))
    for path in stats_files:
        stats = json.loads(path.read_text())
        del stats["options"]["path_column"], stats["options"]["conversion"]
        path.write_text(json.dumps(stats))
    stats_files[-1].unlink()  # the old run was interrupted in its last group
    (out / "manifest.json").unlink()
    build_shards([str(corpus)], out, options)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == tars
    assert read_manifest(out).options["conversion"] == "pillow"


def test_a_part_built_before_the_recorded_conversion_path_merges_with_newer_parts(corpus, tmp_path, monkeypatch):
    """The merge reads part manifests that lack ``path_column`` and ``conversion`` as a resume reads such stats:
    the Pillow path with no column, so they join newer Pillow-path parts instead of being refused."""
    import shards.convert

    monkeypatch.setattr(shards.convert, "fast_codecs", lambda: None)
    shared = tmp_path / "shared"
    for i in range(2):
        build_shards([str(corpus)], shared, _opts(part=(i, 2)))
    old = shared / "manifest.part-0000-of-0002.json"  # part 0 as the code before the two options wrote it
    raw = json.loads(old.read_text())
    del raw["options"]["path_column"], raw["options"]["conversion"]
    old.write_text(json.dumps(raw))
    merged = merge_manifests([str(shared)], shared)
    assert merged.total_samples == 53 and merged.options["conversion"] == "pillow"
    assert merged.options["path_column"] == ""


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


def _opts(**kw) -> BuildOptions:
    return BuildOptions(samples_per_shard=PER_SHARD, workers=1, progress=False, **kw)


def _hashes(manifest) -> list[str]:
    """The content hash of every sample of the shard set, read through the brace pattern with webdataset."""
    pattern = manifest.to_json()["pattern"]
    assert pattern is not None, [s.tar for s in manifest.shards]
    samples = list(wds.WebDataset(str(manifest.root / pattern), shardshuffle=False, empty_check=False))
    assert len(samples) == manifest.total_samples
    return [json.loads(s["json"])["hash"] for s in samples]


@pytest.fixture(scope="module")
def parts5(corpus, tmp_path_factory) -> Path:
    """The corpus built as 5 parts into one shared folder (not merged: tests merge copies).

    With 5 parts, bad/dup.jpg (part 1) and its original photo (part 4) land in different parts (the split is a
    fixed hash of their paths): each part keeps its copy, and the merge must drop the later one.
    """
    shared = tmp_path_factory.mktemp("parts5")
    for i in range(5):
        build_shards([str(corpus)], shared, _opts(part=(i, 5)))
    return shared


def test_parts_cover_every_input_once_and_merge_like_one_whole_run(parts5, whole, tmp_path):
    """5 parts: every input in exactly one part; merged, the same images as the whole run, each exactly once.

    bad/dup.jpg and its original photo are one image in two parts: part 1 keeps it, the merge drops part 4's.
    """
    stats = [json.loads(p.read_text()) for p in sorted(parts5.glob("*.stats.json"))]
    sources = [r["source"] for s in stats for r in s["rejections"]]
    manifests = [json.loads(p.read_text()) for p in sorted(parts5.glob("manifest.part-*.json"))]
    assert sum(m["options"]["inputs"] for m in manifests) == 62 and all(m["options"]["inputs"] < 62 for m in manifests)
    shared = tmp_path / "shared"
    shutil.copytree(parts5, shared)
    (shared / "train-p0002-000099.tar").write_bytes(b"left by a rewrite killed after its commit")
    merged = merge_manifests([str(shared)], shared)
    reference = read_manifest(whole)
    assert merged.options["inputs"] == 62 and merged.options["rejected"] == reference.options["rejected"]
    assert merged.total_samples == reference.total_samples == 53
    hashes = _hashes(merged)
    assert len(set(hashes)) == len(hashes) and sorted(hashes) == sorted(_hashes(reference))
    assert len(sources) == len(set(sources))  # no input rejected twice
    dropped = [r for p in shared.glob("train-p0004-*.stats.json") for r in json.loads(p.read_text())["rejections"]
               if r["reason"] == "duplicate"]
    assert [Path(r["source"]).parent.name for r in dropped] == ["outdoor"]  # the original, after bad/dup.jpg
    assert merged.to_json()["pattern"] == f"train-{{000000..{len(merged.shards) - 1:06d}}}.tar"
    assert not list(shared.glob("train-p*.tar")) and verify_shards(shared, dali=True).ok


def test_merge_by_hash_prefix_slices_equals_the_merge_in_one_process(parts5, tmp_path):
    """Two slice runs (each holding only its slice's digests) then the merge: same files as one in-memory merge."""
    one, sliced = tmp_path / "one", tmp_path / "sliced"
    shutil.copytree(parts5, one)
    shutil.copytree(parts5, sliced)
    merge_manifests([str(one)], one)
    from shards.__main__ import main

    assert main(["merge-manifests", str(sliced), "--out", str(sliced), "--hash-prefix", "1/2"]) == 0
    assert main(["merge-manifests", str(sliced), "--out", str(sliced), "--hash-prefix", "2/2"]) == 2
    with pytest.raises(ManifestError, match="1 of 2 duplicate slices.*K = 0"):
        merge_manifests([str(sliced)], sliced)
    slices = [find_duplicates([str(sliced)], sliced, (k, 2)) for k in (0, 1)]
    assert [s["digests"] > 0 for s in slices] == [True, True] and sum(s["digests"] for s in slices) == 53
    in_parts = sum(json.loads(p.read_text())["total_samples"] for p in sliced.glob("manifest.part-*.json"))
    assert in_parts == 54  # bad/dup.jpg and its original landed in different parts: one is a cross-part duplicate
    assert sum(len(h) for s in slices for h in s["duplicates"].values()) == 1
    merge_manifests([str(sliced)], sliced)
    for p in sliced.glob("duplicates-*.json"):
        p.unlink()
    assert _files(sliced) == _files(one)
    assert merge_manifests([str(sliced)], sliced).total_samples == 53  # a rerun returns the finished merge


def test_interrupted_merge_resumes(parts5, tmp_path, monkeypatch):
    import shards.merge as merge

    shared = tmp_path / "shared"
    shutil.copytree(parts5, shared)
    calls = []
    real = os.replace

    def failing_replace(src, dst):
        calls.append(dst)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed half way through the renames
        return real(src, dst)

    monkeypatch.setattr(merge.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        merge_manifests([str(shared)], shared)
    monkeypatch.setattr(merge.os, "replace", real)
    assert not (shared / "manifest.json").exists()
    merged = merge_manifests([str(shared)], shared)
    assert merged.total_samples == 53 and len(set(_hashes(merged))) == 53
    assert verify_shards(shared, dali=False).ok


def test_parts_in_separate_folders_merge_into_one_manifest(corpus, whole, tmp_path):
    dirs = [tmp_path / f"part{i}" for i in range(2)]
    for i, d in enumerate(dirs):
        build_shards([str(corpus)], d, _opts(part=(i, 2)))
    with pytest.raises(Exception, match="complete run"):
        merge_manifests([str(dirs[0])], tmp_path / "merged")
    merged = merge_manifests([str(d) for d in dirs], tmp_path / "merged")
    reference = read_manifest(whole)
    assert merged.total_samples == reference.total_samples
    assert sorted(_hashes(merged)) == sorted(_hashes(reference))
    assert {k: v for k, v in merged.options.items() if k not in ("parts", "fingerprint", "groups")} == \
        {k: v for k, v in reference.options.items() if k != "groups"}
    assert verify_shards(tmp_path / "merged", dali=False).ok
    with pytest.raises(Exception, match="holds a merged set"):
        build_shards([str(corpus)], tmp_path / "merged", _opts())


def _list_file(folder: Path, photo_dir: Path) -> tuple[Path, list[str]]:
    """A list of the 48 photos (relative paths), 3 missing files, comments and blank lines."""
    photos = sorted(os.path.relpath(p, folder) for p in photo_dir.rglob("*.*"))
    lines = ["# the corpus", *photos[:20], "", "missing/a.jpg", *photos[20:], "missing/b.jpg", "  ", "missing/c.jpg"]
    path = folder / "paths.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, [os.path.normpath(folder / p) for p in photos + ["missing/a.jpg", "missing/b.jpg", "missing/c.jpg"]]


def _read_bytes() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


@pytest.mark.parametrize("num_parts", [1, 4, 7])
def test_list_file_parts_read_only_their_byte_range(tmp_path, num_parts):
    """Each part reads its slice of the list file (not the list), and the parts hold every line exactly once."""
    from shards.sources import iter_sources

    names = [f"dir{i % 7}/img_{i:06d}.jpg" for i in range(20_000)]
    path = tmp_path / "big.lst"
    path.write_text("\n".join(names) + "\n")
    seen = []
    for i in range(num_parts):
        before = _read_bytes()
        mine = [s.id for s in iter_sources([str(path)], (i, num_parts))]
        assert _read_bytes() - before < path.stat().st_size / num_parts + 64 * 1024
        seen.extend(mine)
        assert abs(len(mine) - 20_000 / num_parts) < 30  # balanced by bytes ~ lines
    assert seen == [os.path.normpath(tmp_path / n) for n in names]  # in order, each once


@pytest.mark.parametrize("num_parts", [2, 5])
def test_folder_parts_partition_the_files(corpus, num_parts):
    from shards.sources import iter_sources

    whole = [s.id for s in iter_sources([str(corpus)])]
    parts = [[s.id for s in iter_sources([str(corpus)], (i, num_parts))] for i in range(num_parts)]
    assert sorted(x for p in parts for x in p) == sorted(whole) and len(whole) == 62
    assert all(parts)  # every part has some of the 62
    for p in parts:  # each part keeps the walk's order
        assert p == [x for x in whole if x in set(p)]


def test_list_file_parts_build_resume_and_merge(photo_dir, tmp_path):
    """Parts of a list file; part 1 is interrupted (stats of its last groups lost, a torn partial) and rerun."""
    lst, expected = _list_file(tmp_path, photo_dir)
    out = tmp_path / "out"
    for i in range(3):
        build_shards([str(lst)], out, _opts(part=(i, 3)))
    part1 = sorted(out.glob("train-p0001-*"))
    before = {p.name: p.read_bytes() for p in part1}
    stats = sorted(out.glob("train-p0001-g*.stats.json"))
    assert len(stats) >= 2
    stats[-1].unlink()
    (out / "train-p0001-000000.tar").touch()  # a kill can't do this, but a bad copy can: group 0 is redone
    (out / ".train-p0001-000009.tar.partial").write_bytes(b"torn")
    build_shards([str(lst)], out, _opts(part=(1, 3)))
    assert {p.name: p.read_bytes() for p in sorted(out.glob("train-p0001-*"))} == before
    assert not list(out.glob(".*partial"))
    merged = merge_manifests([str(out)], out)
    rejected = [r for p in out.glob("*.stats.json") for r in json.loads(p.read_text())["rejections"]]
    assert sorted(r["source"] for r in rejected) == [p for p in expected if "missing" in p]
    assert {r["reason"] for r in rejected} == {"unreadable"}
    assert merged.options["inputs"] == 51 and merged.total_samples == 48 and len(set(_hashes(merged))) == 48


def test_digests_in_stats_files_are_the_samples_hashes(whole):
    """A group's binary digests (base64 in its stats file) are, in order, the hashes in its samples' JSON."""
    groups = sorted(whole.glob("*.stats.json"))
    assert len(groups) == 8
    for path in groups:
        stats = json.loads(path.read_text())
        raw = decode_digests(stats["digests"])
        hashes = [json.loads(sample["json"])["hash"] for shard in stats["shards"]
                  for sample in wds.WebDataset(str(whole / shard["tar"]), shardshuffle=False)]
        assert [raw[k:k + DIGEST_SIZE].hex() for k in range(0, len(raw), DIGEST_SIZE)] == hashes
        assert len(hashes) == stats["accepted"]


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


def test_byte_target_splits_a_group_into_contiguous_names(photo_dir, tmp_path):
    """Overflow shards take the next numbers: the manifest's one brace pattern reads every sample."""
    manifest = build_shards([str(photo_dir)], tmp_path, BuildOptions(samples_per_shard=16, max_shard_bytes=150_000,
                                                                      workers=1, progress=False))
    names = [s.tar for s in manifest.shards]
    assert len(names) > 3 and names == [f"train-{k:06d}.tar" for k in range(len(names))]
    assert manifest.total_samples == 48 and len(_hashes(manifest)) == 48
    assert all(s.bytes <= 150_000 for s in manifest.shards)
    assert verify_shards(tmp_path, dali=True).ok


def test_an_older_layout_is_refused_not_deleted(photo_dir, tmp_path):
    (tmp_path / "train-000000.tar").write_bytes(b"old shard")
    (tmp_path / "train-000000.stats.json").write_text('{"hashes": []}')
    with pytest.raises(Exception, match="older layout"):
        build_shards([str(photo_dir)], tmp_path, _opts())
    assert (tmp_path / "train-000000.tar").read_bytes() == b"old shard"


@pytest.mark.parametrize("args", [["s3://bucket/parts", "--out", "{tmp}"], ["{tmp}", "--out", "s3://bucket/merged"]])
def test_merge_of_object_storage_is_a_one_line_error(args, parts5, tmp_path, capsys):
    from shards.__main__ import main

    shutil.copytree(parts5, tmp_path, dirs_exist_ok=True)
    assert main(["merge-manifests", *[a.format(tmp=tmp_path) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: merge-manifests renames shards") and len(err.splitlines()) == 1
    assert not (tmp_path / "manifest.json").exists()
