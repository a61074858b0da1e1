"""Enumerate build inputs (directory trees, path lists, tar shards) into one sorted list of sources.

An INPUT is a directory (walked recursively, following symlinks, each real directory visited once so symlink
loops end), a text file of paths (``.txt`` / ``.lst`` / ``.list``: one path a line, ``#`` comments, relative
paths resolved against the list's folder) or an uncompressed ``.tar`` (plain or WebDataset; ``.tar`` files met
inside a directory walk are expanded the same way). In a tar, members are grouped by WebDataset key (the name
up to the first dot of its basename) and the key's first image member is the sample; companions such as
``.json`` / ``.cls`` are metadata of that sample, not separate inputs.

Every file found becomes a Source, including the ones that cannot be read (broken symlink, a symlink that
points at itself, a missing listed file): those carry an ``error`` and are counted as rejections, so nothing
is dropped silently. Sources are sorted by id, so the same inputs always give the same order, keys and shards.
"""

from __future__ import annotations

import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

LIST_SUFFIXES = (".txt", ".lst", ".list")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".jp2", ".j2k"})


class InputError(ValueError):
    """An input that cannot be used at all (missing, wrong kind); the message is one line naming it."""


@dataclass(frozen=True)
class Source:
    """One input image: where its bytes are, its class folder, or why it cannot be read.

    Attributes:
        id: stable, human-readable name (``dir/sub/x.jpg`` or ``shard.tar::key.jpg``); the sort key.
        path: file to read.
        offset: byte offset of the data inside ``path`` (a tar member), or -1 for the whole file.
        size: bytes to read at ``offset`` (tar members only).
        label: first-level class folder name, when labels come from folders.
        error: ``reason: detail`` for a source that is rejected before decoding, else empty.
    """

    id: str
    path: str
    offset: int = -1
    size: int = 0
    label: str | None = None
    error: str = ""


def check_inputs(inputs: list[str], labels_from_folders: bool = False) -> None:
    """Raise InputError for the first input that does not exist or is of an unsupported kind."""
    if not inputs:
        raise InputError("no inputs given")
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"input not found: {item}")
        if path.is_dir():
            continue
        if path.suffix.lower() not in (*LIST_SUFFIXES, ".tar"):
            raise InputError(f"unsupported input {item}: expected a directory, a .txt/.lst/.list file of paths or a .tar")
        if labels_from_folders:
            raise InputError(f"--labels-from-folders needs directory inputs (class folders), got {item}")
        if not os.access(path, os.R_OK):
            raise InputError(f"input not readable: {item}")


def list_sources(inputs: list[str], exclude: str | os.PathLike | None = None,
                 labels_from_folders: bool = False) -> list[Source]:
    """All sources of all inputs, sorted by id.

    Args:
        inputs: directories, path-list files and tar files (see the module docstring).
        exclude: a directory never to walk into (the output directory, when it sits inside an input).
        labels_from_folders: label each file with its first-level folder under its input directory.

    Raises:
        InputError: a missing or unsupported input (checked before anything is read).
    """
    check_inputs(inputs, labels_from_folders)
    skip = os.path.realpath(exclude) if exclude is not None else None
    sources: list[Source] = []
    for item in inputs:
        root = os.path.normpath(item)
        if os.path.isdir(root):
            sources.extend(_walk(root, skip, labels_from_folders))
        elif root.lower().endswith(".tar"):
            sources.extend(_tar_sources(root, root, None))
        else:
            sources.extend(_list_file(root))
    sources.sort(key=lambda s: s.id)
    return sources


def class_names(sources: list[Source]) -> list[str]:
    """The sorted class list (a class index is a position in it)."""
    return sorted({s.label for s in sources if s.label is not None})


def read_source(source: Source) -> bytes:
    """The encoded bytes of ``source`` (raises OSError when they cannot be read)."""
    with open(source.path, "rb") as fh:
        if source.offset < 0:
            return fh.read()
        fh.seek(source.offset)
        data = fh.read(source.size)
    if len(data) != source.size:
        raise OSError(f"tar member cut short: {len(data)} of {source.size} bytes")
    return data


def _walk(root: str, skip: str | None, labels: bool) -> list[Source]:
    out: list[Source] = []
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen or os.path.realpath(folder) == skip:
                continue  # a symlink back into the tree (or an alias of a visited folder): its files are listed once
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            out.append(Source(folder, folder, error=f"unreadable: folder: {exc.strerror or exc}"))
            continue
        for entry in entries:
            rel = os.path.relpath(entry.path, root)
            label = rel.split(os.sep, 1)[0] if labels and os.sep in rel else None
            try:
                mode = os.stat(entry.path).st_mode  # follows symlinks; a loop or dangling link raises
            except OSError as exc:
                out.append(Source(entry.path, entry.path, label=label, error=f"unreadable: {exc.strerror or exc}"))
                continue
            if stat.S_ISDIR(mode):
                stack.append(entry.path)
            elif not stat.S_ISREG(mode):
                out.append(Source(entry.path, entry.path, label=label, error="unreadable: not a regular file"))
            elif entry.name.lower().endswith(".tar"):
                out.extend(_tar_sources(entry.path, entry.path, label))
            else:
                out.append(Source(entry.path, entry.path, label=label))
    if labels:
        out = [s if s.label is not None else Source(s.id, s.path, s.offset, s.size, None, s.error or
                                                    "unlabelled: not inside a class folder") for s in out]
    return out


def _list_file(path: str) -> list[Source]:
    base = os.path.dirname(path)
    out: list[Source] = []
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for line in fh:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            target = os.path.normpath(line if os.path.isabs(line) else os.path.join(base, line))
            if not os.path.isfile(target):
                why = "is a directory" if os.path.isdir(target) else "listed file not found"
                out.append(Source(target, target, error=f"unreadable: {why}"))
            else:
                out.append(Source(target, target))
    return out


def _tar_sources(path: str, source_id: str, label: str | None) -> list[Source]:
    """One source per WebDataset key of the tar: its first image member (companions are metadata)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError) as exc:
        return [Source(source_id, path, label=label, error=f"unreadable: tar: {exc}")]
    by_key: dict[str, list[tarfile.TarInfo]] = {}
    for m in members:
        folder, _, base = m.name.rpartition("/")
        if base.startswith("."):
            continue  # hidden members are not samples for DALI or webdataset either
        by_key.setdefault(f"{folder}/{base.split('.', 1)[0]}" if folder else base.split(".", 1)[0], []).append(m)
    out = []
    for key, group in by_key.items():
        image = next((m for m in group if os.path.splitext(m.name)[1].lower() in IMAGE_SUFFIXES), None)
        if image is None:
            exts = ",".join(sorted(m.name.rsplit("/", 1)[-1].split(".", 1)[-1] for m in group))
            out.append(Source(f"{source_id}::{key}", path, label=label, error=f"not_image: no image member ({exts})"))
        else:
            out.append(Source(f"{source_id}::{image.name}", path, image.offset_data, image.size, label))
    return out
