"""`shards build`: sorted sources -> parallel decode/validate/re-encode -> deduplicated, resumable shard groups.

The main process enumerates and sorts the inputs, hands batches of (index, source) to a pool of worker
processes and consumes the results IN INPUT ORDER (a bounded window of async batches), so the output does not
depend on the number of workers. It alone deduplicates (a set of content hashes) and writes shards, group
after group (see ``shards.groups``): a completed group is skipped on a rerun and its hashes re-enter the set.

Memory of the dedup set: a Python set of 16-byte digests costs ~90 bytes per accepted image (~9 GB at 100M,
~90 GB at 1B). A billion-image corpus is therefore built as ``--part i/n``: each part dedups within itself
(a few GB), and ``merge-manifests`` removes the cross-part duplicates afterwards from the hashes in the stats
files (see ``shards.merge``), which makes the joined parts equal to one whole run.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import PIL
from PIL import Image

from shards.convert import Converted, ConvertOptions, Rejected, configure_pillow, convert_image
from shards.groups import (
    GroupWriter,
    input_digest,
    is_writable_dir,
    read_group_stats,
    remove_group_files,
    remove_torn_files,
    shard_entries,
    stats_name,
    stats_payload,
    write_group_stats,
)
from shards.manifest import MANIFEST_NAME, Manifest, ShardEntry, write_json_atomic
from shards.sources import Source, check_inputs, class_names, list_sources, read_source

_BATCH = 8  # sources per worker task: amortises inter-process traffic, small enough to keep all workers busy


class BuildError(ValueError):
    """A build that cannot start or cannot go on (bad option, unwritable output, mismatched resume)."""


@dataclass(frozen=True)
class BuildOptions:
    """Everything `shards build` takes besides the inputs and the output directory.

    Args:
        prefix: shard name prefix (``train`` -> ``train-000000.tar``).
        samples_per_shard: inputs per shard group; shards hold this many samples minus rejections (1000: ~25 MB at
            256 px).
        max_shard_bytes: tar size target (1 GiB); a group that would exceed it continues in a ``-1`` shard.
        short_side: resize so the shorter side is at most this (256 keeps RandomResizedCrop(224) sharp); 0 = keep.
        min_side: reject images whose shorter side is below this (thumbnails).
        max_pixels: reject images with more pixels than this (decompression bombs).
        max_aspect: reject images whose long/short ratio exceeds this (banners).
        quality: JPEG quality of the re-encoded samples (90: visually lossless at ~1/10 of the pixel bytes).
        workers: decode processes; 0 = all cores, 1 = in this process. The output does not depend on it.
        part: ``(i, n)`` to build only part i of n (0-based), or None for the whole run.
        labels_from_folders: write ``<key>.cls`` from the first-level folder under each input directory.
        progress: show a progress bar on a terminal.
    """

    prefix: str = "train"
    samples_per_shard: int = 1000
    max_shard_bytes: int = 1 << 30
    short_side: int = 256
    min_side: int = 32
    max_pixels: int = 100_000_000
    max_aspect: float = 4.0
    quality: int = 90
    workers: int = 0
    part: tuple[int, int] | None = None
    labels_from_folders: bool = False
    progress: bool = True

    def convert_options(self) -> ConvertOptions:
        names = {f.name for f in fields(ConvertOptions)}
        return ConvertOptions(**{k: v for k, v in asdict(self).items() if k in names})

    def output_options(self) -> dict[str, Any]:
        """The options that determine the shard bytes (recorded in stats and manifest, checked on resume)."""
        skip = {"workers", "part", "progress"}
        return {k: v for k, v in asdict(self).items() if k not in skip}

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


def parse_part(text: str) -> tuple[int, int]:
    """``"3/64"`` -> (3, 64); raises BuildError with a one-line message."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise BuildError(f"--part must look like i/n (e.g. 3/64), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise BuildError(f"--part must be i/n with 0 <= i < n, got {text!r}")
    return i, n


def part_groups(num_groups: int, part: tuple[int, int] | None) -> range:
    """Contiguous groups of part i of n (balanced to within one group); all groups without a part."""
    if part is None:
        return range(num_groups)
    i, n = part
    return range(i * num_groups // n, (i + 1) * num_groups // n)


def part_manifest_name(part: tuple[int, int] | None) -> str:
    """``manifest.json`` for a whole run, ``manifest.part-0003-of-0064.json`` for a part (parts may share a folder)."""
    return MANIFEST_NAME if part is None else f"manifest.part-{part[0]:04d}-of-{part[1]:04d}.json"


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
    out = Path(out_dir)
    check_inputs(list(inputs), options.labels_from_folders)
    reason = is_writable_dir(out)
    if reason:
        raise BuildError(f"cannot write to output directory {out}: {reason}")
    sources = list_sources(list(inputs), exclude=out, labels_from_folders=options.labels_from_folders)
    if not sources:
        raise BuildError(f"no files found in {' '.join(map(str, inputs))}")
    classes = class_names(sources) if options.labels_from_folders else None
    per = options.samples_per_shard
    groups = part_groups(-(-len(sources) // per), options.part)
    recorded = options.output_options()
    remove_torn_files(out, options.prefix, groups)

    todo: list[int] = []
    done: dict[int, dict[str, Any]] = {}
    for g in groups:
        stats = read_group_stats(out, options.prefix, g)
        ids = [s.id for s in sources[g * per:(g + 1) * per]]
        if stats is None:
            todo.append(g)
            continue
        _check_resumable(stats, recorded, ids, out / stats_name(options.prefix, g))
        done[g] = stats

    label_index = {name: i for i, name in enumerate(classes or [])}
    seen: set[str] = set()
    entries: list[ShardEntry] = []
    rejected: dict[str, int] = {}
    total_inputs = sum(len(sources[g * per:(g + 1) * per]) for g in groups)
    bar = _Progress(total_inputs, enabled=options.progress and sys.stderr.isatty())
    results = _converted(sources, todo, per, options)
    with bar:
        for g in groups:
            if g in done:
                stats = done[g]
                seen.update(stats["hashes"])
                bar.advance(stats["inputs"], stats["accepted"], stats["inputs"] - stats["accepted"])
            else:
                stats = _write_group(out, g, sources, per, options, recorded, results, seen, label_index, bar)
            entries.extend(shard_entries(stats, options.prefix, g))
            for r, c in stats["rejected"].items():
                rejected[r] = rejected.get(r, 0) + c

    manifest_options = {**recorded, "inputs": total_inputs, "groups": [groups.start, groups.stop],
                        "rejected": dict(sorted(rejected.items())), "pillow": PIL.__version__}
    if options.part is not None:
        manifest_options["part"] = f"{options.part[0]}/{options.part[1]}"
    manifest = Manifest(shards=entries, prefix=options.prefix, options=manifest_options, classes=classes, root=out)
    write_json_atomic(out / part_manifest_name(options.part), manifest.to_json())
    accepted = manifest.total_samples
    print(f"shards: {accepted} accepted, {total_inputs - accepted} rejected "
          f"({', '.join(f'{k} {v}' for k, v in sorted(rejected.items())) or 'none'}) -> {len(entries)} shards in {out}",
          file=sys.stderr)
    if not entries and options.part is None:
        raise BuildError(f"no image accepted out of {total_inputs} inputs (reasons in {out}/*.stats.json)")
    return manifest


def _check_resumable(stats: dict[str, Any], recorded: dict[str, Any], ids: list[str], path: Path) -> None:
    if stats.get("options") != recorded:
        raise BuildError(f"{path} was built with other options ({stats.get('options')}); use a new --out")
    if stats.get("input_digest") != input_digest(ids):
        raise BuildError(f"{path} was built from other inputs (files added or removed since); use a new --out")


def _write_group(out: Path, g: int, sources: list[Source], per: int, options: BuildOptions,
                 recorded: dict[str, Any], results: Iterator[tuple[int, Converted | Rejected]], seen: set[str],
                 label_index: dict[str, int], bar: _Progress) -> dict[str, Any]:
    """Consume the group's results in order, write its shards and then its stats file."""
    remove_group_files(out, options.prefix, g)  # a torn attempt of this group, if any
    first, group_sources = g * per, sources[g * per:(g + 1) * per]
    writer = GroupWriter(out, options.prefix, g, options.max_shard_bytes)
    hashes: list[str] = []
    rejections: list[dict[str, Any]] = []
    try:
        for source in group_sources:
            index, result = next(results)
            assert sources[index] is source, "results arrived out of order"
            if isinstance(result, Converted) and result.hash in seen:
                result = Rejected("duplicate", f"hash {result.hash} seen earlier")
            if isinstance(result, Rejected):
                rejections.append({"index": index, "source": source.id, "reason": result.reason,
                                   "detail": result.detail})
                bar.advance(1, 0, 1)
                continue
            seen.add(result.hash)
            hashes.append(result.hash)
            key = f"{index:010d}"
            meta = {"key": key, "source": source.id, "width": result.width, "height": result.height,
                    "orig_width": result.orig_width, "orig_height": result.orig_height, "format": result.format,
                    "mode": result.mode, "frames": result.frames, "hash": result.hash}
            files = {"jpg": result.jpeg}
            if source.label is not None:
                meta["class"] = source.label
                files["cls"] = str(label_index[source.label]).encode()
            files["json"] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
            writer.write(key, files)
            bar.advance(1, 1, 0)
        entries = writer.close(stats_name(options.prefix, g))
    except BaseException:
        writer.abort()
        raise
    digest = input_digest([s.id for s in group_sources])
    stats = stats_payload(g, first, len(group_sources), digest, recorded, entries, hashes, rejections)
    write_group_stats(out, options.prefix, g, stats)
    return stats


def _converted(sources: list[Source], todo: list[int], per: int,
               options: BuildOptions) -> Iterator[tuple[int, Converted | Rejected]]:
    """(index, result) for every source of the ``todo`` groups, in input order."""
    indices = (i for g in todo for i in range(g * per, min((g + 1) * per, len(sources))))
    batches = _batched(((i, sources[i]) for i in indices), _BATCH)
    convert = options.convert_options()
    workers = options.workers or os.cpu_count() or 1
    if workers == 1 or not todo:
        with _pillow_guards(convert):
            for batch in batches:
                yield from _convert_batch(batch, convert)
        return
    ctx = multiprocessing.get_context("spawn")  # no fork: the caller may hold threads (DALI, torch)
    with ctx.Pool(workers, initializer=configure_pillow, initargs=(convert,)) as pool:
        window: deque = deque()
        for batch in batches:
            window.append(pool.apply_async(_convert_batch, (batch, convert)))
            if len(window) >= 4 * workers:  # bounded: a billion tasks never sit in memory at once
                yield from window.popleft().get()
        while window:
            yield from window.popleft().get()


def _convert_batch(batch: list[tuple[int, Source]], convert: ConvertOptions) -> list[tuple[int, Converted | Rejected]]:
    out = []
    for index, source in batch:
        if source.error:
            reason, _, detail = source.error.partition(": ")
            out.append((index, Rejected(reason, detail)))
            continue
        try:
            data = read_source(source)
        except OSError as exc:
            out.append((index, Rejected("unreadable", exc.strerror or str(exc))))
            continue
        out.append((index, convert_image(data, convert)))
    return out


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextlib.contextmanager
def _pillow_guards(convert: ConvertOptions):
    """configure_pillow for in-process conversion, restoring the caller's Pillow settings afterwards."""
    from PIL import ImageFile

    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings():
        configure_pillow(convert)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


class _Progress:
    """A rich progress bar (images/s, accepted, rejected) on a terminal; silent otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.enabled, self.total = enabled, total
        self.accepted = self.rejected = 0
        self._bar = None
        self._last = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("shards"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rate]:>7.0f} img/s"),
                                 TextColumn("accepted {task.fields[ok]}"), TextColumn("rejected {task.fields[bad]}"),
                                 TimeRemainingColumn(), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task("build", total=self.total, rate=0.0, ok=0, bad=0)
            self._start = time.perf_counter()
        return self

    def advance(self, n: int, accepted: int, rejected: int) -> None:
        self.accepted += accepted
        self.rejected += rejected
        if self._bar is None:
            return
        now = time.perf_counter()
        done = self.accepted + self.rejected
        if now - self._last > 0.1 or done == self.total:
            self._last = now
            self._bar.update(self._task, completed=done, ok=self.accepted, bad=self.rejected,
                             rate=done / max(now - self._start, 1e-9))

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
