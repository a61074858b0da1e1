"""What a sample carries besides its JPEG: the build's facts, the input's own metadata, its caption and label.

An output sample is ``<key>.jpg``, ``<key>.json`` and, when there is one, ``<key>.cls`` and ``<key>.txt``.

* ``.json`` is one object: the input's metadata (the other columns of a table row, or the fields of the
  ``.json`` next to the image in an input tar, e.g. img2dataset's ``url``, ``caption``, ``exif``) with the
  build's facts on top (``key``, ``source``, ``width`` / ``height`` of the stored JPEG, ``orig_width``,
  ``orig_height``, ``format``, ``mode``, ``frames``, ``hash``, ``class``). The facts describe the stored
  image, which ``verify`` and the loaders rely on, so they win a name clash; the input's value is kept under
  ``input_<name>`` (img2dataset's ``key``, ``width``, ``height`` become ``input_key``, ``input_width``,
  ``input_height``). An input ``.json`` that is not a JSON object is kept as text under ``input_json``.
* ``.txt`` (img2dataset's caption) is the input tar's ``.txt``, byte for byte.
* ``.cls`` is the class index from ``--labels-from-folders``, else the input tar's ``.cls`` byte for byte; when
  both exist, the input's value goes to ``input_cls`` in the ``.json``.

Values become JSON on the way: non-finite floats become null, dates and times ISO 8601 text, decimals text,
bytes UTF-8 text (base64 when they are not UTF-8), anything else its ``str``.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
from typing import Any

CARRIED = ("cls", "json", "txt")  # the companions of an input tar's image that its output sample keeps


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types (see the module docstring for the conversions)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()  # datetime is a date
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)  # exact, unlike a float
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return base64.b64encode(raw).decode("ascii")
    return str(value)


def sample_files(jpeg: bytes, facts: dict[str, Any], label: str | None, label_index: dict[str, int],
                 columns: dict[str, Any] | None, companions: dict[str, bytes]) -> dict[str, bytes]:
    """The files of one output sample (extension -> bytes, in the order they are written).

    Args:
        jpeg: the re-encoded image.
        facts: what the build knows about the stored image (key, source, sizes, hash ...).
        label: the class folder name (``--labels-from-folders``), or None.
        label_index: class folder name -> class index.
        columns: the other columns of the input's table row, or None.
        companions: the carried members of the input tar (extension in CARRIED -> bytes).
    """
    meta: dict[str, Any] = {}
    raw_json = companions.get("json")
    if raw_json is not None:
        try:
            parsed = json.loads(raw_json)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            meta.update(parsed)
        else:
            meta["input_json"] = raw_json.decode("utf-8", "replace")
    if columns:
        meta.update(columns)
    files = {"jpg": jpeg}
    own = dict(facts)
    if label is not None:
        own["class"] = label
        files["cls"] = str(label_index[label]).encode()
        if "cls" in companions:
            own["input_cls"] = companions["cls"].decode("utf-8", "replace").strip()
    elif "cls" in companions:
        files["cls"] = companions["cls"]
    for name, value in own.items():
        if name in meta:
            _keep_as_input(meta, name)
        meta[name] = value
    files["json"] = json.dumps(json_safe(meta), sort_keys=True, separators=(",", ":")).encode()
    if "txt" in companions:
        files["txt"] = companions["txt"]
    return files


def _keep_as_input(meta: dict[str, Any], name: str) -> None:
    """Move ``meta[name]`` to ``input_<name>`` (``input_input_<name>`` ... if that is taken too)."""
    moved = f"input_{name}"
    while moved in meta:
        moved = f"input_{moved}"
    meta[moved] = meta.pop(name)
