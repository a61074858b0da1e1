"""Shard groups: a fixed slice of a part's input stream becomes one shard (or a few), plus its stats file.

Group ``j`` of a build (or of part i of a build) holds inputs ``[j * S, (j + 1) * S)`` of that part's input
stream (S = samples per shard), so which inputs a group holds never depends on how many images earlier groups
rejected. Its shards take the next numbers of the part's namespace, in order, so the names have no gap:

* a whole build writes ``<prefix>-000000.tar``, ``<prefix>-000001.tar`` ... (one brace pattern covers them);
* part i writes ``<prefix>-p<iiii>-000000.tar`` ..., and ``merge-manifests`` renames every part's shards, in
  part order, into the one sequence ``<prefix>-000000.tar`` ... of the merged set (see ``shards.merge``).

A group normally writes one shard; when its bytes would exceed the byte target it continues in the next
number (rejections make groups smaller than S, never larger). The group's stats file
``<namespace>-g<jjjjjj>.stats.json`` is written last, atomically: its presence (with every shard it lists, at
the numbers that follow the previous group's) is what marks the group complete for resume. Because a build
writes groups in order, the complete groups of an interrupted build are a prefix; a rerun keeps that prefix
and removes everything of the namespace after it. The stats file records the accepted count, bytes,
rejections by reason with their sources, the 16-byte content digests of the accepted samples in order
(base64; for resume and cross-part dedup) and the options that produced the group.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shards import storage
from shards.manifest import ShardEntry, write_json_atomic
from shards.writer import Framed, ShardWriter


def namespace(prefix: str, part: tuple[int, int] | None) -> str:
    """The name stem of a build's files: ``train`` for a whole build, ``train-p0003`` for part 3."""
    return prefix if part is None else f"{prefix}-p{part[0]:04d}"


def shard_stem(ns: str, seq: int) -> str:
    return f"{ns}-{seq:06d}"


def stats_name(ns: str, group: int) -> str:
    return f"{ns}-g{group:06d}.stats.json"


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
        name_of: the file stem of the group's k-th shard (k = 0, 1, ...).
        max_bytes: target tar size; a sample that alone exceeds it still gets a shard of its own.
    """

    def __init__(self, directory: Path, name_of: Callable[[int], str], max_bytes: int):
        self.directory, self.name_of, self.max_bytes = directory, name_of, max_bytes
        self.entries: list[ShardEntry] = []
        self._writer: ShardWriter | None = None

    def write(self, key: str, sample: Framed) -> None:
        writer = self._writer
        if writer is not None and len(writer) and writer.tar_bytes + len(sample.data) + _TAR_TAIL > self.max_bytes:
            self.entries.append(writer.close())
            writer = None
        if writer is None:
            writer = self._writer = ShardWriter(self.directory, self.name_of(len(self.entries)))
        writer.write_framed(key, sample)

    def close(self, stats: str) -> list[ShardEntry]:
        """Publish the open shard; return the group's entries, each pointing at the stats file ``stats``."""
        if self._writer is not None:
            self.entries.append(self._writer.close())
            self._writer = None
        return [ShardEntry(**{**asdict(e), "stats": stats}) for e in self.entries]

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


# End-of-archive blocks plus padding to a whole 10 KiB record: the most a closed tar grows past its members.
_TAR_TAIL = 2 * 512 + 10240


def write_group_stats(directory: Path | str, ns: str, group: int, payload: dict[str, Any]) -> None:
    write_json_atomic(storage.join(directory, stats_name(ns, group)), payload)


def staging_dir(out: Path | str) -> Path:
    """Where shards are written before they count: ``out`` itself, or for object storage a local folder of this
    process (removed at exit) from which ``publish_shards`` uploads each finished shard."""
    if not storage.is_url(out):
        return Path(out)
    if not _staging:
        folder = Path(tempfile.mkdtemp(prefix="shards-staging-"))
        owner = os.getpid()
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
        _staging.append(folder)
    return _staging[0]


_staging: list[Path] = []


def publish_shards(out: Path | str, entries: list[ShardEntry]) -> None:
    """For object storage, upload the group's closed shards (index, then tar) from ``staging_dir(out)`` and delete
    the local copies; each upload is one complete object (a PUT, or a multipart upload published only when it
    completes), so an interrupted build leaves no torn object. Local shards are already in place."""
    if not storage.is_url(out):
        return
    stage = staging_dir(out)
    for entry in entries:
        for name in (entry.index, entry.tar):
            storage.put_file(stage / name, storage.join(out, name))
            (stage / name).unlink()


def read_group_stats(directory: Path | str, ns: str, group: int) -> dict[str, Any] | None:
    """The group's stats file, or None when there is none (or it is not valid JSON)."""
    try:
        return json.loads(storage.read_text(storage.join(directory, stats_name(ns, group))))
    except (OSError, ValueError):
        return None


def shards_present(directory: Path | str, stats: dict[str, Any], names: list[str]) -> bool:
    """Whether every shard the stats list exists with its index and recorded size, under the expected ``names``."""
    shards = stats.get("shards", [])
    if [s.get("tar") for s in shards] != [f"{n}.tar" for n in names]:
        return False
    for shard in shards:
        tar, idx = storage.join(directory, shard["tar"]), storage.join(directory, shard["index"])
        try:
            if not storage.exists(idx) or storage.size(tar) != shard["bytes"]:
                return False
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return False
    return True


def remove_after(directory: Path | str, ns: str, group: int, seq: int) -> int:
    """Delete the namespace's files past a resume point: groups >= ``group``, shards >= ``seq``, all partials.

    Returns:
        The number of files removed.
    """
    shard = re.compile(rf"\.?{re.escape(ns)}-(\d{{6,}})\.(tar|idx)(\.partial)?")
    stats = re.compile(rf"\.?{re.escape(ns)}-g(\d{{6,}})\.stats\.json(\.tmp-\d+)?")
    removed = 0
    if storage.is_url(directory):  # the objects directly under the prefix
        names = [storage.name(p) for p, _ in storage.list_files(directory) if storage.parent(p) == directory.rstrip("/")]
    else:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries]
    for name in names:
        m = shard.fullmatch(name)
        if m and (int(m.group(1)) >= seq or m.group(3) or name.startswith(".")):
            storage.remove(storage.join(directory, name))
            removed += 1
            continue
        m = stats.fullmatch(name)
        if m and (int(m.group(1)) >= group or m.group(2)):
            storage.remove(storage.join(directory, name))
            removed += 1
    return removed


# Options recorded since a release, with the value every earlier build had: a stats file or part manifest written
# before one of them was recorded was built with that value (the Pillow path, no table column).
ADDED_OPTIONS = {"path_column": "", "conversion": "pillow"}


def with_added_options(recorded: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` (the options of a stats file or part manifest) with each of ADDED_OPTIONS it lacks filled in."""
    return {**ADDED_OPTIONS, **recorded}


def shard_entries(stats: dict[str, Any], ns: str, group: int) -> list[ShardEntry]:
    return [ShardEntry(**{**s, "stats": stats_name(ns, group)}) for s in stats["shards"]]


def stats_payload(group: int, first: int, inputs: int, digest: str, options: dict[str, Any],
                  entries: list[ShardEntry], digests: str, rejections: list[dict[str, Any]]) -> dict[str, Any]:
    """The stats file content; ``digests`` is the base64 of the accepted samples' digests (``shards.digests``)."""
    rejections = sorted(rejections, key=lambda r: r["index"])
    by_reason: dict[str, int] = {}
    for r in rejections:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    shards = [{k: v for k, v in asdict(e).items() if k != "stats"} for e in entries]
    return {
        "group": group, "first_input": first, "inputs": inputs, "input_digest": digest,
        "accepted": sum(e.samples for e in entries), "bytes": sum(e.bytes for e in entries),
        "rejected": dict(sorted(by_reason.items())), "shards": shards, "rejections": rejections,
        "digests": digests, "options": options,
    }


def is_writable_dir(directory: Path | str) -> str:
    """Create ``directory`` if needed; return '' when files can be written there, else the reason."""
    if storage.is_url(directory):
        return storage.check_writable(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""
