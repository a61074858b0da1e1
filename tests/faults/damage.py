"""Damage real shard files the way disks, copies and people do: cut, emptied, overwritten, swapped.

Each helper changes files in place and returns what a reader should report: the locations
(``<tar>:<offset>:<member>``) of the samples it made unreadable.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from shards.writer import SampleRecord, read_index


def copy_corpus(src: Path, dst: Path) -> Path:
    """A private copy of a shard directory (manifest, tars, indexes) to damage."""
    shutil.copytree(src, dst)
    return dst


def records(index: Path) -> list[SampleRecord]:
    return read_index(index)


def jpg_location(tar: Path, rec: SampleRecord) -> str:
    _ext, offset, _size, name = next(f for f in rec.files if f[0] == "jpg")
    return f"{tar}:{offset}:{name}"


def truncate_inside(tar: Path, index: Path, sample: int, into: int) -> list[str]:
    """Cut ``tar`` ``into`` bytes into the data of sample ``sample``'s first member (0: just before it).

    Returns:
        Locations of the samples cut off (``sample`` and every later one).
    """
    recs = records(index)
    cut = recs[sample].files[0][1] + into
    os.truncate(tar, cut)
    return [jpg_location(tar, r) for r in recs[sample:]]


def truncate_in_header(tar: Path, index: Path, sample: int) -> list[str]:
    """Cut ``tar`` in the middle of sample ``sample``'s first member header (between two samples' data)."""
    recs = records(index)
    os.truncate(tar, recs[sample].files[0][1] - 300)
    return [jpg_location(tar, r) for r in recs[sample:]]


def empty_file(path: Path) -> None:
    """Truncate to 0 bytes (a copy that never happened, a full disk)."""
    os.truncate(path, 0)


def corrupt_header(tar: Path, index: Path, sample: int) -> int:
    """Overwrite the tar header of sample ``sample``'s ``.jpg`` member with random bytes; returns its offset."""
    _ext, offset, _size, _name = next(f for f in records(index)[sample].files if f[0] == "jpg")
    with open(tar, "r+b") as fh:
        fh.seek(offset - 512)
        fh.write(np.random.default_rng(sample).integers(0, 256, 512, dtype=np.uint8).tobytes())
    return offset - 512


def spoil_jpeg(tar: Path, index: Path, sample: int) -> str:
    """Overwrite the start-of-image marker of sample ``sample``'s JPEG (no decoder accepts it); its location."""
    rec = records(index)[sample]
    _ext, offset, _size, _name = next(f for f in rec.files if f[0] == "jpg")
    with open(tar, "r+b") as fh:
        fh.seek(offset)
        fh.write(b"\0\0")
    return jpg_location(tar, rec)


def overwrite_random(path: Path) -> None:
    """Same size, random bytes (not a tar any more; ``stat`` cannot tell)."""
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes())


def garble_index(index: Path) -> None:
    """Keep the size, spoil the text (a disk error in the index)."""
    text = index.read_bytes()
    index.write_bytes(b"\xff\xfe garbage " + text[11:])


def swap_index(index: Path, other: Path) -> None:
    """Give ``index`` the content of another shard's index (a copy that mixed up two shards)."""
    shutil.copyfile(other, index)
