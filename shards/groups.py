"""Shard groups: a fixed slice of the sorted inputs becomes one shard (or a few), plus its stats file.

Group ``g`` holds inputs ``[g * S, (g + 1) * S)`` of the sorted source list (S = samples per shard), so shard
numbering depends only on the input list, never on how many images earlier groups rejected: parts of a run
and a resumed run name and fill every shard exactly as one whole run does. A group normally writes one
shard, ``<prefix>-<g:06d>.tar``; when its bytes would exceed the byte target it continues in
``<prefix>-<g:06d>-1.tar``, ``-2`` ... (rejections make groups smaller than S, never larger).

The group's stats file ``<prefix>-<g:06d>.stats.json`` is written last, atomically: its presence (with
every shard it lists) is what marks the group complete for resume. It records the accepted count, bytes,
rejections by reason with their sources, the content hashes of the accepted samples in order (for resume
and cross-part dedup) and the options that produced the group.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shards.manifest import ShardEntry, write_json_atomic
from shards.writer import ShardWriter

# End-of-archive blocks plus tarfile's padding to a whole record: the most a closed tar grows past its members.
_TAR_TAIL = 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE


def group_stem(prefix: str, group: int) -> str:
    return f"{prefix}-{group:06d}"


def stats_name(prefix: str, group: int) -> str:
    return f"{group_stem(prefix, group)}.stats.json"


def input_digest(ids: list[str]) -> str:
    """Fingerprint of a group's source ids: resume refuses to mix shards made from different inputs."""
    h = hashlib.blake2b(digest_size=16)
    for i in ids:
        h.update(i.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


class GroupWriter:
    """Write one group's accepted samples into one or more shards, splitting at ``max_bytes``.

    Args:
        directory: output directory.
        prefix: shard name prefix.
        group: group number (names the shards).
        max_bytes: target tar size; a sample that alone exceeds it still gets a shard of its own.
    """

    def __init__(self, directory: Path, prefix: str, group: int, max_bytes: int):
        self.directory, self.prefix, self.group, self.max_bytes = directory, prefix, group, max_bytes
        self.entries: list[ShardEntry] = []
        self._writer: ShardWriter | None = None
        self._tar_bytes = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        size = sum(tarfile.BLOCKSIZE + -(-len(d) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for d in files.values())
        if self._writer is not None and len(self._writer) and self._tar_bytes + size + _TAR_TAIL > self.max_bytes:
            self._close_current()
        if self._writer is None:
            sub = len(self.entries)
            name = group_stem(self.prefix, self.group) + (f"-{sub}" if sub else "")
            self._writer = ShardWriter(self.directory, name)
            self._tar_bytes = 0
        self._writer.write(key, files)
        self._tar_bytes += size

    def _close_current(self) -> None:
        self.entries.append(self._writer.close())
        self._writer = None

    def close(self, stats: str) -> list[ShardEntry]:
        """Publish the open shard; return the group's entries, each pointing at the stats file ``stats``."""
        if self._writer is not None:
            self._close_current()
        return [ShardEntry(**{**asdict(e), "stats": stats}) for e in self.entries]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def write_group_stats(directory: Path, prefix: str, group: int, payload: dict[str, Any]) -> None:
    write_json_atomic(directory / stats_name(prefix, group), payload)


def read_group_stats(directory: Path, prefix: str, group: int) -> dict[str, Any] | None:
    """The group's stats, or None when the group is not complete (no stats, or a listed shard missing)."""
    path = directory / stats_name(prefix, group)
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    for shard in stats.get("shards", []):
        tar, idx = directory / shard["tar"], directory / shard["index"]
        if not idx.is_file() or not tar.is_file() or tar.stat().st_size != shard["bytes"]:
            return None
    return stats


def remove_group_files(directory: Path, prefix: str, group: int) -> None:
    """Delete whatever an interrupted attempt left of a group (torn partials, early shards, stale stats)."""
    stem = group_stem(prefix, group)
    patterns = (f"{stem}.tar", f"{stem}-*.tar", f"{stem}.idx", f"{stem}-*.idx", f".{stem}.tar.partial",
                f".{stem}-*.tar.partial", f".{stem}.idx.partial", f".{stem}-*.idx.partial", stats_name(prefix, group))
    for pattern in patterns:
        for path in directory.glob(pattern):
            path.unlink(missing_ok=True)


def remove_torn_files(directory: Path, prefix: str, groups: range) -> None:
    """Delete temporary files of ``groups`` left by a killed writer (other parts' groups are left alone)."""
    for path in directory.glob(f".{prefix}-*.partial"):
        number = path.name[len(prefix) + 2:].split(".", 1)[0].split("-", 1)[0]
        if number.isdigit() and int(number) in groups:
            path.unlink(missing_ok=True)


def shard_entries(stats: dict[str, Any], prefix: str, group: int) -> list[ShardEntry]:
    return [ShardEntry(**{**s, "stats": stats_name(prefix, group)}) for s in stats["shards"]]


def stats_payload(group: int, first: int, inputs: int, digest: str, options: dict[str, Any],
                  entries: list[ShardEntry], hashes: list[str], rejections: list[dict[str, Any]]) -> dict[str, Any]:
    """The stats file content; ``rejections`` are sorted by input index so the file is deterministic."""
    rejections = sorted(rejections, key=lambda r: r["index"])
    by_reason: dict[str, int] = {}
    for r in rejections:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    shards = [{k: v for k, v in asdict(e).items() if k != "stats"} for e in entries]
    return {
        "group": group, "first_input": first, "inputs": inputs, "input_digest": digest,
        "accepted": sum(e.samples for e in entries), "bytes": sum(e.bytes for e in entries),
        "rejected": dict(sorted(by_reason.items())), "shards": shards, "rejections": rejections,
        "hashes": hashes, "options": options,
    }


def is_writable_dir(directory: Path) -> str:
    """Create ``directory`` if needed; return '' when files can be written there, else the reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""
