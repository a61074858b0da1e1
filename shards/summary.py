"""`shards stats`: totals, rejections by reason and a histogram of sample sizes, from manifest, index and stats files.

Nothing is decoded: sample sizes come from the index files (the JPEG member's size), rejections from the
per-group stats files, so this is cheap on any number of shards. In object storage (``s3://bucket/shards``) each
index is streamed to a scratch file, parsed and deleted: no tar is read, one GET per index file, 16 in flight.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shards import storage
from shards.manifest import Manifest, read_manifest
from shards.writer import SampleRecord, read_index

FETCH_AHEAD = storage.REQUESTS_IN_FLIGHT  # index files fetched at once from object storage


@dataclass
class ShardSummary:
    """Totals of a shard set; ``size_histogram`` maps a JPEG size bucket's lower bound (bytes, powers of 2) to a count."""

    shards: int = 0
    samples: int = 0
    bytes: int = 0
    inputs: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    size_histogram: dict[int, int] = field(default_factory=dict)
    samples_per_shard: tuple[int, int] = (0, 0)  # min, max
    classes: int = 0


def summarize(path: str | os.PathLike) -> ShardSummary:
    """Summarise the shard set at ``path`` (manifest.json or its directory)."""
    manifest = read_manifest(path)
    out = ShardSummary(shards=len(manifest.shards), samples=manifest.total_samples, bytes=manifest.total_bytes,
                       classes=len(manifest.classes or []))
    out.samples_per_shard = (min(s.samples for s in manifest.shards), max(s.samples for s in manifest.shards))
    with tempfile.TemporaryDirectory(prefix="moco-stats-") as scratch:
        for records in _index_records(manifest, Path(scratch)):
            for rec in records:
                size = next((s for ext, _o, s, _n in rec.files if ext == "jpg"), 0)
                bucket = 1 << max(size.bit_length() - 1, 0)
                out.size_histogram[bucket] = out.size_histogram.get(bucket, 0) + 1
    out.size_histogram = dict(sorted(out.size_histogram.items()))
    if "inputs" in manifest.options:  # written by build and merge-manifests (covers groups that kept no sample)
        out.inputs, out.rejected = manifest.options["inputs"], dict(manifest.options.get("rejected", {}))
    else:  # a manifest from elsewhere: add up whatever stats files it points at
        for name in dict.fromkeys(s.stats for s in manifest.shards if s.stats):
            stats = json.loads(storage.read_text(storage.join(manifest.root, name)))
            out.inputs += stats["inputs"]
            for reason, count in stats["rejected"].items():
                out.rejected[reason] = out.rejected.get(reason, 0) + count
    out.rejected = dict(sorted(out.rejected.items()))
    return out


def _index_records(manifest: Manifest, scratch: Path) -> Iterator[list[SampleRecord]]:
    """The records of each shard's index file, in manifest order.

    In object storage each index is streamed to ``scratch``, parsed and deleted (not kept, as the loaders'
    per-process copies are: at ~63 B an indexed sample, 10^9 samples take ~60 GB), ``FETCH_AHEAD`` at a time.
    """
    indexes = [manifest.index_url(shard) for shard in manifest.shards]
    if not storage.is_url(manifest.root):
        yield from map(read_index, indexes)
        return

    def fetch(k: int) -> list[SampleRecord]:
        local = storage.download(indexes[k], scratch / f"{k}-{storage.name(indexes[k])}")
        try:
            return read_index(local)
        finally:
            local.unlink()

    yield from storage.map_ahead(fetch, range(len(indexes)), FETCH_AHEAD, "stats-fetch")


def format_summary(s: ShardSummary) -> str:
    """A plain-text report (one fact a line, then the histogram with bars)."""
    lines = [f"shards            {s.shards}", f"samples           {s.samples}",
             f"bytes             {s.bytes} ({s.bytes / 2**20:.1f} MiB, {s.bytes / max(s.samples, 1) / 1024:.1f} KiB/sample)",
             f"samples per shard {s.samples_per_shard[0]}..{s.samples_per_shard[1]}"]
    if s.inputs:
        lines.append(f"inputs            {s.inputs} ({s.samples / s.inputs:.1%} accepted)")
    if s.classes:
        lines.append(f"classes           {s.classes}")
    lines.append("rejected          " + (", ".join(f"{k} {v}" for k, v in s.rejected.items()) or "none"))
    lines.append("JPEG size histogram:")
    peak = max(s.size_histogram.values(), default=1)
    for low, count in s.size_histogram.items():
        lines.append(f"  {_kib(low):>9} - {_kib(2 * low):<9} {count:>8}  {'#' * max(1, round(40 * count / peak))}")
    return "\n".join(lines)


def _kib(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n // 1024} KiB"
