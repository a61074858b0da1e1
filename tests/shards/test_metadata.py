"""What a sample carries besides its JPEG: an img2dataset-style input tar's .txt / .json / .cls survive re-sharding
(counted in the shard byte target), the build's own facts win a name clash without losing the input's value, and
values become plain JSON."""

from __future__ import annotations

import datetime
import decimal
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from shards.build import BuildOptions, build_shards
from shards.manifest import read_manifest
from shards.metadata import json_safe, sample_files
from shards.sources import iter_sources, read_sample
from shards.verify import verify_shards

OPTIONS = BuildOptions(samples_per_shard=16, workers=1, progress=False)


def _jpeg(path: Path) -> tuple[bytes, tuple[int, int]]:
    image = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue(), image.size


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_tar(path: Path, photos: list[Path], caption_bytes: int = 0) -> list[dict]:
    """A tar as img2dataset's webdataset writer lays it out: ``000000012.jpg`` + ``.txt`` + ``.json`` (+ ``.cls``).

    Sample 1 has no companions, sample 2 a ``.json`` that is not an object, sample 3 a NaN in its ``.json``.
    Returns what each sample's companions hold (``txt``, ``json``, ``cls`` bytes where written).
    """
    written = []
    with tarfile.open(path, "w") as tar:
        for i, photo in enumerate(photos):
            key = f"{i:09d}"
            jpeg, (width, height) = _jpeg(photo)
            _add(tar, f"{key}.jpg", jpeg)
            files: dict[str, bytes] = {}
            if i != 1:
                caption = f"photo {photo.stem} – numéro {i}" + "." * caption_bytes
                meta = {"url": f"https://example.com/{photo.name}", "key": key, "caption": caption,
                        "status": "success", "width": width, "height": height, "original_width": width * 2,
                        "sha256": f"{i:064x}", "exif": '{"Image Make": "Canon"}'}
                files["txt"] = caption.encode()
                files["json"] = b"[1, 2]" if i == 2 else json.dumps(meta).encode().replace(
                    b'"success"', b"NaN" if i == 3 else b'"success"')
                files["cls"] = str(i % 3).encode()
            for ext, data in files.items():
                _add(tar, f"{key}.{ext}", data)
            written.append(files)
    return written


def _samples(out: Path) -> list[dict]:
    """Every sample of the set, read through the manifest's brace pattern with webdataset."""
    pattern = read_manifest(out).to_json()["pattern"]
    return list(wds.WebDataset(str(out / pattern), shardshuffle=False, empty_check=False))


def test_an_img2dataset_tar_keeps_its_caption_metadata_and_label(photo_dir, tmp_path):
    photos = sorted(photo_dir.rglob("*.*"))[:12]
    written = write_img2dataset_tar(tmp_path / "00000.tar", photos)
    manifest = build_shards([str(tmp_path / "00000.tar")], tmp_path / "out", OPTIONS)
    samples = _samples(tmp_path / "out")
    assert manifest.total_samples == len(samples) == 12
    for i, (sample, files) in enumerate(zip(samples, written)):
        carried = {k for k in sample if not k.startswith("__")} - {"jpg", "json"}
        assert carried == set(files) - {"json"}
        assert all(sample[ext] == files[ext] for ext in carried)  # .txt and .cls byte for byte
        meta = json.loads(sample["json"])
        stored = Image.open(io.BytesIO(sample["jpg"]))
        assert (meta["width"], meta["height"]) == stored.size and meta["key"] == sample["__key__"]
        assert meta["source"] == f"{tmp_path / '00000.tar'}::{i:09d}.jpg"
        if i == 1:
            assert not any(k.startswith("input_") or k in ("url", "caption") for k in meta)
        elif i == 2:
            assert meta["input_json"] == "[1, 2]"
        else:
            original = json.loads(files["json"])
            assert meta["caption"] == original["caption"] == files["txt"].decode()
            assert meta["url"] == original["url"] and meta["exif"] == original["exif"]
            assert meta["sha256"] == original["sha256"] and meta["original_width"] == original["original_width"]
            assert meta["input_key"] == f"{i:09d}"  # img2dataset's key and sizes, next to the build's
            assert (meta["input_width"], meta["input_height"]) == Image.open(photos[i]).size
            assert meta["status"] == (None if i == 3 else "success")  # NaN is not JSON: null
    assert verify_shards(tmp_path / "out", dali=True).ok


def test_companions_are_read_by_the_worker_from_offsets(photo_dir, tmp_path):
    """The main process records where the companions are; their bytes come with the image in one read."""
    photos = sorted(photo_dir.rglob("*.*"))[:3]
    written = write_img2dataset_tar(tmp_path / "a.tar", photos)
    sources = list(iter_sources([str(tmp_path / "a.tar")]))
    assert [[ext for ext, _, _ in s.companions] for s in sources] == [["txt", "json", "cls"], [],
                                                                       ["txt", "json", "cls"]]
    for source, files in zip(sources, written):
        image, companions = read_sample(source)
        assert companions == files and image[:2] == b"\xff\xd8"


def test_companion_bytes_count_in_the_shard_byte_target(photo_dir, tmp_path):
    """Long captions make the shards split earlier; no shard passes the target."""
    photos = sorted(photo_dir.rglob("*.*"))[:16]
    write_img2dataset_tar(tmp_path / "a.tar", photos, caption_bytes=30_000)  # .txt and .json: ~60 KB a sample
    limit = 300_000
    manifest = build_shards([str(tmp_path / "a.tar")], tmp_path / "out",
                            BuildOptions(samples_per_shard=16, max_shard_bytes=limit, workers=1, progress=False))
    assert manifest.total_samples == 16 and len(manifest.shards) >= 4
    assert all(s.bytes <= limit for s in manifest.shards)
    assert max(s.max_sample_bytes for s in manifest.shards) > 60_000
    assert len(_samples(tmp_path / "out")) == 16


def test_a_listed_tar_is_expanded_with_its_metadata(photo_dir, tmp_path):
    photos = sorted(photo_dir.rglob("*.*"))[:4]
    (tmp_path / "tars").mkdir()
    written = write_img2dataset_tar(tmp_path / "tars" / "00000.tar", photos)
    (tmp_path / "tars.txt").write_text("tars/00000.tar\n")
    build_shards([str(tmp_path / "tars.txt")], tmp_path / "out", OPTIONS)
    samples = _samples(tmp_path / "out")
    assert [s.get("txt") for s in samples] == [f.get("txt") for f in written]


def test_folder_labels_win_over_an_input_tars_cls(photo_dir, tmp_path):
    (tmp_path / "corpus" / "birds").mkdir(parents=True)
    (tmp_path / "corpus" / "cats").mkdir()
    write_img2dataset_tar(tmp_path / "corpus" / "cats" / "a.tar", sorted(photo_dir.rglob("*.*"))[:3])
    manifest = build_shards([str(tmp_path / "corpus")], tmp_path / "out",
                            BuildOptions(samples_per_shard=16, workers=1, progress=False, labels_from_folders=True))
    assert manifest.classes == ["birds", "cats"]
    samples = _samples(tmp_path / "out")
    assert [s["cls"] for s in samples] == [b"1"] * 3
    assert [json.loads(s["json"]).get("input_cls") for s in samples] == ["0", None, "2"]


def test_the_build_facts_win_and_the_input_values_are_kept():
    facts = {"key": "0000000007", "source": "a.tar::7.jpg", "width": 256, "height": 200, "hash": "ab"}
    files = sample_files(b"JPEG", facts, None, {}, {"width": "column", "input_width": "taken", "id": 3},
                         {"json": b'{"key": "000000007", "caption": "a cat"}', "txt": b"a cat", "cls": b"4"})
    assert list(files) == ["jpg", "cls", "json", "txt"] and files["cls"] == b"4" and files["txt"] == b"a cat"
    assert json.loads(files["json"]) == {**facts, "input_key": "000000007", "caption": "a cat", "id": 3,
                                         "input_width": "taken", "input_input_width": "column"}
    plain = sample_files(b"JPEG", facts, "cats", {"cats": 1}, None, {})
    assert list(plain) == ["jpg", "cls", "json"] and plain["cls"] == b"1"
    assert plain["json"] == json.dumps({**facts, "class": "cats"}, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("value, expected", [
    (float("nan"), None), (float("-inf"), None), (1.5, 1.5), (True, True), (None, None), ("é", "é"),
    (datetime.datetime(2020, 1, 2, 3, 4, 5), "2020-01-02T03:04:05"), (datetime.date(2020, 1, 2), "2020-01-02"),
    (datetime.timedelta(seconds=90), 90.0), (decimal.Decimal("0.10"), "0.10"),
    (b"caption", "caption"), (b"\xff\xfe", "//4="), ({1: [float("nan"), (2, 3)]}, {"1": [None, [2, 3]]}),
])
def test_json_safe(value, expected):
    assert json_safe(value) == expected
    json.dumps(json_safe(value), allow_nan=False)
