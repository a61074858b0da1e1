"""Read the records of an offline W&B run file (``wandb/offline-run-*/run-<id>.wandb``) without a network.

The file is a LevelDB-style log: a 7-byte W&B header, then 32 KiB blocks of records, each with a 7-byte header
(crc32, length, type) and FULL / FIRST / MIDDLE / LAST chunks, whose payloads are protobuf ``Record`` messages
(``wandb.proto.wandb_internal_pb2``). wandb's Python package no longer ships a reader for it (its Go core writes and
syncs it), so this is one: used to resume from a checkpoint artifact an offline run logged, and by the tests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def record_payloads(data: bytes) -> Iterator[bytes]:
    """The serialised records in the bytes of a ``.wandb`` file, in write order."""
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + HEADER])
        payload = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if rtype == FULL:
            yield payload
        elif rtype == FIRST:
            pending = payload
        elif rtype == MIDDLE:
            pending += payload
        elif rtype == LAST:
            yield pending + payload
        elif rtype == 0:  # zero padding up to the end of the block
            pos += left - HEADER - length


def read_records(path: str | Path) -> Iterator:
    """The ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    for payload in record_payloads(Path(path).read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def offline_run_files(wandb_dir: str | Path) -> list[Path]:
    """The ``run-*.wandb`` files of the offline runs under ``wandb_dir`` (a run's ``wandb/`` folder), oldest first."""
    return sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"), key=lambda p: p.stat().st_mtime)
