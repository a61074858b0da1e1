"""`shards build`: streamed sources -> parallel decode/validate/re-encode -> deduplicated, resumable shard groups.

The main process streams the sources of its part (``shards.sources``: no global listing, no sort), hands
batches of (index, source) to a pool of worker processes and consumes the results IN INPUT ORDER (a bounded
window of async batches), so the output does not depend on the number of workers. Workers do all per-image
work, including the sample's metadata and its tar framing (``shards.writer.frame_sample``); the main process
only deduplicates (``shards.digests.DigestSet``, < 20 bytes per image) and appends finished frames to the
shards, group after group (see ``shards.groups``): the complete groups of an interrupted run are kept, their
digests re-enter the set, and the build continues after them.

A billion-image corpus is built as ``--part i/n`` (one array task each): a part reads only its share of the
inputs and dedups within itself; ``merge-manifests`` removes the cross-part duplicates afterwards from the
digests in the stats files (hash-prefix slices on as many machines as needed) and renames every part's shards
into one contiguous sequence (see ``shards.merge``).
"""

from __future__ import annotations

import contextlib
import glob
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any

import PIL
from PIL import Image

from shards import storage
from shards.convert import (
    ConvertOptions,
    Rejected,
    configure_pillow,
    conversion_path,
    convert_image,
    set_opencv_threads,
)
from shards.digests import DigestSet, decode_digests, encode_digests
from shards.groups import (
    GroupWriter,
    input_digest,
    is_writable_dir,
    namespace,
    publish_shards,
    read_group_stats,
    remove_after,
    shard_entries,
    shard_stem,
    shards_present,
    staging_dir,
    stats_name,
    stats_payload,
    with_added_options,
    write_group_stats,
)
from shards.manifest import MANIFEST_NAME, Manifest, ShardEntry, write_json_atomic
from shards.metadata import sample_files
from shards.sources import Source, check_inputs, class_names, iter_sources, read_sample
from shards.writer import frame_sample

_BATCH = 32  # sources per worker task: amortises inter-process traffic, small enough to keep all workers busy


class BuildError(ValueError):
    """A build that cannot start or cannot go on (bad option, unwritable output, mismatched resume)."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything `shards build` takes besides the inputs and the output directory.

    Args:
        prefix: shard name prefix (``train`` -> ``train-000000.tar``).
        samples_per_shard: inputs per shard group; shards hold this many samples minus rejections. 10000 (~250 MB
            at 256 px; img2dataset's default): 1B images -> 100k shards, not 1M (README "Shards").
        max_shard_bytes: tar size target (1 GiB, webdataset's usual shard size); a group that would exceed it
            continues in the next shard number.
        short_side: resize so the shorter side is at most this (256 keeps RandomResizedCrop(224) sharp); 0 = keep.
        min_side: reject images whose shorter side is below this (thumbnails).
        max_pixels: reject images with more pixels than this (decompression bombs).
        max_aspect: reject images whose long/short ratio exceeds this (banners).
        quality: JPEG quality of the re-encoded samples (90: visually lossless at ~1/10 of the pixel bytes).
        workers: decode processes; 0 = all cores, 1 = in this process. The output does not depend on it.
        part: ``(i, n)`` to build only part i of n (0-based; its share found without listing the rest), or None.
        labels_from_folders: write ``<key>.cls`` from the first-level folder under each input directory.
        path_column: the column of image paths in .csv/.tsv/.parquet inputs; its other columns go into each
            sample's .json. Empty: the column named ``path``, else ``url`` (img2dataset's name).
        progress: show a progress bar on a terminal.
    """

    prefix: str = "train"
    samples_per_shard: int = 10000
    max_shard_bytes: int = 1 << 30
    short_side: int = 256
    min_side: int = 32
    max_pixels: int = 100_000_000
    max_aspect: float = 4.0
    quality: int = 90
    workers: int = 0
    part: tuple[int, int] | None = None
    labels_from_folders: bool = False
    path_column: str = ""
    progress: bool = True

    def convert_options(self) -> ConvertOptions:
        names = {f.name for f in fields(ConvertOptions)}
        return ConvertOptions(**{k: v for k, v in asdict(self).items() if k in names})

    def output_options(self) -> dict[str, Any]:
        """The options that determine the shard bytes (recorded in stats and manifest, checked on resume)."""
        skip = {"workers", "part", "progress"}
        # Which code converted the JPEGs changes their pixels and hashes, so a resume or merge must not mix paths.
        return {**{k: v for k, v in asdict(self).items() if k not in skip},
                "conversion": conversion_path(self.convert_options())}

    def validate(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "/.{} "):
            raise BuildError(f"--prefix must be a plain name without '/', '.', spaces or braces, got {self.prefix!r}")
        for name in ("samples_per_shard", "max_shard_bytes", "min_side", "max_pixels"):
            if getattr(self, name) < 1:
                raise BuildError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.short_side < 0 or self.workers < 0:
            raise BuildError("--short-side and --workers must be >= 0")
        if self.max_aspect < 1:
            raise BuildError(f"--max-aspect must be >= 1, got {self.max_aspect}")
        if not 1 <= self.quality <= 100:
            raise BuildError(f"--quality must be in 1..100, got {self.quality}")
        if self.part is not None and not (self.part[1] >= 1 and 0 <= self.part[0] < self.part[1]):
            raise BuildError(f"--part must be i/n with 0 <= i < n, got {self.part[0]}/{self.part[1]}")


def part_manifest_name(part: tuple[int, int] | None) -> str:
    """``manifest.json`` for a whole run, ``manifest.part-0003-of-0064.json`` for a part (parts may share a folder)."""
    return MANIFEST_NAME if part is None else f"manifest.part-{part[0]:04d}-of-{part[1]:04d}.json"


def sample_key(part: tuple[int, int] | None, index: int) -> str:
    """The WebDataset key of the part's ``index``-th input: ``0000001234``, or ``p0003-0000001234`` in part 3."""
    return f"{index:010d}" if part is None else f"p{part[0]:04d}-{index:010d}"


def build_shards(inputs: list[str], out_dir: str | os.PathLike, options: BuildOptions = BuildOptions()) -> Manifest:
    """Build (or resume) shards from ``inputs`` into ``out_dir``; return the manifest written there.

    Args:
        inputs: directories, path lists or tar files (see ``shards.sources``).
        out_dir: output directory (created).
        options: see BuildOptions.

    Returns:
        The manifest (for a part: the part's manifest, written as ``part_manifest_name(part)``).

    Raises:
        BuildError / InputError: before any work, for a bad option, a missing input or an unwritable output;
            later, when ``out_dir`` holds shards made with other options or from other inputs.
    """
    options.validate()
    storage.check_url(out_dir)  # "s3:/bucket" (a URL through Path) or ftp:// is an error, never a local folder
    out = out_dir if storage.is_url(out_dir) else Path(out_dir)  # s3://bucket/prefix: shards uploaded as they close
    inputs = list(inputs)
    check_inputs(inputs, options.labels_from_folders, options.path_column)
    reason = is_writable_dir(out)
    if reason:
        raise BuildError(f"cannot write to output directory {out}: {reason}")
    _refuse_merged_set(out)
    _refuse_old_layout(out, options.prefix)
    ns = namespace(options.prefix, options.part)
    classes = class_names(inputs, exclude=out) if options.labels_from_folders else None
    sources = iter_sources(inputs, options.part, exclude=out, labels_from_folders=options.labels_from_folders,
                           path_column=options.path_column)
    tally = _Tally()
    group, seq = _keep_complete_groups(out, ns, options, sources, tally)
    removed = remove_after(out, ns, group, seq)
    if group or removed:
        print(f"shards: resuming after {group} complete groups ({removed} stale files removed)", file=sys.stderr)

    job = _Job(options.convert_options(), options.part, {name: i for i, name in enumerate(classes or [])})
    per = options.samples_per_shard
    with _Progress(enabled=options.progress and sys.stderr.isatty()) as bar:
        current: _OpenGroup | None = None
        try:
            for batch in _results(_batched(enumerate(sources, group * per), _BATCH), options.workers, job):
                # One vectorised dedup call per batch (in input order), then one Python step per image.
                seen_before = tally.seen.add_many(b"".join(r[2] for r in batch if r[2] is not None)).tolist()
                duplicate = iter(seen_before)
                for r in batch:
                    if current is None:
                        current = _OpenGroup(out, ns, group, seq, options)
                    current.add(r, r[2] is not None and next(duplicate))
                    if current.inputs == per:
                        seq = current.finish(tally)
                        group, current = group + 1, None
                bar.advance(len(batch), seen_before.count(False))
            if current is not None:
                seq = current.finish(tally)
                group, current = group + 1, None
        finally:
            if current is not None:
                current.writer.abort()

    recorded = options.output_options()
    manifest_options = {**recorded, "inputs": tally.inputs, "groups": group,
                        "rejected": dict(sorted(tally.rejected.items())), "pillow": PIL.__version__}
    if options.part is not None:
        manifest_options["part"] = f"{options.part[0]}/{options.part[1]}"
    manifest = Manifest(shards=tally.entries, prefix=options.prefix, options=manifest_options, classes=classes,
                        root=out)
    write_json_atomic(storage.join(out, part_manifest_name(options.part)), manifest.to_json())
    accepted = manifest.total_samples
    print(f"shards: {accepted} accepted, {tally.inputs - accepted} rejected "
          f"({', '.join(f'{k} {v}' for k, v in sorted(tally.rejected.items())) or 'none'}) -> "
          f"{len(tally.entries)} shards in {out}", file=sys.stderr)
    if not tally.entries and options.part is None:
        raise BuildError(f"no image accepted out of {tally.inputs} inputs (reasons in {out}/*.stats.json)")
    return manifest


@dataclass
class _Tally:
    """What the build has produced so far: shard entries, counts, and the digests of every accepted image."""

    entries: list[ShardEntry] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    inputs: int = 0
    accepted: int = 0
    seen: DigestSet = field(default_factory=DigestSet)

    def add(self, stats: dict[str, Any], entries: list[ShardEntry]) -> None:
        self.entries.extend(entries)
        self.inputs += stats["inputs"]
        self.accepted += stats["accepted"]
        for r, c in stats["rejected"].items():
            self.rejected[r] = self.rejected.get(r, 0) + c


def _refuse_merged_set(out: Path) -> None:
    try:
        options = json.loads(storage.read_text(storage.join(out, MANIFEST_NAME))).get("options", {})
    except (OSError, ValueError, AttributeError):
        return
    if "parts" in options:
        raise BuildError(f"{out} holds a merged set of {options['parts']} parts (manifest.json); use a new --out")


def _refuse_old_layout(out: Path | str, prefix: str) -> None:
    """Shards of the layout before streamed parts (stats per global group, hex hashes) are not resumed or deleted."""
    if storage.is_url(out):
        return
    old = next(Path(out).glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].stats.json"), None)
    if old is not None:
        raise BuildError(f"{out} holds shards of an older layout ({old.name}); build into a new --out")


def _keep_complete_groups(out: Path, ns: str, options: BuildOptions, sources: Iterator[Source],
                          tally: _Tally) -> tuple[int, int]:
    """Walk the complete groups of an earlier run (a prefix), consuming their sources; return (group, seq) after."""
    recorded = options.output_options()
    per = options.samples_per_shard
    group = seq = 0
    while True:
        stats = read_group_stats(out, ns, group)
        if stats is None:
            return group, seq
        path = storage.join(out, stats_name(ns, group))
        if with_added_options(stats.get("options", {})) != recorded:  # groups of older releases still resume
            raise BuildError(f"{path} was built with other options ({stats.get('options')}); use a new --out")
        names = [shard_stem(ns, seq + k) for k in range(len(stats.get("shards", [])))]
        if not shards_present(out, stats, names):
            return group, seq
        ids = [s.id for s in islice(sources, per)]
        if stats.get("input_digest") != input_digest(ids):
            raise BuildError(f"{path} was built from other inputs (files added or removed since); use a new --out")
        tally.seen.add_many(decode_digests(stats["digests"]))
        tally.add(stats, shard_entries(stats, ns, group))
        group, seq = group + 1, seq + len(names)


class _OpenGroup:
    """The group being written: its shards, rejections, digests and input fingerprint."""

    def __init__(self, out: Path, ns: str, group: int, seq: int, options: BuildOptions):
        self.out, self.ns, self.group, self.seq, self.options = out, ns, group, seq, options
        self.writer = GroupWriter(staging_dir(out), lambda k: shard_stem(ns, seq + k), options.max_shard_bytes)
        self.first = group * options.samples_per_shard
        self.inputs = 0
        self.ids: list[str] = []
        self.digests: list[bytes] = []
        self.rejections: list[dict[str, Any]] = []

    def add(self, result: tuple, duplicate: bool) -> None:
        index, source_id, digest, a, b = result
        self.inputs += 1
        self.ids.append(source_id)
        if digest is None:
            self.rejections.append({"index": index, "source": source_id, "reason": a, "detail": b})
        elif duplicate:
            self.rejections.append({"index": index, "source": source_id, "reason": "duplicate",
                                    "detail": f"hash {digest.hex()} seen earlier"})
        else:
            self.writer.write(a, b)
            self.digests.append(digest)

    def finish(self, tally: _Tally) -> int:
        """Publish the shards, then the stats file; return the next shard number."""
        name = stats_name(self.ns, self.group)
        entries = self.writer.close(name)
        publish_shards(self.out, entries)  # object storage: each shard uploaded whole before the stats count it
        stats = stats_payload(self.group, self.first, self.inputs, input_digest(self.ids),
                              self.options.output_options(), entries, encode_digests(b"".join(self.digests)),
                              self.rejections)
        write_group_stats(self.out, self.ns, self.group, stats)
        tally.add(stats, entries)
        return self.seq + len(entries)


@dataclass(frozen=True)
class _Job:
    """What every worker needs besides its sources (sent once, to the pool's initializer)."""

    convert: ConvertOptions
    part: tuple[int, int] | None
    label_index: dict[str, int]


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job
    configure_pillow(job.convert)
    set_opencv_threads(1)  # one worker process per core already


def _results(tasks: Iterator[list[tuple[int, Source]]], workers: int, job: _Job) -> Iterator[list[tuple]]:
    """Converted batches in input order: in this process (workers=1) or a spawned pool with a bounded window."""
    first = next(tasks, None)
    if first is None:
        return  # nothing left to convert: no pool to start
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        with _pillow_guards(job.convert):
            global _JOB
            _JOB = job
            for batch in _chain(first, tasks):
                yield _convert_batch(batch)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads (DALI, torch)
    with ctx.Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        window: deque = deque()
        for batch in _chain(first, tasks):
            window.append(pool.apply_async(_convert_batch, (batch,)))
            if len(window) >= 4 * workers:  # bounded: a billion tasks never sit in memory at once
                yield window.popleft().get()
        while window:
            yield window.popleft().get()


def _chain(first: list, rest: Iterator[list]) -> Iterator[list]:
    yield first
    yield from rest


def _convert_batch(batch: list[tuple[int, Source]]) -> list[tuple]:
    """Per source: ``(index, id, None, reason, detail)`` or ``(index, id, digest, key, framed sample)``."""
    job = _JOB
    out: list[tuple] = []
    for index, source in batch:
        if source.error:
            reason, _, detail = source.error.partition(": ")
            out.append((index, source.id, None, reason, detail))
            continue
        try:
            data, companions = read_sample(source)
        except OSError as exc:
            out.append((index, source.id, None, "unreadable", exc.strerror or str(exc)))
            continue
        result = convert_image(data, job.convert)
        if isinstance(result, Rejected):
            out.append((index, source.id, None, result.reason, result.detail))
            continue
        key = sample_key(job.part, index)
        facts = {"key": key, "source": source.id, "width": result.width, "height": result.height,
                 "orig_width": result.orig_width, "orig_height": result.orig_height, "format": result.format,
                 "mode": result.mode, "frames": result.frames, "hash": result.hash}
        files = sample_files(result.jpeg, facts, source.label, job.label_index, source.columns, companions)
        out.append((index, source.id, bytes.fromhex(result.hash), key, frame_sample(key, files)))
    return out


def _batched(items: Iterator, size: int) -> Iterator[list]:
    while batch := list(islice(items, size)):
        yield batch


@contextlib.contextmanager
def _pillow_guards(convert: ConvertOptions):
    """configure_pillow for in-process conversion, restoring the caller's Pillow settings afterwards."""
    from PIL import ImageFile

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings():
        configure_pillow(convert)
        threads = set_opencv_threads(1)  # workers=1 means one core
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved
            if threads:
                set_opencv_threads(threads)


class _Progress:
    """A rich progress line (inputs done, images/s, accepted, rejected) on a terminal; silent otherwise.

    No total and no bar: a part never counts its inputs ahead (that would be a listing of its share).
    """

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.inputs = self.accepted = 0
        self._bar = None
        self._last = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("shards {task.completed} inputs"),
                                 TextColumn("{task.fields[rate]:>7.0f} img/s"),
                                 TextColumn("accepted {task.fields[ok]}"), TextColumn("rejected {task.fields[bad]}"),
                                 TimeElapsedColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("build", total=None, rate=0.0, ok=0, bad=0)
            self._start = time.perf_counter()
        return self

    def advance(self, inputs: int, accepted: int) -> None:
        self.inputs += inputs
        self.accepted += accepted
        if self._bar is None:
            return
        now = time.perf_counter()
        if now - self._last > 0.2:
            self._last = now
            self._bar.update(self._task, completed=self.inputs, ok=self.accepted, bad=self.inputs - self.accepted,
                             rate=self.inputs / max(now - self._start, 1e-9))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
