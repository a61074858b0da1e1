"""Read an offline W&B run file (``run-<id>.wandb``) without a network: config and history records.

The file is a LevelDB-style log (7-byte W&B header, 32 KiB blocks, records with a 7-byte header
crc32/length/type and FULL/FIRST/MIDDLE/LAST chunks) of protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(data: bytes) -> list[bytes]:
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if rtype == FULL:
            out.append(payload)
        elif rtype == FIRST:
            pending = payload
        elif rtype == MIDDLE:
            pending += payload
        elif rtype == LAST:
            out.append(pending + payload)
        elif rtype == 0:
            pos += left - 7 - length
    return out


def read_offline_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """Return (config, history rows) of the offline run in ``run_dir`` (the ``offline-run-*`` folder)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = list(Path(run_dir).glob("run-*.wandb"))
    config, history = {}, []
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            for item in record.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            history.append(row)
    return config, history
