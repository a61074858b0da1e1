"""Write one WebDataset tar shard atomically, with its DALI index file, recording per-sample offsets.

The DALI index (``fn.readers.webdataset(index_paths=...)``) is the text format that DALI's ``wds2idx``
writes, version v1.2: a header line ``v1.2 <num_samples>`` and one line per sample listing, for each of
its files, ``<ext> <data offset> <size> <member name>``. We know every offset while writing, so the
index costs nothing extra (``wds2idx`` re-reads the whole tar with GNU tar).
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from shards.manifest import ShardEntry

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class SampleRecord:
    """Where one sample's files landed in the tar: (ext, data offset, size, member name) per file."""

    key: str
    files: tuple[tuple[str, int, int, str], ...]


def _padded(size: int) -> int:
    return -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        fh.flush()
        os.fsync(fh.fileno())


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
        self._tar = tarfile.open(self._partial, "w", format=tarfile.USTAR_FORMAT)
        self.records: list[SampleRecord] = []
        self.payload_bytes = 0
        self.max_sample_bytes = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """Append one sample: ``files`` maps extension (``jpg``, ``json``, ``cls``) to its bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key must not contain '.' or '/': {key!r}")
        entries = []
        sample_bytes = 0
        for ext, data in files.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0  # deterministic bytes: the same input gives byte-identical shards
            info.mode = 0o644
            info.uname = info.gname = ""
            header_at = self._tar.offset
            self._tar.addfile(info, io.BytesIO(data))
            # The header (512 bytes for short USTAR names) sits between header_at and the data.
            data_at = self._tar.offset - _padded(len(data))
            assert data_at - header_at >= tarfile.BLOCKSIZE
            entries.append((ext, data_at, len(data), info.name))
            sample_bytes += len(data)
        self.records.append(SampleRecord(key, tuple(entries)))
        self.payload_bytes += sample_bytes
        self.max_sample_bytes = max(self.max_sample_bytes, sample_bytes)

    def __len__(self) -> int:
        return len(self.records)

    def close(self) -> ShardEntry:
        """Finish the tar, write the index, fsync both, rename into place; return the manifest entry."""
        if not self.records:
            self.abort()
            raise ValueError(f"shard {self.name} has no samples; refusing to write an empty shard")
        self._tar.close()
        _fsync_file(self._partial)
        write_index(self.index_path, self.records)
        os.replace(self._partial, self.tar_path)
        return ShardEntry(
            tar=self.tar_path.name, index=self.index_path.name, samples=len(self.records),
            bytes=self.tar_path.stat().st_size, max_sample_bytes=self.max_sample_bytes,
        )

    def abort(self) -> None:
        """Drop the partial shard."""
        try:
            self._tar.close()
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
