"""The shard manifest: the contract between `shards/` (writer) and `pipeline/` (reader).

``manifest.json`` sits in the shard directory; shard and index paths in it are relative to that directory::

    {"version": 1, "prefix": "train", "total_samples": 1234, "total_bytes": 567890,
     "pattern": "train-{000000..000012}.tar",
     "shards": [{"tar": "train-000000.tar", "index": "train-000000.idx", "samples": 500,
                 "bytes": 230000, "max_sample_bytes": 1200, "stats": "train-000000.stats.json"}, ...],
     "options": {...the build options...}, "classes": ["cat", "dog"] or null}

The directory may be an object-storage prefix (``s3://bucket/shards``, see ``shards.storage``): shard paths are
then URLs, and index files are read from local copies (``Manifest.index_copies``), which the loaders keep for the
current and the next window only.

Each sample in a tar is ``<key>.jpg`` (RGB JPEG) + ``<key>.json`` (source path, original size, hash) and,
for labelled sets, ``<key>.cls`` (the class index as ASCII text). ``pattern`` is the one brace pattern that names
every tar (``webdataset.WebDataset(root + "/" + pattern)``), or null when the names do not form one sequence.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from shards import storage
from shards.shard_table import ShardEntry, ShardTable
from shards.sources import IMAGE_SUFFIXES

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class ManifestError(ValueError):
    """A missing or inconsistent manifest, shard or index file; the message names the file."""


@dataclass
class Manifest:
    """All shards of a data set plus the options that produced them.

    ``shards`` may be given as a list of ``ShardEntry``; it is kept as a :class:`ShardTable` (the same entries as
    a read-only sequence, ~50 bytes each instead of ~560: every rank holds the whole manifest).
    """

    shards: ShardTable
    prefix: str = "train"
    options: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None
    root: Path | str = Path(".")  # directory (or s3:// / gs:// prefix) the paths resolve against (not serialised)
    # Local copies of index files in object storage (not serialised): made when asked for, dropped by the reader.
    index_copies: storage.LocalCopies = field(default_factory=lambda: storage.LocalCopies("moco-index-copies-"),
                                              compare=False, repr=False)

    def __post_init__(self) -> None:
        self.shards = ShardTable.from_entries(self.shards)

    @property
    def total_samples(self) -> int:
        return int(self.shards.samples.sum())

    @property
    def total_bytes(self) -> int:
        return int(self.shards.bytes.sum())

    @property
    def max_sample_bytes(self) -> int:
        return int(self.shards.max_sample_bytes.max(initial=0))

    def tar_path(self, shard: ShardEntry) -> Path | str:
        """The shard's tar: a Path, or a URL string when the shards are in object storage."""
        return storage.join(self.root, shard.tar)

    def index_path(self, shard: ShardEntry) -> Path:
        """A local path of the shard's index file; in object storage, a copy in ``index_copies`` (DALI's webdataset
        reader opens s3:// tars itself but parses index files from local disk only), fetched unless it is kept."""
        url = self.index_url(shard)
        return self.index_copies.get(url) if storage.is_url(url) else url

    def keep_index_copies(self, shards: list[int]) -> int:
        """Delete the local copies of index files but those of ``shards`` (indices into ``shards``); returns how
        many went. A reader calls it as it retires a window: a copy is ~63 B per sample, and kept for every shard
        read they would grow to tens of GB per rank over an epoch of a billion images."""
        return self.index_copies.keep_only({self.index_url(self.shards[i]) for i in shards})

    def index_url(self, shard: ShardEntry) -> Path | str:
        """Where the index file is (a URL string in object storage), without fetching it."""
        return storage.join(self.root, shard.index)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION, "prefix": self.prefix, "total_samples": self.total_samples,
            "total_bytes": self.total_bytes, "pattern": brace_pattern(self.shards.tars()),
            "shards": [asdict(s) for s in self.shards],
            "options": self.options, "classes": self.classes,
        }

    def check_files(self) -> None:
        """Raise ManifestError naming the first shard tar or index file that is missing.

        One listing per folder holding shards (one for the whole store in object storage), not one ``stat`` per
        file: 0.2 s for the 200k files of a 100k-shard manifest, where ``Path.is_file`` took 1.4 s (``python -m
        benchmarks run --suite scale``).
        """
        if storage.is_url(self.root):
            try:
                # One listing, not one request per file. Its sizes are not kept: a shard cut or replaced later must
                # show its new size to the shard check.
                present = {path for path, _size in storage.list_files(self.root)}
            except storage.StorageError as exc:
                raise ManifestError(str(exc)) from None
            for shard in self.shards:
                for path in (self.tar_path(shard), self.index_url(shard)):
                    if path not in present:
                        raise ManifestError(f"missing {'shard' if path.endswith('.tar') else 'index file'}: {path}")
            return
        root = os.fspath(self.root)
        listed: dict[str, set[str]] = {}  # folder relative to the root ('' for the root) -> the names in it

        def absent(names: set[str]) -> set[str]:
            """Those of ``names`` (relative to the root) not in a listing of their folder."""
            if "" not in listed:
                listed[""] = _listing(root)
            missing = set()
            for name in names - listed[""]:  # in a sub-folder, or missing
                folder, _, base = name.rpartition("/")
                if folder not in listed:
                    listed[folder] = _listing(os.path.join(root, folder))
                if base not in listed[folder] and not os.path.isfile(os.path.join(root, name)):  # '..', links
                    missing.add(name)
            return missing

        for names, kind in ((self.shards.tars(), "shard"), (self.shards.indexes(), "index file")):
            missing = absent(set(names))
            if missing:
                first = next(name for name in names if name in missing)
                raise ManifestError(f"missing {kind}: {Path(root, first)}")


def _listing(folder: str) -> set[str]:
    """The names in ``folder`` (none when it cannot be listed); files and folders alike: a ``stat`` each would
    double the cost, and a folder named like a shard fails when it is read, as a damaged shard."""
    try:
        return set(os.listdir(folder))
    except OSError:
        return set()


def brace_pattern(tars: list[str]) -> str | None:
    """``train-{000000..000012}.tar`` when ``tars`` are exactly that sequence, in order; else None.

    The numbers must have one width (brace expansion pads every number to the width of the range's ends).
    """
    matches = [re.fullmatch(r"(.*-)(\d+)\.tar", t) for t in tars]
    if not tars or any(m is None for m in matches):
        return None
    stem, first = matches[0].group(1), matches[0].group(2)
    width, start = len(first), int(first)
    for k, m in enumerate(matches):
        if m.group(1) != stem or len(m.group(2)) != width or int(m.group(2)) != start + k:
            return None
    return f"{stem}{{{first}..{matches[-1].group(2)}}}.tar"


def manifest_path(path: str | os.PathLike) -> Path:
    """Accept either the manifest file or the directory holding it."""
    path = Path(path)
    return path / MANIFEST_NAME if path.is_dir() else path


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> Manifest:
    """Load and validate a manifest.

    Args:
        path: manifest.json or its directory.
        check_files: also check that every tar and index file exists.

    Raises:
        ManifestError: missing or malformed manifest, or a missing shard/index (named), in one line with the fix.
    """
    if storage.is_url(path) or storage.looks_mangled(path):
        return _read_remote_manifest(path, check_files)
    given, path = Path(path), manifest_path(path)
    if given.suffix == ".tar":
        raise ManifestError(f"{given} is a tar shard, not a manifest: pass the directory holding the shards and "
                            f"their {MANIFEST_NAME} (or that file)")
    if not path.is_file():
        raise ManifestError(_not_found(given, path))
    try:
        with _no_gc():
            raw = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ManifestError(f"{path} is not a shard manifest (not UTF-8 text): pass the directory that "
                            f"`python -m shards build` wrote, or its {MANIFEST_NAME}") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}): "
                            "restore it or rebuild the shards with `python -m shards build`") from None
    except OSError as exc:
        raise ManifestError(f"cannot read the shard manifest {path}: {exc.strerror or exc}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("shards"), list):
        raise ManifestError(f'{path} is not a shard manifest (no "shards" list): pass the directory that '
                            "`python -m shards build` wrote")
    if raw.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{path}: unsupported manifest version {raw.get('version')!r}")
    with _no_gc():
        shards = _shard_entries(raw["shards"], path)
    if not shards:
        raise ManifestError(f"{path}: the manifest lists no shards")
    manifest = Manifest(shards=shards, prefix=raw.get("prefix", "train"), options=raw.get("options", {}),
                        classes=raw.get("classes"), root=path.parent)
    if check_files:
        manifest.check_files()
    return manifest


_INT_FIELDS = {"samples": 1, "bytes": 0, "max_sample_bytes": 0}  # the smallest value each may take
_FILE_FIELDS = ("tar", "index")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: parsing a manifest makes millions of dicts and strings (no cycles), and
    each full collection they trigger walks every object of the process (torch's and DALI's included): 100k
    entries parse in 0.2 s instead of 0.4 s after ``import torch``."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _not_found(given: Path, path: Path) -> str:
    """Why there is no manifest at ``given``, and what to do: images are built into shards first."""
    if given.is_dir():
        files = [p for p in given.iterdir() if p.is_file()] + [p for d in given.iterdir() if d.is_dir()
                                                              for p in d.iterdir() if p.is_file()]
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in files):
            return (f"{given} holds images, not shards: build shards from it first with `python -m shards build "
                    f"{given} --out SHARD_DIR` and pass SHARD_DIR")
        tars = sum(p.suffix == ".tar" for p in files)
        if tars:
            return (f"no {MANIFEST_NAME} in {given} (it holds {tars} .tar files): shards built with --part are "
                    "joined by `python -m shards merge-manifests`; other tars are re-sharded by `python -m shards "
                    "build`")
    elif given.suffix.lower() in IMAGE_SUFFIXES and given.is_file():
        return f"{given} is an image, not a shard manifest: build shards with `python -m shards build` first"
    return f"shard manifest not found: {path}"


_KNOWN_FIELDS = frozenset(f.name for f in fields(ShardEntry))


def _checked_columns(raw: list[Any]) -> ShardTable | None:
    """The table of the entries ``raw`` when every one passes every check of :func:`_shard_entry`, else None.

    The checks run over whole columns (C-level passes: ``map``, ``set``, ``min``), not entry by entry, and build no
    message: the slow path that names the bad entry runs only when one fails.
    """
    if not raw:
        return ShardTable([], [], [], [], [], [])
    if set(map(type, raw)) != {dict}:
        return None
    # Every entry with every field (as the writer writes them): no unknown field, as each has exactly six keys.
    full = sum(map(len, raw)) == len(_KNOWN_FIELDS) * len(raw)
    if not full and not all(map(_KNOWN_FIELDS.issuperset, raw)):
        return None
    try:
        tars, indexes = [s["tar"] for s in raw], [s["index"] for s in raw]
        samples, nbytes = [s["samples"] for s in raw], [s["bytes"] for s in raw]
        stats = [s["stats"] for s in raw] if full else [s.get("stats", "") for s in raw]
        max_bytes = [s["max_sample_bytes"] for s in raw] if full else [s.get("max_sample_bytes", 0) for s in raw]
        stats_names = dict.fromkeys(stats)  # a few distinct names (one per writer group)
    except (KeyError, TypeError):  # a required field missing, a stats name that is a list or an object
        return None
    if not (set(map(type, tars)) | set(map(type, indexes)) == {str} and {type(name) for name in stats_names} == {str}
            and all(tars) and all(indexes)
            and set(map(type, samples)) | set(map(type, nbytes)) | set(map(type, max_bytes)) == {int}):
        return None
    try:
        table = ShardTable(tars, indexes, stats, samples, nbytes, max_bytes)
    except OverflowError:  # beyond int64: not a shard's size
        return None
    least = table.samples.min(), table.bytes.min(), table.max_sample_bytes.min()  # numpy: faster than min(list)
    return table if least[0] >= 1 and least[1] >= 0 and least[2] >= 0 else None


def _shard_entries(raw: list[Any], path: Path) -> ShardTable:
    """The manifest's shard entries, each checked (ManifestError naming the first bad one and its field).

    Every rank reads the whole list (it deals from it), so this is O(shards) per process and kept small: the
    checks and the columns of a :class:`ShardTable` are taken from the parsed objects a field at a time (no
    ``ShardEntry`` made, no object kept per entry): 53 B kept per entry where an entry object holding its parsed
    JSON object kept 556 B (tracemalloc), for 1.0 us per entry plus 0.1 us to free the parsed objects where one check
    per entry and that object took 0.9 us (1M entries, ``python -m benchmarks run --suite scale --only manifest``).
    """
    table = _checked_columns(raw)
    if table is None:
        for k, s in enumerate(raw):
            _shard_entry(s, k, path)  # raises naming the first bad entry
        raise ManifestError(f"{path}: a shard entry fails a check that names none; rebuild the shards with "
                            "`python -m shards build`")
    return table


def _shard_entry(raw: Any, k: int, path: Path) -> ShardEntry:
    """Shard ``k`` of the manifest at ``path``, its fields checked (ManifestError naming the field otherwise)."""
    name = raw.get("tar") if isinstance(raw, dict) else None
    where = f"{path}: shard {k}" + (f" ({name})" if isinstance(name, str) else "")
    fix = "; fix the manifest or rebuild the shards with `python -m shards build`"
    if not isinstance(raw, dict):
        raise ManifestError(f"{where} is {type(raw).__name__}, not an object{fix}")
    known = {f.name for f in fields(ShardEntry)}
    missing = [f.name for f in fields(ShardEntry) if f.default is MISSING and f.name not in raw]
    unknown = sorted(set(raw) - known)
    if missing or unknown:
        what = f"lacks {', '.join(missing)}" if missing else f"has unknown fields {', '.join(unknown)}"
        raise ManifestError(f"{where} {what}{fix}")
    for field_name, least in _INT_FIELDS.items():
        value = raw.get(field_name, least)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ManifestError(f"{where}: {field_name} must be an integer >= {least}, got {value!r}{fix}")
        if value >= 1 << 63:
            raise ManifestError(f"{where}: {field_name} must be below 2**63, got {value!r}{fix}")
    for field_name in _FILE_FIELDS:
        if not isinstance(raw[field_name], str) or not raw[field_name]:
            raise ManifestError(f"{where}: {field_name} must be a file name, got {raw[field_name]!r}{fix}")
    if not isinstance(raw.get("stats", ""), str):
        raise ManifestError(f"{where}: stats must be a file name or empty, got {raw['stats']!r}{fix}")
    return ShardEntry(**raw)


def _read_remote_manifest(url: str, check_files: bool) -> Manifest:
    """read_manifest for a manifest in object storage: parsed from a temporary local copy, named by its URL."""
    try:
        storage.check_url(url)
        url = url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise ManifestError(f"shard manifest not found: {url}") from None
    except storage.StorageError as exc:
        raise ManifestError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="moco-manifest-") as tmp:
        local = Path(tmp) / storage.name(url)
        local.write_bytes(data)
        try:
            manifest = read_manifest(local, check_files=False)
        except ManifestError as exc:
            raise ManifestError(str(exc).replace(str(local), url)) from None
    manifest.root = storage.parent(url)
    if check_files:
        manifest.check_files()
    return manifest


def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> Path:
    """Write ``manifest.json`` atomically (temporary file, fsync, rename) into ``directory``."""
    out = storage.join(directory, MANIFEST_NAME)
    write_json_atomic(out, manifest.to_json())
    return out


def write_json_atomic(path: Path | str, payload: Any) -> None:
    """Write JSON so that readers see either the old file or the complete new one, never a torn one."""
    if storage.is_url(path):
        storage.write_bytes(path, json.dumps(payload, indent=1).encode())  # one PUT: the object appears whole
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
