"""Unreadable-sample bookkeeping shared by the backends: locations, decode checks, filtered DALI indexes."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path

from PIL import Image

from shards.writer import read_index, write_index


def location(tar: str | os.PathLike, offset: int, name: str) -> str:
    """A sample's location in DALI's ``source_info`` form: ``<tar path>:<data offset>:<member name>``."""
    return f"{tar}:{offset}:{name}"


def parse_location(loc: str) -> tuple[str, int, str]:
    """Split ``path:offset:name`` (the path may itself contain ':')."""
    path, offset, name = loc.rsplit(":", 2)
    return path, int(offset), name


def decodes(data: bytes) -> bool:
    """True when ``data`` decodes completely to an RGB image (PIL raises on truncated and garbled JPEGs)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.convert("RGB").load()
        return True
    except Exception:  # noqa: BLE001 - any decoder failure means the sample is unusable
        return False


class BadSampleLog:
    """Counts unreadable samples and remembers where they are, in the order found (deduplicated).

    A sample that cannot be read is a location (``<tar>:<offset>:<member>``); a shard that cannot be read at
    all is an entry of ``dropped`` (tar path -> the samples the manifest gives it), counted in ``count``.
    """

    def __init__(self, locations: list[str] | None = None, bad_batches: int = 0,
                 dropped: dict[str, int] | None = None):
        self.locations: list[str] = list(locations or [])
        self._known = set(self.locations)
        self.bad_batches = bad_batches  # batches lost to decode failures (DALI loses a whole batch per failure)
        self.dropped: dict[str, int] = dict(dropped or {})

    def add(self, loc: str) -> bool:
        """Record ``loc``; False if it was already known."""
        if loc in self._known:
            return False
        self._known.add(loc)
        self.locations.append(loc)
        return True

    def drop(self, tar: str, samples: int) -> bool:
        """Record that the shard ``tar`` (``samples`` samples) cannot be read; False if it was already known."""
        if tar in self.dropped:
            return False
        self.dropped[tar] = samples
        return True

    @property
    def count(self) -> int:
        """Samples lost: the unreadable ones plus every sample of the dropped shards."""
        return len(self.locations) + sum(self.dropped.values())

    def names_by_tar(self) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for loc in self.locations:
            tar, _, name = parse_location(loc)
            out.setdefault(tar, set()).add(name)
        return out


def filtered_index(index_path: str | os.PathLike, drop_names: set[str], out_dir: Path) -> Path:
    """Write a copy of a DALI index without the samples that own any of ``drop_names``.

    DALI reads a sample at the offsets its index lists, so a sample missing from the index is never read:
    this is how a known-bad sample is excluded without rewriting the (possibly huge, read-only) shard.

    The name is derived from ``drop_names``, and the file is written under a temporary name and renamed: the
    DALI loader builds the next pass's pipeline in a background thread, which may write the same filtered
    index while the loader's thread writes or reads it, and must never see a half-written one.
    """
    records = [r for r in read_index(index_path) if not any(f[3] in drop_names for f in r.files)]
    if not records:
        raise RuntimeError(f"every sample of {index_path} is corrupt")
    digest = hashlib.blake2b("\n".join(sorted(drop_names)).encode(), digest_size=6).hexdigest()
    out = out_dir / f"{Path(index_path).stem}.{len(drop_names)}-{digest}.idx"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    write_index(tmp, records)
    os.replace(tmp, out)
    return out
