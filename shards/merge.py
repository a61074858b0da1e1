"""`shards merge-manifests`: join the parts of a `--part i/n` build into one manifest, removing cross-part duplicates.

Each part deduplicates within itself only (its machine never sees the other parts). The merge walks the parts
in order with one set of content hashes (read from the stats files, no image is decoded) and rewrites only the
shard groups that hold an image already kept by an earlier part: the duplicate becomes a ``duplicate``
rejection exactly as a whole run would have recorded it, so the joined parts equal one whole run, shard for
shard and byte for byte. The set costs ~90 bytes per image (~90 GB at 1B images); past one machine's memory,
split the hash space by prefix (hash[0] % m) over m merge jobs, since a duplicate pair always shares a prefix.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from shards.groups import (
    GroupWriter,
    read_group_stats,
    remove_group_files,
    shard_entries,
    stats_name,
    stats_payload,
    write_group_stats,
)
from shards.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardEntry, write_json_atomic
from shards.writer import read_index

# Manifest options that differ between parts by design.
_PER_PART = ("part", "groups", "inputs", "rejected", "pillow")


def find_part_manifests(paths: list[str]) -> list[Path]:
    """Part manifest files from files or directories (``manifest.part-*.json`` inside a directory)."""
    found: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            parts = sorted(path.glob("manifest.part-*.json"))
            if not parts:
                raise ManifestError(f"no part manifest (manifest.part-*.json) in {path}")
            found.extend(parts)
        else:
            raise ManifestError(f"part not found: {path}")
    return list(dict.fromkeys(p.resolve() for p in found))


def merge_manifests(paths: list[str], out_dir: str | os.PathLike) -> Manifest:
    """Check that the parts form one complete run, remove cross-part duplicates, write ``out_dir/manifest.json``.

    Args:
        paths: part directories or part manifest files.
        out_dir: where the joined manifest goes; shard paths in it are relative to it.

    Raises:
        ManifestError: a missing, repeated or inconsistent part (one-line message naming it).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for path in find_part_manifests(paths):
        try:
            raw = json.loads(path.read_text())
            part = raw["options"]["part"]
        except (OSError, ValueError, KeyError) as exc:
            raise ManifestError(f"{path} is not a part manifest ({exc})") from None
        i, n = (int(x) for x in part.split("/"))
        parts.append((i, n, path, raw))
    parts.sort(key=lambda p: p[0])
    n = parts[0][1]
    if any(p[1] != n for p in parts) or [p[0] for p in parts] != list(range(n)):
        have = ", ".join(f"{p[0]}/{p[1]}" for p in parts)
        raise ManifestError(f"parts do not form one complete run of {n}: have {have}")
    first = parts[0][3]
    common = {k: v for k, v in first["options"].items() if k not in _PER_PART}
    for i, _n, path, raw in parts:
        mine = {k: v for k, v in raw["options"].items() if k not in _PER_PART}
        if mine != common or raw.get("classes") != first.get("classes") or raw.get("prefix") != first.get("prefix"):
            raise ManifestError(f"{path} (part {i}) was built with other options or classes than part 0")
        if i and raw["options"]["groups"][0] != parts[i - 1][3]["options"]["groups"][1]:
            raise ManifestError(f"{path}: part {i} does not start where part {i - 1} ends")

    prefix = first["prefix"]
    seen: set[str] = set()
    entries: list[ShardEntry] = []
    rejected: dict[str, int] = {}
    inputs = 0
    for _i, _n, path, raw in parts:
        root = path.parent
        for g in range(*raw["options"]["groups"]):
            stats = read_group_stats(root, prefix, g)
            if stats is None:
                raise ManifestError(f"{root / stats_name(prefix, g)}: group {g} is missing or incomplete; rerun its part")
            if any(h in seen for h in stats["hashes"]):
                stats = _drop_duplicates(root, prefix, g, stats, seen)
            seen.update(stats["hashes"])
            inputs += stats["inputs"]
            for reason, count in stats["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + count
            for e in shard_entries(stats, prefix, g):
                rel = {k: os.path.relpath(root / getattr(e, k), out) for k in ("tar", "index", "stats")}
                entries.append(ShardEntry(**{**asdict(e), **rel}))
    options = {**common, "inputs": inputs, "groups": [parts[0][3]["options"]["groups"][0],
                                                      parts[-1][3]["options"]["groups"][1]],
               "rejected": dict(sorted(rejected.items())), "pillow": first["options"].get("pillow")}
    manifest = Manifest(shards=entries, prefix=prefix, options=options, classes=first.get("classes"), root=out)
    if not entries:
        raise ManifestError("the parts hold no accepted sample")
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return manifest


def _drop_duplicates(root: Path, prefix: str, g: int, stats: dict[str, Any], seen: set[str]) -> dict[str, Any]:
    """Rewrite group ``g`` without the samples whose hash an earlier part kept; return its new stats."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    for shard in stats["shards"]:
        with open(root / shard["tar"], "rb") as fh:
            for rec in read_index(root / shard["index"]):
                files = {}
                for ext, offset, size, _name in rec.files:
                    fh.seek(offset)
                    files[ext] = fh.read(size)
                samples.append((rec.key, files))
    if len(samples) != len(stats["hashes"]):
        raise ManifestError(f"{root / stats_name(prefix, g)}: lists {len(stats['hashes'])} hashes for {len(samples)} samples")
    rejections = list(stats["rejections"])
    kept, hashes = [], []
    for (key, files), h in zip(samples, stats["hashes"]):
        if h in seen:
            source = json.loads(files["json"])["source"]
            rejections.append({"index": int(key), "source": source, "reason": "duplicate",
                               "detail": f"hash {h} seen earlier"})
        else:
            kept.append((key, files))
            hashes.append(h)
    remove_group_files(root, prefix, g)
    writer = GroupWriter(root, prefix, g, stats["options"]["max_shard_bytes"])
    for key, files in kept:
        writer.write(key, files)
    entries = writer.close(stats_name(prefix, g))
    new = stats_payload(g, stats["first_input"], stats["inputs"], stats["input_digest"], stats["options"], entries,
                        hashes, rejections)
    write_group_stats(root, prefix, g, new)
    return new
