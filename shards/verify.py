"""`shards verify`: every shard opens, its index matches the tar, every image decodes (Pillow, then DALI).

Three passes, cheapest first, so a failure names the file and the byte offset: (1) the manifest's files exist,
each index parses, its data lie inside the tar (else: truncated, and how many samples are lost), a valid tar
header giving the indexed size sits before every member's data (else: a corrupt header, or an index that is
not this tar's), and the index lists exactly the tar's members; (2) every sample has its components, its JPEG
decodes strictly with Pillow to the size its JSON records, its class index is in range; (3) DALI's
``fn.readers.webdataset`` with the written index files and the CPU JPEG decoder reads every sample once.
The damage kinds are those the training loaders skip (``shards.check``); verify names every instance.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from shards import storage
from shards.check import ShardCheck, check_shard
from shards.manifest import Manifest, ManifestError, ShardEntry, read_manifest
from shards.writer import read_index

DALI_GROUP_SHARDS = 256  # shards per DALI reader in the DALI pass (a reader keeps each of its tars open)
DALI_GROUP_BYTES = 2 << 30  # in object storage: local copies kept for one DALI group (at least one shard)


@dataclass
class VerifyReport:
    """What verify checked and every problem it found (empty ``errors`` means the shards are good)."""

    shards: int = 0
    samples: int = 0
    dali_samples: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def verify_shards(path: str | os.PathLike, dali: bool = True, max_errors: int = 50) -> VerifyReport:
    """Check the shard set at ``path`` (manifest.json or its directory, local or in object storage).

    In object storage (``s3://bucket/shards``) the manifest's files are found with one listing, and each shard's
    tar and index are streamed to a scratch folder (the next shard's while this one is checked) and checked
    there exactly as local files are, then deleted: one GET per file. The DALI pass reads a group of checked
    shards at a time (``DALI_GROUP_SHARDS``; one reader over all of them would hold every tar open), in object
    storage their local copies (at most ``DALI_GROUP_BYTES`` of them, and never by DALI's one GET per sample).

    Args:
        path: the manifest or its directory.
        dali: also read everything through a DALI CPU pipeline (needs nvidia-dali).
        max_errors: stop collecting after this many problems.

    Returns:
        A VerifyReport; a missing manifest / shard / index is an error in it, not an exception.
    """
    report = VerifyReport()
    try:
        manifest = read_manifest(path, check_files=False)
    except ManifestError as exc:
        report.errors.append(str(exc))
        return report
    num_classes = len(manifest.classes) if manifest.classes else 0
    remote = storage.is_url(manifest.root)
    group: list[tuple[ShardEntry, Path, Path]] = []  # checked shards waiting for the DALI pass

    def finish(shards: list[tuple[ShardEntry, Path, Path]]) -> None:
        if dali and shards and not report.errors:
            _dali_pass(manifest, shards, report)
        if remote:  # the local copies are done with
            for _shard, tar_path, _idx_path in shards:
                shutil.rmtree(tar_path.parent, ignore_errors=True)
        shards.clear()

    with tempfile.TemporaryDirectory(prefix="moco-verify-") as scratch, \
            contextlib.closing(_shard_files(manifest, Path(scratch))) as shards:  # closed (fetch done) before rmtree
        for shard, tar_path, idx_path, missing in shards:
            report.shards += 1
            if missing:
                report.errors.extend(missing)
                continue
            report.errors.extend(_check_one_shard(shard, tar_path, idx_path, num_classes, report))
            group.append((shard, tar_path, idx_path))
            if report.errors or len(group) >= DALI_GROUP_SHARDS or (
                    remote and sum(s.bytes for s, _t, _i in group) >= DALI_GROUP_BYTES):
                finish(group)
            if len(report.errors) >= max_errors:
                return report
        finish(group)
    return report


def _dali_pass(manifest: Manifest, group: list[tuple[ShardEntry, Path, Path]], report: VerifyReport) -> None:
    """Read the shards of ``group`` (checked, at local paths) with DALI; count its samples into ``report``."""
    read, problem = dali_read([str(t) for _s, t, _i in group], [str(i) for _s, _t, i in group])
    report.dali_samples += read
    if storage.is_url(manifest.root):  # name the shards by their URLs, not by the local copies DALI read
        for shard, tar_path, idx_path in group:
            problem = problem.replace(str(tar_path), str(manifest.tar_path(shard)))
            problem = problem.replace(str(idx_path), str(manifest.index_url(shard)))
    expected = sum(shard.samples for shard, _t, _i in group)
    if problem:
        report.errors.append(problem)
    elif read != expected:
        first, last = storage.name(group[0][1]), storage.name(group[-1][1])
        where = first if first == last else f"{first} .. {last}"
        report.errors.append(f"DALI read {read} samples of {where}, the manifest lists {expected}")


def _shard_files(manifest: Manifest, scratch: Path) -> Iterator[tuple[ShardEntry, Path, Path, list[str]]]:
    """Each shard with local paths of its tar and index and what is missing of them (``<name>: missing ...``).

    Local shards are their own paths. In object storage the files present are listed once, and each shard's
    tar and index are downloaded into ``scratch`` one shard ahead (the download overlaps the checks).
    """
    remote = storage.is_url(manifest.root)
    present = {url for url, _size in storage.list_files(manifest.root)} if remote else None

    def fetch(k: int, shard: ShardEntry) -> tuple[ShardEntry, Path, Path, list[str]]:
        tar, idx = manifest.tar_path(shard), manifest.index_url(shard)
        kinds = {tar: "shard", idx: "index file"}
        missing = [p for p in (tar, idx) if not (p in present if remote else Path(p).is_file())]
        if not remote or missing:
            return shard, Path(tar), Path(idx), [f"{storage.name(p)}: missing {kinds[p]}" for p in missing]
        folder = scratch / str(k)  # removed by the caller once the shard's checks and DALI pass are done
        folder.mkdir(exist_ok=True)
        try:
            return shard, *(storage.download(p, folder / storage.name(p)) for p in (tar, idx)), []
        except FileNotFoundError:  # removed since the listing
            return shard, Path(tar), Path(idx), [f"{storage.name(tar)}: missing shard or index file"]

    if not remote:
        yield from (fetch(k, shard) for k, shard in enumerate(manifest.shards))
        return
    yield from storage.map_ahead(lambda item: fetch(*item), enumerate(manifest.shards), 1, "verify-fetch")


def _check_one_shard(shard: ShardEntry, tar_path: Path, idx_path: Path, num_classes: int,
                     report: VerifyReport) -> list[str]:
    """The problems of one shard whose tar and index are the local files ``tar_path``, ``idx_path``; counts its
    samples into ``report``."""
    check = check_shard(tar_path, idx_path, all_headers=True)
    if check.problem:  # the shard cannot be read at all: its samples are not looked at one by one
        return [f"{tar_path.name}: {check.problem}"]
    problems = _structure_problems(shard, tar_path, idx_path, check)
    size = tar_path.stat().st_size
    with open(tar_path, "rb") as fh:
        for rec in read_index(idx_path):
            if any(offset + length > size for _ext, offset, length, _name in rec.files):
                continue  # beyond the end of a truncated tar: reported once per shard
            report.samples += 1
            problem = _check_sample(fh, rec.files, num_classes)
            if problem:
                _ext, offset, _size, name = next((f for f in rec.files if f[0] == "jpg"), rec.files[0])
                problems.append(f"{tar_path.name}:{offset}:{name}: {problem}")
    return problems


def _structure_problems(shard: ShardEntry, tar_path: Path, idx_path: Path, check: ShardCheck) -> list[str]:
    """The damage of a readable shard's tar and index (``check``: its shard check), each problem naming the file
    and where in it."""
    problems = [f"{tar_path.name}: {check.note}"] if check.note else []
    problems += [f"{tar_path.name}: corrupt tar header at offset {h.offset} ({h.name}): {h.reason}"
                 for h in check.bad_headers]
    if problems:
        return problems  # the tarfile walk below would stop at the damage
    records = read_index(idx_path)
    size = tar_path.stat().st_size
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    except (OSError, tarfile.TarError) as exc:
        return [f"{tar_path.name}: not readable as a tar: {exc}"]
    indexed = [(name, offset, length) for rec in records for _ext, offset, length, name in rec.files]
    if indexed != members:
        first = next((i for i, (a, b) in enumerate(zip(indexed, members)) if a != b), min(len(indexed), len(members)))
        where = (members[first] if first < len(members) else indexed[first])[1] - tarfile.BLOCKSIZE
        problems.append(f"{idx_path.name}: index does not match the members of {tar_path.name} ({len(indexed)} "
                        f"indexed, {len(members)} in the tar; they differ from the header at offset {where})")
    elif len(records) != shard.samples or size != shard.bytes:
        problems.append(f"{tar_path.name}: manifest says {shard.samples} samples / {shard.bytes} bytes, "
                        f"found {len(records)} / {size}")
    return problems


def _check_sample(fh, files: tuple[tuple[str, int, int, str], ...], num_classes: int) -> str:
    data = {}
    for ext, offset, size, _name in files:
        fh.seek(offset)
        data[ext] = fh.read(size)
    if "jpg" not in data or "json" not in data:
        return f"missing component (has {sorted(data)})"
    try:
        meta = json.loads(data["json"])
    except ValueError as exc:
        return f"bad json: {exc}"
    try:
        image = Image.open(io.BytesIO(data["jpg"]))
        image.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is the finding
        return f"jpg does not decode: {exc}"
    if image.format != "JPEG" or image.mode != "RGB":
        return f"jpg is {image.format} {image.mode}, expected an RGB JPEG"
    if image.size != (meta.get("width"), meta.get("height")):
        return f"jpg is {image.size[0]}x{image.size[1]}, json says {meta.get('width')}x{meta.get('height')}"
    if num_classes:
        cls = data.get("cls", b"").decode(errors="replace")
        if not cls.isdigit() or int(cls) >= num_classes:
            return f"class index {cls!r} not in 0..{num_classes - 1}"
    return ""


def dali_read(tars: list[str], idxs: list[str], batch_size: int = 16, num_threads: int = 2) -> tuple[int, str]:
    """Read every sample of the shards ``tars`` with DALI's webdataset reader (their written index files
    ``idxs``) and CPU JPEG decoder.

    Returns:
        (samples decoded whose shape matches their JSON, error message or '').
    """
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None, prefetch_queue_depth=1)
    def read_pipe():
        jpg, meta = fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "json"], name="reader",
                                          missing_component_behavior="error", random_shuffle=False)
        return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), meta

    try:
        pipe = read_pipe()
        pipe.build()
        total = pipe.epoch_size("reader")
        read = 0
        while read < total:
            images, metas = pipe.run()
            for i in range(min(len(images), total - read)):
                shape = images.at(i).shape
                meta = json.loads(bytes(metas.at(i)))
                if shape != (meta["height"], meta["width"], 3):
                    return read, f"DALI decoded {meta['key']} as {shape}, json says {meta['height']}x{meta['width']}x3"
                read += 1
    except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError with its own message for bad data
        return 0, f"DALI failed to read the shards: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}"
    return read, ""
