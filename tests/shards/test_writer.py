"""Tar framing byte for byte against tarfile, the DALI index, and the manifest's brace pattern."""

from __future__ import annotations

import io
import os
import random
import tarfile

import pytest
import webdataset as wds

from shards.manifest import brace_pattern
from shards.writer import ShardWriter, frame_sample, read_index


def _tarfile_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    """The same samples written by the standard library (what the writer used to do)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uname, info.gname = len(data), 0, 0o644, "", ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("count", [1, 3, 40])
def test_shards_are_byte_identical_to_tarfile(tmp_path, count):
    rng = random.Random(count)
    sizes = [0, 1, 511, 512, 513, 10_000, 10240]
    samples = [(f"p{rng.randint(0, 9999):04d}-{i:010d}", {"jpg": rng.randbytes(rng.choice(sizes)), "cls": b"7",
                                                            "json": b'{"k":1}' * rng.randint(0, 200)})
               for i in range(count)]
    writer = ShardWriter(tmp_path, "t")
    for key, files in samples:
        writer.write(key, files)
    entry = writer.close()
    data = (tmp_path / "t.tar").read_bytes()
    assert data == _tarfile_bytes(samples) and entry.bytes == len(data) and entry.samples == count
    with tarfile.open(tmp_path / "t.tar") as tar:  # the index points at every member's data
        members = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    assert [(n, o, s) for rec in read_index(tmp_path / "t.idx") for _e, o, s, n in rec.files] == members


def test_framed_samples_written_elsewhere_land_at_the_right_offsets(tmp_path):
    writer = ShardWriter(tmp_path, "t")
    writer.write("a", {"jpg": b"x" * 700})
    writer.write_framed("b", frame_sample("b", {"jpg": b"y" * 5, "json": b"{}"}))  # as a worker sends it
    writer.close()
    samples = list(wds.WebDataset(str(tmp_path / "t.tar"), shardshuffle=False, empty_check=False))
    assert [(s["__key__"], s.get("jpg"), s.get("json")) for s in samples] == [("a", b"x" * 700, None),
                                                                               ("b", b"y" * 5, b"{}")]


def test_bad_keys_are_refused():
    for key in ("a.b", "a/b", "k" * 100):
        with pytest.raises(ValueError):
            frame_sample(key, {"jpg": b""})


def test_brace_pattern_names_exactly_the_sequence():
    names = [f"train-{k:06d}.tar" for k in range(12)]
    assert brace_pattern(names) == "train-{000000..000011}.tar"
    assert brace_pattern(["x-p0003-000004.tar", "x-p0003-000005.tar"]) == "x-p0003-{000004..000005}.tar"
    assert brace_pattern(names[:3] + names[4:]) is None  # a gap
    assert brace_pattern(["train-000000.tar", "train-000000-1.tar"]) is None  # the old overflow names
    assert brace_pattern(["a-9.tar", "a-10.tar"]) is None and brace_pattern([]) is None
    from webdataset.shardlists import expand_urls

    assert expand_urls(brace_pattern(names)) == names  # webdataset expands it to the same names
    assert os.path.basename(expand_urls("d/" + brace_pattern(names[:1]))[0]) == names[0]
