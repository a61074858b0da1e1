"""Write one WebDataset tar shard atomically, with its DALI index file, recording per-sample offsets.

The DALI index (``fn.readers.webdataset(index_paths=...)``) is the text format that DALI's ``wds2idx``
writes, version v1.2: a header line ``v1.2 <num_samples>`` and one line per sample listing, for each of
its files, ``<ext> <data offset> <size> <member name>``. We know every offset while writing, so the
index costs nothing extra (``wds2idx`` re-reads the whole tar with GNU tar).

A sample is framed (USTAR headers, data, padding) by ``frame_sample`` into one byte string, byte for byte
what ``tarfile`` writes for the same members, at ~1/10 of its cost. The build's workers frame their samples,
so its main process only appends finished frames (``ShardWriter.write_framed``).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from shards.manifest import ShardEntry

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample's files landed in the tar: (ext, data offset, size, member name) per file."""

    key: str
    files: tuple[tuple[str, int, int, str], ...]


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


# The fixed fields of our USTAR member headers (regular file, mode 0644, uid/gid 0, mtime 0, no user names), laid
# out as tarfile writes them; name, size and checksum are filled in per member.
_HEAD_MODE = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_HEAD_MTIME = b"00000000000\0"
# type, linkname, magic + version, uname + gname, devmajor + devminor (empty for a file), prefix, padding:
_HEAD_TAIL = (b"0" + bytes(100) + tarfile.POSIX_MAGIC + bytes(64 + 16 + 155)).ljust(tarfile.BLOCKSIZE - 156, b"\0")
_HEAD_FIXED_SUM = sum(_HEAD_MODE) + sum(_HEAD_MTIME) + sum(_HEAD_TAIL) + 8 * ord(" ")
_END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)


def _member_header(name: bytes, size: int) -> bytes:
    """The 512-byte USTAR header tarfile writes for a regular file ``name`` (< 100 bytes) of ``size`` bytes."""
    size_field = b"%011o\0" % size
    checksum = _HEAD_FIXED_SUM + sum(name) + sum(size_field)
    return b"".join((name.ljust(100, b"\0"), _HEAD_MODE, size_field, _HEAD_MTIME, b"%06o\0 " % checksum, _HEAD_TAIL))


class Framed(NamedTuple):
    """One sample framed as tar members: the bytes to append, and (ext, data offset in ``data``, size, name) each."""

    data: bytes
    members: tuple[tuple[str, int, int, str], ...]
    payload: int  # sum of the member sizes (the sample's bytes without tar framing)


def frame_sample(key: str, files: dict[str, bytes]) -> Framed:
    """Frame ``files`` (extension -> bytes) as the tar members ``<key>.<ext>``, in order.

    Raises:
        ValueError: a key with '.' or '/', or a member name too long for a plain USTAR header.
    """
    if "." in key or "/" in key:
        raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
    chunks: list[bytes] = []
    members = []
    at = payload = 0
    for ext, data in files.items():
        name = f"{key}.{ext}"
        raw_name = name.encode()
        if len(raw_name) >= 100:
            raise ValueError(f"tar member name too long (>= 100 bytes): {name!r}")
        size = len(data)
        pad = -size % tarfile.BLOCKSIZE
        chunks += (_member_header(raw_name, size), data, bytes(pad)) if pad else (_member_header(raw_name, size), data)
        members.append((ext, at + tarfile.BLOCKSIZE, size, name))
        at += tarfile.BLOCKSIZE + size + pad
        payload += size
    return Framed(b"".join(chunks), tuple(members), payload)


class ShardWriter:
    """Write samples into ``<directory>/<name>.tar`` under a temporary name; ``close()`` publishes it.

    Until ``close()`` renames it, the shard exists only as ``.<name>.tar.partial``, so an interrupted run
    never leaves a torn shard behind. The index file is written (also atomically) before the tar is
    renamed: a published tar always has its index next to it.

    Args:
        directory: output directory.
        name: shard file stem, e.g. ``train-000042``.
    """

    def __init__(self, directory: str | os.PathLike, name: str):
        self.directory = Path(directory)
        self.name = name
        self.tar_path = self.directory / f"{name}.tar"
        self.index_path = self.directory / f"{name}.idx"
        self._partial = self.directory / f".{name}.tar.partial"
        self._file = open(self._partial, "wb")
        self._offset = 0
        self.records: list[SampleRecord] = []
        self.payload_bytes = 0
        self.max_sample_bytes = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Append one sample: ``files`` maps extension (``jpg``, ``json``, ``cls``) to its bytes."""
        self.write_framed(key, frame_sample(key, files))

    def write_framed(self, key: str, sample: Framed) -> None:
        """Append one sample framed by ``frame_sample(key, ...)`` (for example in a worker process)."""
        base = self._offset
        self._file.write(sample.data)
        self._offset += len(sample.data)
        self.records.append(SampleRecord(key, tuple((e, base + o, n, m) for e, o, n, m in sample.members)))
        self.payload_bytes += sample.payload
        if sample.payload > self.max_sample_bytes:
            self.max_sample_bytes = sample.payload

    @property
    def tar_bytes(self) -> int:
        """Bytes written so far (members only; closing adds the end-of-archive blocks and record padding)."""
        return self._offset

    def __len__(self) -> int:
        return len(self.records)

    def close(self) -> ShardEntry:
        """Finish the tar, write the index, fsync both, rename into place; return the manifest entry."""
        if not self.records:
            self.abort()
            raise ValueError(f"shard {self.name} has no samples; refusing to write an empty shard")
        # End of archive: two zero blocks, then zeros up to a whole 10 KiB record (what tarfile writes on close).
        end = self._offset + len(_END_OF_ARCHIVE)
        self._file.write(_END_OF_ARCHIVE + bytes(-end % tarfile.RECORDSIZE))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        write_index(self.index_path, self.records)
        os.replace(self._partial, self.tar_path)
        return ShardEntry(
            tar=self.tar_path.name, index=self.index_path.name, samples=len(self.records),
            bytes=self.tar_path.stat().st_size, max_sample_bytes=self.max_sample_bytes,
        )

    def abort(self) -> None:
        """Drop the partial shard."""
        try:
            self._file.close()
        finally:
            self._partial.unlink(missing_ok=True)


def index_text(records: list[SampleRecord]) -> str:
    """The DALI v1.2 index text for ``records``."""
    lines = [f"{INDEX_VERSION} {len(records)}"]
    for rec in records:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in rec.files))
    return "\n".join(lines) + "\n"


def write_index(path: Path, records: list[SampleRecord]) -> None:
    """Write a DALI index file atomically."""
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w") as fh:
        fh.write(index_text(records))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_index(path: str | os.PathLike) -> list[SampleRecord]:
    """Parse a DALI v1.2 index file (for verification)."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty index file")
    version, _, count = lines[0].partition(" ")
    if version != INDEX_VERSION or not count.strip().isdigit():
        raise ValueError(f"{path}: not a DALI {INDEX_VERSION} index (header {lines[0]!r})")
    records = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"{path}: malformed index line {line!r}")
        files = tuple((parts[i], int(parts[i + 1]), int(parts[i + 2]), parts[i + 3]) for i in range(0, len(parts), 4))
        key = files[0][3].rsplit(".", 1)[0]
        records.append(SampleRecord(key, files))
    if len(records) != int(count):
        raise ValueError(f"{path}: header says {count} samples but lists {len(records)}")
    return records
