"""`shards merge-manifests`: join the parts of a `--part i/n` build into one shard set with contiguous names.

Each part deduplicates within itself only (its machine never sees the other parts). The merge

1. finds the cross-part duplicates from the 16-byte digests in the stats files (no image is decoded): parts
   in order, groups in order, the first occurrence wins. One process holds the digests of one hash-prefix
   slice (``shards.digests.prefix_slice``) in a ``DigestSet`` (< 20 bytes per digest): ``--hash-prefix k/m``
   computes slice k only and writes ``duplicates-kkkk-of-mmmm.json`` into ``--out``, so m machines (or m
   runs) share a corpus too big for one; a duplicate pair always lands in the same slice, so the union of
   the slices is exact. Without the option the merge computes the single slice 0/1 itself, unless a complete
   set of slice files for these parts is already in ``--out``;
2. rewrites only the groups that hold a duplicate (new shard files, then the stats file, then the old files
   go): the duplicate becomes a ``duplicate`` rejection exactly as a whole run would have recorded it;
3. renames every part's shards, in part and group order, to ``<prefix>-000000.tar`` ... in ``--out``, so one
   brace pattern (recorded in the manifest) covers every shard, and writes ``manifest.json`` last.

Every step can be rerun after an interruption: rewritten groups no longer hold their duplicates, a shard
already renamed is recognised at its new name by its size, and a finished merge of the same parts returns its
manifest. After the merge the part folders belong to the merged set (their shards moved); the part manifests
and stats files stay, and the merged manifest points at the stats files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shards import storage
from shards.digests import DIGEST_SIZE, DigestSet, decode_digests, encode_digests, prefix_slice
from shards.groups import GroupWriter, namespace, stats_name, stats_payload, with_added_options, write_group_stats
from shards.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardEntry, read_manifest, write_json_atomic
from shards.writer import Framed, read_index

_SCAN_BATCH = 2048  # digests per DigestSet call in the scan

# Manifest options that differ between parts by design.
_PER_PART = ("part", "groups", "inputs", "rejected", "pillow")


@dataclass(frozen=True)
class _Part:
    index: int
    count: int
    manifest: Path
    raw: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.manifest.parent

    @property
    def ns(self) -> str:
        return namespace(self.raw["prefix"], (self.index, self.count))

    @property
    def groups(self) -> int:
        return int(self.raw["options"]["groups"])

    def stats_path(self, group: int) -> Path:
        return self.root / stats_name(self.ns, group)

    def stats(self, group: int) -> dict[str, Any]:
        path = self.stats_path(group)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            raise ManifestError(f"{path}: group {group} of part {self.index} is missing or unreadable; "
                                "rerun its part") from None


def find_part_manifests(paths: list[str]) -> list[Path]:
    """Part manifest files from files or directories (``manifest.part-*.json`` inside a directory)."""
    found: list[Path] = []
    for item in paths:
        _local(item)
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


def _local(path: str | os.PathLike) -> None:
    if storage.is_url(path) or storage.looks_mangled(path):
        raise ManifestError(f"merge-manifests renames shards, so parts and --out must be local or mounted folders, "
                            f"not {path}")


def find_duplicates(paths: list[str], out_dir: str | os.PathLike, hash_slice: tuple[int, int]) -> dict[str, Any]:
    """Compute the cross-part duplicates of one hash-prefix slice; write them to ``out_dir`` for the merge.

    Args:
        paths: part directories or part manifest files.
        out_dir: the merge's output directory (receives ``duplicates-kkkk-of-mmmm.json``).
        hash_slice: ``(k, m)``: digests whose first 4 bytes fall in the k-th of m equal ranges.

    Returns:
        The slice file's content (``digests``: how many this slice held, ``duplicates``: "part/group" -> hex list).
    """
    k, m = hash_slice
    if not (m >= 1 and 0 <= k < m):
        raise ManifestError(f"--hash-prefix must be k/m with 0 <= k < m, got {k}/{m}")
    parts = _load_parts(paths)
    _local(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    held, duplicates = _scan(parts, hash_slice)
    payload = {"fingerprint": _fingerprint(parts), "slice": [k, m], "digests": held, "duplicates": duplicates}
    write_json_atomic(out / f"duplicates-{k:04d}-of-{m:04d}.json", payload)
    return payload


def merge_manifests(paths: list[str], out_dir: str | os.PathLike) -> Manifest:
    """Check that the parts form one complete run, remove cross-part duplicates, rename, write the manifest.

    Args:
        paths: part directories or part manifest files.
        out_dir: where the shards move to and ``manifest.json`` goes (same filesystem as the parts).

    Raises:
        ManifestError: a missing, repeated or inconsistent part, or an incomplete set of slice files (one line).
    """
    parts = _load_parts(paths)
    fingerprint = _fingerprint(parts)
    _local(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = _existing_merge(out, fingerprint)
    if done is not None:
        return done
    duplicates = _slice_files(out, fingerprint)
    if duplicates is None:
        duplicates = _scan(parts, (0, 1))[1]
    for key, hexes in duplicates.items():
        i, g = (int(x) for x in key.split("/"))
        _drop_duplicates(parts[i], g, {bytes.fromhex(h) for h in hexes})

    plan: list[tuple[_Part, int, dict[str, Any]]] = []  # (part, group, shard) in final order
    inputs, rejected = 0, {}
    for part in parts:
        for g in range(part.groups):
            stats = part.stats(g)
            inputs += stats["inputs"]
            for reason, count in stats["rejected"].items():
                rejected[reason] = rejected.get(reason, 0) + count
            plan.extend((part, g, shard) for shard in stats["shards"])
    if not plan:
        raise ManifestError("the parts hold no accepted sample")
    width = max(6, len(str(len(plan) - 1)))
    prefix = parts[0].raw["prefix"]
    entries = []
    for seq, (part, g, shard) in enumerate(plan):
        stem = f"{prefix}-{seq:0{width}d}"
        _move(part.root / shard["index"], out / f"{stem}.idx", None)
        _move(part.root / shard["tar"], out / f"{stem}.tar", shard["bytes"])
        entries.append(ShardEntry(tar=f"{stem}.tar", index=f"{stem}.idx", samples=shard["samples"],
                                  bytes=shard["bytes"], max_sample_bytes=shard["max_sample_bytes"],
                                  stats=os.path.relpath(part.stats_path(g), out)))
    _remove_leftovers(parts)

    first = parts[0].raw
    common = {k: v for k, v in first["options"].items() if k not in _PER_PART}
    options = {**common, "inputs": inputs, "groups": sum(p.groups for p in parts),
               "rejected": dict(sorted(rejected.items())), "pillow": first["options"].get("pillow"),
               "parts": len(parts), "fingerprint": fingerprint}
    manifest = Manifest(shards=entries, prefix=prefix, options=options, classes=first.get("classes"), root=out)
    write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return manifest


def _load_parts(paths: list[str]) -> list[_Part]:
    parts = []
    for path in find_part_manifests(paths):
        try:
            raw = json.loads(path.read_text())
            i, n = (int(x) for x in raw["options"]["part"].split("/"))
            int(raw["options"]["groups"])
            raw["options"] = with_added_options(raw["options"])  # a part of an older release merges with newer ones
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ManifestError(f"{path} is not a part manifest of this version ({exc})") from None
        parts.append(_Part(i, n, path, raw))
    parts.sort(key=lambda p: p.index)
    n = parts[0].count
    if any(p.count != n for p in parts) or [p.index for p in parts] != list(range(n)):
        have = ", ".join(f"{p.index}/{p.count}" for p in parts)
        raise ManifestError(f"parts do not form one complete run of {n}: have {have}")
    first = parts[0].raw
    common = {k: v for k, v in first["options"].items() if k not in _PER_PART}
    for p in parts:
        mine = {k: v for k, v in p.raw["options"].items() if k not in _PER_PART}
        if mine != common or p.raw.get("classes") != first.get("classes") or p.raw.get("prefix") != first["prefix"]:
            raise ManifestError(f"{p.manifest} (part {p.index}) was built with other options or classes than part 0")
    return parts


def _fingerprint(parts: list[_Part]) -> str:
    """Identifies this set of part manifests (the merge never rewrites them)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.manifest.read_bytes())
    return h.hexdigest()


def _scan(parts: list[_Part], hash_slice: tuple[int, int]) -> tuple[int, dict[str, list[str]]]:
    """(digests in the slice, {"part/group": hex digests an earlier group already holds})."""
    seen = DigestSet()
    duplicates: dict[str, list[str]] = {}
    for part in parts:
        for g in range(part.groups):
            try:
                raw = decode_digests(part.stats(g)["digests"])
            except (KeyError, ValueError) as exc:
                raise ManifestError(f"{part.stats_path(g)}: bad digests ({exc})") from None
            mine = np.frombuffer(raw, np.dtype((np.void, DIGEST_SIZE)))[prefix_slice(raw, hash_slice)].tobytes()
            del raw
            again = []
            for at in range(0, len(mine), _SCAN_BATCH * DIGEST_SIZE):  # bounds the set's buffer and temporaries
                chunk = mine[at:at + _SCAN_BATCH * DIGEST_SIZE]
                again += [chunk[j * DIGEST_SIZE:(j + 1) * DIGEST_SIZE].hex()
                          for j in np.flatnonzero(seen.add_many(chunk)).tolist()]
            if again:
                duplicates[f"{part.index}/{g}"] = again
    return len(seen), duplicates


def _slice_files(out: Path, fingerprint: str) -> dict[str, list[str]] | None:
    """The union of a complete set of slice files for these parts, None when there is none."""
    by_count: dict[int, dict[int, dict[str, Any]]] = {}
    for path in sorted(out.glob("duplicates-*-of-*.json")):
        try:
            raw = json.loads(path.read_text())
            k, m = raw["slice"]
        except (OSError, ValueError, KeyError, TypeError):
            raise ManifestError(f"{path} is not a duplicates slice file; remove it") from None
        if raw.get("fingerprint") == fingerprint:
            by_count.setdefault(m, {})[k] = raw
    for m, slices in sorted(by_count.items()):
        if len(slices) == m:
            union: dict[str, list[str]] = {}
            for k in range(m):
                for key, hexes in slices[k]["duplicates"].items():
                    union.setdefault(key, []).extend(hexes)
            print(f"merge: duplicates from {m} hash-prefix slices", file=sys.stderr)
            return union
    if by_count:
        m, slices = max(by_count.items(), key=lambda kv: len(kv[1]))
        missing = ", ".join(str(k) for k in range(m) if k not in slices)
        raise ManifestError(f"{out} holds {len(slices)} of {m} duplicate slices for these parts; run "
                            f"merge-manifests --hash-prefix K/{m} for K = {missing} first")
    return None


def _existing_merge(out: Path, fingerprint: str) -> Manifest | None:
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None

    manifest = read_manifest(path, check_files=False)
    if manifest.options.get("fingerprint") == fingerprint:
        return manifest
    what = "another merged set" if "parts" in manifest.options else "a whole build"
    raise ManifestError(f"{path} already holds {what}; merge into another --out")


def _move(src: Path, dst: Path, size: int | None) -> None:
    """Rename ``src`` to ``dst``; a missing ``src`` is fine when ``dst`` (of ``size`` bytes) is already there."""
    try:
        os.replace(src, dst)
        return
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise ManifestError(f"cannot move {src} to {dst}: another filesystem; merge into an --out on the "
                                "parts' filesystem") from None
        raise ManifestError(f"cannot move {src} to {dst}: {exc.strerror or exc}") from None
    if not dst.is_file() or (size is not None and dst.stat().st_size != size):
        raise ManifestError(f"missing shard: {src} (and no {dst.name} of {size} bytes in {dst.parent})")


def _remove_leftovers(parts: list[_Part]) -> None:
    """Delete part shard files nothing points at any more (old files of a rewrite interrupted after its commit)."""
    by_root: dict[Path, list[str]] = {}
    for part in parts:
        by_root.setdefault(part.root, []).append(re.escape(part.ns))
    for root, names in by_root.items():  # one pass over each folder, however many parts share it
        pattern = re.compile(rf"(?:{'|'.join(names)})-(\d{{6,}}|g\d{{6,}}-r\d+-\d+)\.(tar|idx)")
        for path in root.iterdir():
            if pattern.fullmatch(path.name):
                path.unlink(missing_ok=True)


def _drop_duplicates(part: _Part, g: int, drop: set[bytes]) -> None:
    """Rewrite group ``g`` of ``part`` without the samples whose digest is in ``drop`` (a no-op once done)."""
    stats = part.stats(g)
    digests = decode_digests(stats["digests"])
    if not any(digests[j:j + DIGEST_SIZE] in drop for j in range(0, len(digests), DIGEST_SIZE)):
        return  # already rewritten by an earlier run of the merge
    rewrite = stats.get("rewrites", 0) + 1
    name = stats_name(part.ns, g)
    writer = GroupWriter(part.root, lambda k: f"{part.ns}-g{g:06d}-r{rewrite}-{k}", stats["options"]["max_shard_bytes"])
    rejections = list(stats["rejections"])
    kept: list[bytes] = []
    at = 0
    try:
        for shard in stats["shards"]:
            with open(part.root / shard["tar"], "rb") as fh:
                for rec in read_index(part.root / shard["index"]):
                    digest = digests[at:at + DIGEST_SIZE]
                    at += DIGEST_SIZE
                    start = rec.files[0][1] - 512  # our members have one 512-byte header each
                    end = rec.files[-1][1] + -(-rec.files[-1][2] // 512) * 512
                    fh.seek(start)
                    data = fh.read(end - start)
                    if digest in drop:
                        meta = next(data[o - start:o - start + n] for e, o, n, _ in rec.files if e == "json")
                        rejections.append({"index": int(rec.key.rsplit("-", 1)[-1]),
                                           "source": json.loads(meta)["source"], "reason": "duplicate",
                                           "detail": f"hash {digest.hex()} seen earlier"})
                        continue
                    members = tuple((e, o - start, n, m) for e, o, n, m in rec.files)
                    writer.write(rec.key, Framed(data, members, sum(n for _, _, n, _ in rec.files)))
                    kept.append(digest)
        if at != len(digests):
            raise ManifestError(f"{part.stats_path(g)}: lists {len(digests) // DIGEST_SIZE} digests for "
                                f"{at // DIGEST_SIZE} samples")
        entries = writer.close(name)
    except BaseException:
        writer.abort()
        raise
    new = stats_payload(g, stats["first_input"], stats["inputs"], stats["input_digest"], stats["options"], entries,
                        encode_digests(b"".join(kept)), rejections)
    write_group_stats(part.root, part.ns, g, {**new, "rewrites": rewrite})
    for shard in stats["shards"]:
        (part.root / shard["tar"]).unlink(missing_ok=True)
        (part.root / shard["index"]).unlink(missing_ok=True)
