"""Can a shard be read through its index? Cheap checks of a tar and its DALI index, shared by the loaders and verify.

Both training backends read a sample at the offsets its index lists (DALI with ``index_paths``, the PyTorch
backend with plain seeks), never by walking the tar's member headers. So what matters is that the index parses
and that the data it points at is in the file:

* a **truncated** tar keeps the samples that lie wholly before the cut; the rest are lost, each one counted
  and named by ``<tar>:<offset>:<member>`` (the index still says where they were);
* a tar that **cannot be read at all** (0 bytes, not a tar, an empty, missing, garbled or foreign index, no
  whole sample left) is left out;
* a **corrupt member header** loses nothing (the data are read at the index's offsets); ``shards verify``
  reports it.

Whether the index belongs to the tar is probed at both ends: the 512 bytes before the first and the last
sample's data must be a tar header (valid checksum) giving the size the index gives. Only when one of them
is not are all headers read, and the index is foreign when most of them disagree (a few bad ones are
corrupt headers). A check costs a size lookup, the index parse and a few 512-byte reads.
"""


from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from shards import storage
from shards.writer import SampleRecord, read_index

BLOCK = tarfile.BLOCKSIZE


@dataclass(frozen=True)
class BadHeader:
    """A member whose tar header (at ``offset``, just before its data) is not what its index entry says."""

    offset: int
    name: str
    reason: str


@dataclass
class ShardCheck:
    """The verdict on one shard.

    Attributes:
        tar: the tar's path.
        samples: the samples that can be read (index order), each with a ``.jpg`` member (the training loader
            keeps them for damaged shards only: its readers parse the index themselves).
        readable: how many samples can be read.
        lost: ``<tar>:<offset>:<member>`` of the indexed samples that cannot be read (beyond the end of a
            truncated tar, or without a ``.jpg`` member).
        problem: why the whole shard cannot be read ('' when it can).
        note: partial damage in one line ('' when none), e.g. where a truncated tar ends.
        bad_headers: corrupt member headers found (all of them only with ``all_headers``).
    """

    tar: str
    samples: list[SampleRecord] = field(default_factory=list)
    readable: int = 0
    lost: list[str] = field(default_factory=list)
    problem: str = ""
    note: str = ""
    bad_headers: list[BadHeader] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problem

    @property
    def damaged(self) -> bool:
        return bool(self.problem or self.lost or self.bad_headers)


def jpg_file(record: SampleRecord) -> tuple[str, int, int, str] | None:
    """The ``(ext, offset, size, name)`` of a sample's ``.jpg`` member, or None."""
    return next((f for f in record.files if f[0] == "jpg"), None)


def sample_location(tar: str, record: SampleRecord) -> str:
    """Where a sample is, as ``<tar>:<offset>:<member>`` (its jpg member, else its first)."""
    _ext, offset, _size, name = jpg_file(record) or record.files[0]
    return f"{tar}:{offset}:{name}"


def header_problem(block: bytes, size: int) -> str:
    """Why ``block`` is not the tar header of a member of ``size`` bytes ('' when it is)."""
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError as exc:
        return f"not a tar header ({str(exc).rstrip('.') or type(exc).__name__})"
    if info.size != size:
        return f"header gives {info.size} bytes, the index {size}"
    return ""


def _is_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _bad_headers(fh, records: list[SampleRecord]) -> list[BadHeader]:
    found = []
    for rec in records:
        for _ext, offset, size, name in rec.files:
            fh.seek(offset - BLOCK)
            reason = header_problem(fh.read(BLOCK), size)
            if reason:
                found.append(BadHeader(offset - BLOCK, name, reason))
    return found


def check_shard(tar: str | os.PathLike, index: str | os.PathLike, all_headers: bool = False) -> ShardCheck:
    """Check that ``tar`` can be read through ``index``.

    Args:
        tar: the shard.
        index: its DALI v1.2 index file.
        all_headers: read every member header (``shards verify``); by default only the first and last
            sample's, and all only when one of those is bad.

    Returns:
        The verdict: readable samples, lost ones, or why the shard cannot be read at all.
    """
    tar = str(tar)
    check = ShardCheck(tar)
    try:
        size = storage.size(tar)  # a local file or an object (s3://): the probes below read either
    except OSError as exc:
        check.problem = f"cannot open the tar ({exc.strerror or exc})"
        return check
    if size == 0:
        check.problem = "empty file (0 bytes)"
        return check
    try:
        records = read_index(index)
    except FileNotFoundError:
        check.problem = f"index file {Path(index).name} is missing"
        return check
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        reason = str(exc).replace(f"{index}: ", "").splitlines()[0] if str(exc) else type(exc).__name__
        check.problem = f"index file {Path(index).name} is unusable ({reason})"
        return check
    if not records:
        check.problem = f"index file {Path(index).name} lists no samples"
        return check
    if any(offset < BLOCK or size_ < 0 for rec in records for _e, offset, size_, _n in rec.files):
        check.problem = f"index file {Path(index).name} does not match the tar (an offset before the first header)"
        return check
    end = max(offset + size_ for rec in records for _e, offset, size_, _n in rec.files)
    whole, cut = [], []
    for rec in records:
        in_file = all(offset + size_ <= size for _e, offset, size_, _n in rec.files)
        (whole if in_file else cut).append(rec)
        if in_file and jpg_file(rec) is not None:
            check.samples.append(rec)
        else:
            check.lost.append(sample_location(tar, rec))
    if cut:
        check.note = (f"truncated at {size} bytes (its index lists data up to byte {end}): {len(cut)} of "
                      f"{len(records)} samples lost, the first at {sample_location(tar, cut[0]).rsplit(':', 2)[1]}")
    if not whole:
        check.problem = f"truncated at {size} bytes: no whole sample left (its index lists data up to byte {end})"
        check.samples, check.lost = [], []
        return check
    with storage.open_file(tar) as fh:
        probe = whole if all_headers else [whole[0], whole[-1]]
        bad = _bad_headers(fh, probe)
        if bad and not all_headers:
            bad = _bad_headers(fh, whole)
        members = sum(len(rec.files) for rec in whole)
        if 2 * len(bad) > members:
            fh.seek(0)
            what = "its index does not match the tar" if _is_header(fh.read(BLOCK)) else "not a tar file"
            check.problem = f"{what}: {len(bad)} of {members} indexed members have no matching tar header"
            check.samples, check.lost = [], []
            return check
    check.bad_headers = bad
    check.readable = len(check.samples)
    if not check.samples:
        check.problem = "no sample has a .jpg member"
        check.lost = []
    return check
