"""Stream the build inputs (directory trees, path lists, tables, tar shards) as sources, or one part's share of them.

An INPUT is a directory (walked recursively, following symlinks, each real directory visited once so symlink
loops end), a text file of paths (``.txt`` / ``.lst`` / ``.list``: one path a line, ``#`` comments, relative
paths resolved against the list's folder), a table of paths (``.csv`` / ``.tsv`` / ``.parquet``, see
``shards.tables``: one path a row, the row's other columns go into the sample's ``.json``) or an uncompressed
``.tar`` (plain or WebDataset; ``.tar`` files met inside a directory walk, a list or a table are expanded the
same way). In a tar, members are grouped by WebDataset key (the name up to the first dot of its basename) and
the key's first image member is the sample; its ``.txt``, ``.json`` and ``.cls`` companions (img2dataset's
caption, metadata and label) are carried into the output sample (``shards.metadata``), not separate inputs.
The main process reads only the tar's member headers: a Source carries the offsets and sizes of its image and
companions, and the worker reads their bytes.

http(s) URLs are refused with a one-line error naming img2dataset, as a direct input and as a listed path or
table cell (the first entry of every list and table is checked before the build starts; a later one stops the
build where it is met, never becoming a "file not found"). Downloading at scale needs rate limiting, retries,
honouring robots.txt and opt-out headers, and resizing inside the download workers: that is img2dataset's job
(``--output_format webdataset``, whose tars this build reads with their captions and metadata), while this
build stays an offline conversion that gives the same shards every time and resumes exactly.

Order (deterministic, so the same inputs always give the same keys and shards): inputs in the order given;
a list file in line order; a directory depth first, each folder's files sorted by name, then its subfolders
sorted by name; a tar in member order. Nothing is ever listed whole or sorted whole: sources are yielded as
they are found, so memory does not grow with the corpus.

Part ``i/n`` of a build takes, without any global listing:

* from a list file of B bytes, the lines that START in bytes ``[i*B//n, (i+1)*B//n)`` (a seek, then a
  sequential read of about B/n bytes: list files are how billion-image corpora should be given); from a CSV
  the same over the bytes after its header, from a parquet table rows ``[i*R//n, (i+1)*R//n)`` of its R rows;
* from a directory, the files (and tar files, whole) whose path relative to the input hashes to i
  (blake2b mod n). Every part still reads every folder's entries (``os.scandir``, no stat per file), but keeps
  only its own, so a part's memory is its share of the largest folder;
* a ``.tar`` given as an input goes whole to the part its path hashes to.

Every file found becomes a Source, including the ones that cannot be read (broken symlink, a symlink that
points at itself): those carry an ``error`` and are counted as rejections, so nothing is dropped silently. A
listed file that does not exist is found out by the worker that reads it (``unreadable``), so the main
process never stats a listed path.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from shards import storage, tables
from shards.metadata import CARRIED

LIST_SUFFIXES = (".txt", ".lst", ".list")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff",
                            ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".avif", ".jp2", ".j2k"})


class InputError(ValueError):
    """An input that cannot be used at all (missing, wrong kind); the message is one line naming it."""


class Source(NamedTuple):
    """One input image: where its bytes are, its class folder, or why it cannot be read.

    A NamedTuple (not a dataclass): one is made per input in the main process and pickled to a worker.

    Attributes:
        id: stable, human-readable name (``dir/sub/x.jpg`` or ``shard.tar::key.jpg``).
        path: file to read.
        offset: byte offset of the data inside ``path`` (a tar member), or -1 for the whole file.
        size: bytes to read at ``offset`` (tar members only).
        label: first-level class folder name, when labels come from folders.
        error: ``reason: detail`` for a source that is rejected before decoding, else empty.
        columns: the other columns of the table row that named this image, or None.
        companions: ``(ext, offset, size)`` of the tar members carried with the image (ext in ``CARRIED``).
    """

    id: str
    path: str
    offset: int = -1
    size: int = 0
    label: str | None = None
    error: str = ""
    columns: dict[str, Any] | None = None
    companions: tuple[tuple[str, int, int], ...] = ()


def check_inputs(inputs: list[str], labels_from_folders: bool = False, path_column: str = "") -> None:
    """Raise InputError for the first input that does not exist or is of an unsupported kind.

    A list or table must also yield a usable first entry: a table needs its path column (``path_column``, or by
    default one named ``path`` or ``url``), and the first listed path must not be an http(s) URL.
    """
    if not inputs:
        raise InputError("no inputs given")
    for item in inputs:
        if _is_web(item):
            raise _not_downloaded(item)
        if storage.is_url(item) or storage.looks_mangled(item):
            _check_remote_input(item, labels_from_folders)
        else:
            path = Path(item)
            if not path.exists():
                raise InputError(f"input not found: {item}")
            if path.is_dir():
                continue
            if path.suffix.lower() not in (*LIST_SUFFIXES, *tables.TABLE_SUFFIXES, ".tar"):
                raise InputError(f"unsupported input {item}: expected a directory, a .txt/.lst/.list file of paths, "
                                 "a .csv/.tsv/.parquet table of paths or a .tar")
            if labels_from_folders:
                raise InputError(f"--labels-from-folders needs directory inputs (class folders), got {item}")
            if not os.access(path, os.R_OK):
                raise InputError(f"input not readable: {item}")
        _check_first_entry(item, path_column)


def _check_remote_input(url: str, labels_from_folders: bool) -> None:
    """An object-storage input: a prefix (every object under it), a list, a table or a tar (``shards.storage``)."""
    try:
        storage.check_url(url)
    except storage.StorageError as exc:
        raise InputError(str(exc)) from None
    if labels_from_folders:
        raise InputError(f"--labels-from-folders needs local directory inputs (class folders), got {url}")
    if url.lower().endswith((*LIST_SUFFIXES, *tables.TABLE_SUFFIXES, ".tar")):
        if not storage.exists(url):
            raise InputError(f"input not found: {url}")
    elif not storage.has_files(url):
        raise InputError(f"input not found: no object under {url}")


def _check_first_entry(item: str, path_column: str) -> None:
    """A table's path column exists and the first path of a list or table is not an http(s) URL (a few KiB read)."""
    base = storage.parent(item)
    try:
        if tables.is_table(item):
            first = tables.first_path(item, tables.path_column(item, path_column))
        elif item.lower().endswith(LIST_SUFFIXES):
            lines = (raw.decode("utf-8", "surrogateescape").strip() for raw in tables.first_lines(item, 64))
            first = next((line for line in lines if line and not line.startswith("#")), None)
        else:
            return
    except tables.TableError as exc:
        raise InputError(str(exc)) from None
    if isinstance(first, str) and first.strip():
        _resolve(first.strip(), base, item)


def _is_web(path: str) -> bool:
    return isinstance(path, str) and path[:8].lower().startswith(("http://", "https://"))


def _not_downloaded(url: str, where: str = "") -> InputError:
    """The one-line answer to an http(s) URL: download with img2dataset first (module docstring: why)."""
    return InputError(f"{url}{f' (in {where})' if where else ''}: http(s) URLs are not downloaded by this build; "
                      "fetch them with img2dataset (--output_format webdataset) and pass its .tar files, whose "
                      "captions and metadata are kept")


def _remote_sources(url: str, part: tuple[int, int] | None, exclude: str | os.PathLike | None,
                    path_column: str) -> Iterator[Source]:
    """An object-storage input: a tar, a list, a table, or every object under a prefix in key order (one listing)."""
    lower = url.lower()
    if lower.endswith(".tar"):
        if owned(url, part):
            yield from _tar_sources(url, url, None)
        return
    if lower.endswith(LIST_SUFFIXES):
        yield from _list_range(url, part)
        return
    if tables.is_table(url):
        yield from _table_sources(url, path_column, part)
        return
    prefix, skip = url.rstrip("/"), f"{exclude}".rstrip("/") + "/" if storage.is_url(exclude) else None
    for path, _size in storage.list_files(prefix):
        if skip and path.startswith(skip):
            continue  # the output prefix inside the input prefix
        if not owned(path[len(prefix) + 1:], part):
            continue
        if path.lower().endswith(".tar"):
            yield from _tar_sources(path, path, None)
        else:
            yield Source(path, path)


def owned(key: str, part: tuple[int, int] | None) -> bool:
    """Whether part ``i/n`` owns the input named ``key`` (a path relative to its input): blake2b(key) mod n == i."""
    if part is None or part[1] == 1:
        return True
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % part[1] == part[0]


def iter_sources(inputs: list[str], part: tuple[int, int] | None = None, exclude: str | os.PathLike | None = None,
                 labels_from_folders: bool = False, path_column: str = "") -> Iterator[Source]:
    """The sources of part ``i/n`` of the inputs (all of them when ``part`` is None), streamed in input order.

    Args:
        inputs: directories, path lists, tables and tar files (see the module docstring).
        part: ``(i, n)``, or None for everything.
        exclude: a directory never to walk into (the output directory, when it sits inside an input).
        labels_from_folders: label each file with its first-level folder under its input directory.
        path_column: the column of image paths in table inputs ("" = the one named ``path`` or ``url``).

    Raises:
        InputError: a missing or unsupported input (checked before anything is read); while streaming, an
            http(s) URL in a list or table, or a multi-line CSV row in a part.
    """
    check_inputs(inputs, labels_from_folders, path_column)
    skip = os.path.realpath(exclude) if exclude is not None else None
    for item in inputs:
        if storage.is_url(item):
            yield from _remote_sources(item, part, exclude, path_column)
            continue
        root = os.path.normpath(item)
        if os.path.isdir(root):
            yield from _walk(root, skip, labels_from_folders, part)
        elif root.lower().endswith(".tar"):
            if owned(root, part):
                yield from _tar_sources(root, root, None)
        elif tables.is_table(root):
            yield from _table_sources(root, path_column, part)
        else:
            yield from _list_range(root, part)


def list_sources(inputs: list[str], exclude: str | os.PathLike | None = None, labels_from_folders: bool = False,
                 path_column: str = "") -> list[Source]:
    """All sources of all inputs as a list (small corpora, tests); builds stream ``iter_sources`` instead."""
    return list(iter_sources(inputs, None, exclude, labels_from_folders, path_column))


def class_names(inputs: list[str], exclude: str | os.PathLike | None = None) -> list[str]:
    """The sorted class list (a class index is a position in it): the first-level folders of the directory inputs.

    Read from the input roots only (one ``scandir`` each), so every part of a build gets the same list without
    walking the corpus. A folder's symlink counts when it points at a directory; the output directory does not.
    """
    skip = os.path.realpath(exclude) if exclude is not None else None
    names: set[str] = set()
    for item in inputs:
        root = os.path.normpath(item)
        if not os.path.isdir(root):
            continue
        with os.scandir(root) as entries:
            for entry in entries:
                if _is_dir(entry) and os.path.realpath(entry.path) != skip:
                    names.add(entry.name)
    return sorted(names)


def read_sample(source: Source) -> tuple[bytes, dict[str, bytes]]:
    """The encoded image bytes of ``source`` and its carried tar members by extension, from one open file.

    Raises:
        OSError: the file is missing or unreadable, or a tar member is cut short.
    """
    with storage.open_file(source.path) as fh:  # a local file or an object (s3://, gs://)
        if source.offset < 0:
            return fh.read(), {}
        image = _read_member(fh, source.offset, source.size)
        return image, {ext: _read_member(fh, offset, size) for ext, offset, size in source.companions}


def _read_member(fh: Any, offset: int, size: int) -> bytes:
    fh.seek(offset)
    data = fh.read(size)
    if len(data) != size:
        raise OSError(f"tar member cut short: {len(data)} of {size} bytes")
    return data


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; no system call unless the entry is one
    except OSError:
        return False


def _walk(root: str, skip: str | None, labels: bool, part: tuple[int, int] | None) -> Iterator[Source]:
    """Depth first, files of a folder (sorted) before its subfolders (sorted); only the entries ``part`` owns."""
    seen: set[tuple[int, int]] = set()
    stack = [""]  # folders relative to root, the next one to visit last
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(root, rel_dir) if rel_dir else root
        files: list[tuple[str, bool]] = []
        subdirs: list[str] = []
        try:
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in seen or os.path.realpath(folder) == skip:
                continue  # a symlink back into the tree (or an alias of a visited folder): its files are listed once
            seen.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as entries:
                for entry in entries:
                    if _is_dir(entry):
                        subdirs.append(entry.name)
                        continue
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    if owned(rel, part):
                        try:
                            regular = entry.is_file()
                        except OSError:
                            regular = False
                        files.append((entry.name, regular))
        except OSError as exc:
            if owned(rel_dir or ".", part):
                yield Source(folder, folder, error=f"unreadable: folder: {exc.strerror or exc}")
            continue
        label = rel_dir.split("/", 1)[0] if labels and rel_dir else None
        for name, regular in sorted(files):
            path = os.path.join(folder, name)
            if labels and label is None:
                yield Source(path, path, error="unlabelled: not inside a class folder")
            elif not regular:
                yield Source(path, path, label=label, error=f"unreadable: {_why_not_regular(path)}")
            elif name.lower().endswith(".tar"):
                yield from _tar_sources(path, path, label)
            else:
                yield Source(path, path, label=label)
        stack.extend(f"{rel_dir}/{d}" if rel_dir else d for d in sorted(subdirs, reverse=True))


def _why_not_regular(path: str) -> str:
    try:
        os.stat(path)  # follows symlinks: a loop or a dangling link raises
    except OSError as exc:
        return exc.strerror or str(exc)
    return "not a regular file"


def _list_range(path: str, part: tuple[int, int] | None) -> Iterator[Source]:
    """The listed paths whose line starts inside part i's byte range of the list file (a listed tar expanded)."""
    base = storage.parent(path)
    for line in _list_lines(path, part):
        yield from _listed(_resolve(line, base, path), None)


def _list_lines(path: str, part: tuple[int, int] | None) -> Iterator[str]:
    """The entries (stripped; no blank or ``#`` lines) of the lines that start inside part i's byte range."""
    i, n = part or (0, 1)
    size = storage.size(path)
    start, stop = i * size // n, (i + 1) * size // n
    with storage.open_lines(path) as fh:
        if start:
            fh.seek(start - 1)
            if fh.read(1) != b"\n":
                fh.readline()  # the line in progress belongs to the part in whose range it starts
        at = fh.tell()
        while at < stop:
            raw = fh.readline()
            if not raw:
                break
            at += len(raw)
            line = raw.decode("utf-8", "surrogateescape").strip()
            if line and not line.startswith("#"):
                yield line


def _table_sources(path: str, path_column: str, part: tuple[int, int] | None) -> Iterator[Source]:
    """The rows of part i of a table: each row's image (or a listed tar's samples) with the row's other columns."""
    base = storage.parent(path)
    try:
        column = tables.path_column(path, path_column)
        for row in tables.iter_rows(path, column, part):
            if row.error:
                yield Source(row.where, path, error=f"unreadable: {row.error}")
            elif not isinstance(row.path, str) or not row.path.strip():
                yield Source(row.where, path, error=f"unreadable: column {column} holds {row.path!r}, not a path")
            else:
                yield from _listed(_resolve(row.path.strip(), base, row.where), row.columns)
    except tables.TableError as exc:
        raise InputError(str(exc)) from None


def _listed(target: str, columns: dict[str, Any] | None) -> Iterator[Source]:
    """A path named by a list or table: an image, or a tar whose samples are all expanded."""
    if target.lower().endswith(".tar"):
        yield from _tar_sources(target, target, None, columns)
    else:
        yield Source(target, target, columns=columns)


def _resolve(line: str, base: str | Path, where: str = "") -> str:
    """A listed path: a URL as it is, a local path normalised (a relative one against the list's folder or URL).

    Raises:
        InputError: an http(s) URL or an unsupported scheme (``where`` names the list or table row).
    """
    if storage.is_url(line) or storage.looks_mangled(line):
        if _is_web(line):
            raise _not_downloaded(line, where)
        try:
            storage.check_url(line)
        except storage.StorageError as exc:
            raise InputError(f"{exc} (in {where})" if where else str(exc)) from None
        return line
    if storage.is_url(base) and not os.path.isabs(line):
        return storage.join(base, line)
    return os.path.normpath(line if os.path.isabs(line) else os.path.join(base, line))


def _tar_sources(path: str, source_id: str, label: str | None,
                 columns: dict[str, Any] | None = None) -> list[Source]:
    """One source per WebDataset key of the tar: its first image member, with the CARRIED companions' places."""
    try:
        fileobj = storage.open_file(path, readahead=storage.READAHEAD) if storage.is_url(path) else None
        with tarfile.open(path if fileobj is None else None, "r:", fileobj=fileobj) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError) as exc:
        return [Source(source_id, path, label=label, error=f"unreadable: tar: {exc}", columns=columns)]
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
            out.append(Source(f"{source_id}::{key}", path, label=label, error=f"not_image: no image member ({exts})",
                              columns=columns))
            continue
        carried: dict[str, tuple[str, int, int]] = {}
        for m in group:
            ext = m.name.rsplit("/", 1)[-1].partition(".")[2].lower()
            if ext in CARRIED and ext not in carried:
                carried[ext] = (ext, m.offset_data, m.size)
        out.append(Source(f"{source_id}::{image.name}", path, image.offset_data, image.size, label,
                          columns=columns, companions=tuple(carried.values())))
    return out
