"""Stream the rows of a CSV / TSV or parquet table of image paths: the path column and every other column.

A table input names one image (a local path, relative to the table's folder, or an ``s3://`` / ``gs://`` URL)
per row in its path column; the row's other columns (caption, labels, ids) travel with the image into its
sample's ``.json``. The path column is ``--path-column``, or by default the first column named ``path`` or
``url`` (img2dataset's default name).

Nothing is read whole, so a billion-row table costs a part the same memory as a small one:

* CSV (``.csv``, comma) and TSV (``.tsv``, tab) are read with the ``csv`` module, one line at a time after a
  header row. Values are the strings as written (no type guessing). Part ``i/n`` takes the rows that START in
  bytes ``[h + i*B//n, h + (i+1)*B//n)`` of the B bytes after the header (h bytes), as for list files: one
  seek, then about B/n bytes. A quoted field may hold a newline in a whole build; split into parts, every row
  must be one line (a row that spans lines stops the part with an error, since a part that seeks into the
  middle of such a row cannot tell its continuation from a row).
* parquet (``.parquet``) is read with pyarrow, record batch by record batch, only the row groups that hold the
  part's rows: part ``i/n`` of a table of R rows takes rows ``[i*R//n, (i+1)*R//n)`` (the row counts come
  from the footer), so parts are balanced even when the table is one row group. Values keep their types;
  ``shards.metadata`` makes them JSON (NaN to null, timestamps to ISO 8601).
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Iterator
from typing import Any, NamedTuple

from shards import storage

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet")
DEFAULT_PATH_COLUMNS = ("path", "url")
_BATCH_ROWS = 4096  # parquet rows decoded at a time: small next to any row group, large enough to amortise calls
_HEAD_BYTES = 1 << 16  # largest request of the checks before a build (they start at 4 KiB): not a read-ahead block


class TableError(ValueError):
    """A table that cannot be used (no such column, unreadable header, a multi-line row in a part); one line."""


class Row(NamedTuple):
    """One table row: where it is (``table#row`` or ``table@byte``), its path cell, its other columns, or why not."""

    where: str
    path: Any
    columns: dict[str, Any]
    error: str = ""


def is_table(path: str) -> bool:
    return path.lower().endswith(TABLE_SUFFIXES)


def first_lines(path: str, count: int) -> list[bytes]:
    """The first ``count`` complete lines of a file (fewer when it ends first), read 4, 8, ... 64 KiB at a time.

    The checks before a build use this, not ``readline``: on a remote file, fsspec's readline fetches a whole
    block (8 to 50 MiB) per call, and every part of a build runs the checks.
    """
    data, ended, step = b"", False, 4096
    with storage.open_file(path) as fh:
        while data.count(b"\n") < count and not ended:
            chunk = fh.read(step)
            ended, step = not chunk, min(2 * step, _HEAD_BYTES)
            data += chunk
    lines = [line + b"\n" for line in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]  # the text after the last newline: a line only at the end of the file
    return [line for line in lines[:count] if line.endswith(b"\n") or (ended and line)]


def columns(path: str) -> list[str]:
    """The column names of the table at ``path`` (its header row or parquet schema)."""
    if path.lower().endswith(".parquet"):
        with _parquet(path, small=True) as table:
            return list(table.schema_arrow.names)
    return _csv_header(path)[0]


def path_column(path: str, wanted: str = "") -> str:
    """The path column of the table: ``wanted``, or the first of DEFAULT_PATH_COLUMNS it has.

    Raises:
        TableError: no such column (the message lists the columns the table has).
    """
    names = columns(path)
    found = wanted if wanted in names else next((c for c in DEFAULT_PATH_COLUMNS if c in names and not wanted), None)
    if found is None:
        asked = f"column {wanted!r}" if wanted else f"column named {' or '.join(DEFAULT_PATH_COLUMNS)}"
        raise TableError(f"table {path} has no {asked} (columns: {', '.join(names) or 'none'}); "
                         "name the column of image paths with --path-column")
    return found


def first_path(path: str, column: str) -> Any:
    """The path cell of the first row among the first few (None if there is none): checked before a build starts."""
    if path.lower().endswith(".parquet"):
        with _parquet(path, small=True) as table:
            meta = table.metadata
            # The first group that holds a row: a streaming writer that flushed before its first row leaves empty ones.
            group = next((g for g in range(meta.num_row_groups) if meta.row_group(g).num_rows), None)
            if group is None:
                return None
            batch = next(table.iter_batches(batch_size=1, row_groups=[group], columns=[column]))
            return batch.column(0)[0].as_py()
    text = b"".join(first_lines(path, 16)).decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    try:
        names, *rows = csv.reader(text.splitlines(keepends=True), delimiter=_delimiter(path))
    except (csv.Error, ValueError):  # a row cut short by the read, or nothing at all
        return None
    return next((row[names.index(column)] for row in rows if len(row) == len(names)), None)


def iter_rows(path: str, column: str, part: tuple[int, int] | None = None) -> Iterator[Row]:
    """The rows of part ``i/n`` of the table (all rows when ``part`` is None), in table order."""
    if path.lower().endswith(".parquet"):
        return _parquet_rows(path, column, part or (0, 1))
    return _csv_rows(path, column, part or (0, 1))


def _csv_header(path: str) -> tuple[list[str], int]:
    """The column names of a CSV / TSV and the byte offset where its rows start."""
    raw = next(iter(first_lines(path, 1)), b"")
    text = raw.decode("utf-8", "surrogateescape").removeprefix("\ufeff")  # spreadsheets start with a BOM
    names = next(csv.reader([text], delimiter=_delimiter(path)), [])
    if not names:
        raise TableError(f"table {path} has no header row (the first line names the columns)")
    return names, len(raw)


def _delimiter(path: str) -> str:
    return "\t" if path.lower().endswith(".tsv") else ","


def _csv_rows(path: str, column: str, part: tuple[int, int]) -> Iterator[Row]:
    i, n = part
    names, body = _csv_header(path)
    size = storage.size(path)
    start, stop = body + i * (size - body) // n, body + (i + 1) * (size - body) // n
    with storage.open_lines(path) as fh:
        fh.seek(start - 1)
        if fh.read(1) != b"\n":
            fh.readline()  # the row in progress belongs to the part in whose range it starts
        at = fh.tell()
        consumed = [at]

        def lines() -> Iterator[str]:
            while raw := fh.readline():
                consumed[0] += len(raw)
                yield raw.decode("utf-8", "surrogateescape")

        reader = csv.reader(lines(), delimiter=_delimiter(path))
        index = names.index(column)
        while at < stop:
            line = reader.line_num
            cells = next(reader, None)
            if cells is None:
                return
            where, at = f"{path}@{at}", consumed[0]
            if n > 1 and reader.line_num - line > 1:
                raise TableError(f"{where}: a row spans {reader.line_num - line} lines (a quoted newline); "
                                 "--part splits tables by lines: build it whole, or write it as parquet")
            if not cells:
                continue  # a blank line
            if len(cells) != len(names):
                yield Row(where, None, {}, f"row has {len(cells)} fields, the header {len(names)}")
                continue
            yield Row(where, cells[index], {k: v for k, v in zip(names, cells) if k != column})


@contextlib.contextmanager
def _parquet(path: str, small: bool = False) -> Iterator[Any]:
    """The table as a ``pyarrow.parquet.ParquetFile``; ``small``: exact reads for a check (footer, first rows)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise TableError(f"{path}: parquet tables need pyarrow (pip install pyarrow)") from None
    with contextlib.ExitStack() as stack:
        source: Any = path
        if storage.is_url(path):
            readahead = 0 if small else storage.READAHEAD
            source = _ArrowFile(stack.enter_context(storage.open_file(path, readahead=readahead)))
        try:
            reads = {"pre_buffer": False, "buffer_size": _HEAD_BYTES} if small else {}
            table = stack.enter_context(pq.ParquetFile(source, **reads))
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise TableError(f"table {path} is not a readable parquet file: {str(exc).splitlines()[0]}") from None
        yield table


class _ArrowFile:
    """A remote file as pyarrow reads a Python file object (it also asks ``closed``, ``readable``, ``seekable``)."""

    closed = False

    def __init__(self, handle: Any):
        self._handle = handle

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True  # the handle itself is closed by the caller's ``with``


def _parquet_rows(path: str, column: str, part: tuple[int, int]) -> Iterator[Row]:
    i, n = part
    with _parquet(path) as table:
        meta = table.metadata
        first, stop = i * meta.num_rows // n, (i + 1) * meta.num_rows // n
        row = 0
        for g in range(meta.num_row_groups):
            if row >= stop:
                return
            size = meta.row_group(g).num_rows
            if row + size <= first:
                row += size
                continue
            # One row group per call: pyarrow pre-buffers every group it is given, so a call for all of them
            # would hold the whole table (measured: 65 MiB for a 60-group file, 7 MiB one group at a time).
            for batch in table.iter_batches(batch_size=_BATCH_ROWS, row_groups=[g]):
                lo, hi = max(first - row, 0), min(stop - row, batch.num_rows)
                if lo < hi:
                    piece = batch.slice(lo, hi - lo)
                    paths = piece.column(column).to_pylist()
                    others = piece.drop_columns([column]).to_pylist()
                    for k, (value, rest) in enumerate(zip(paths, others)):
                        yield Row(f"{path}#{row + lo + k}", value, rest)
                row += batch.num_rows
