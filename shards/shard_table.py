"""The manifest's shard entries, held column by column: 53 bytes per shard instead of 556 as objects.

Every rank holds the whole manifest (it deals from it), so at a billion images (100k to 1M shards) the entries are
memory paid per rank, per process. One ``ShardEntry`` object per shard, its fields in a per-instance ``__dict__``
(the parsed JSON object itself) with its own strings and ints, took 556 B per entry retained (tracemalloc, 100k
fabricated entries). :class:`ShardTable` keeps the same values as columns and makes a ``ShardEntry`` when one is
asked for:

* tar names: one string of all the names plus an int64 offset each (a Python ``str`` costs 49 B before its text);
* index names: nothing when every one is its tar's name with ``.idx`` for ``.tar`` (what the writer names them),
  else stored like the tar names;
* stats names: each distinct name once (a few per build: one per writer group) plus an int32 code per entry;
* samples, bytes, max_sample_bytes: int64 arrays (a Python int above 256 costs 28 B plus an 8 B pointer).

An entry is made when asked for: 1.7 us by index, 0.7 us each when iterating (a list of objects: 0.03 us), so a
caller that needs a whole column over the manifest takes the array (``table.samples``), not ``[s.samples for s in
table]``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import overload

import numpy as np

_CHUNK = 4096  # entries made per step when iterating: columns turned into Python values a slice at a time


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One tar shard as recorded in the manifest (names relative to the manifest's directory)."""

    tar: str
    index: str
    samples: int
    bytes: int
    max_sample_bytes: int = 0
    stats: str = ""


def _entry_maker() -> Callable[[str, str, int, int, int, str], ShardEntry]:
    """A faster ``ShardEntry(...)`` for iteration: the frozen dataclass's ``__init__`` sets each field through
    ``object.__setattr__`` (1.0 us per entry); its slot descriptors set directly take 0.4 us."""
    new = object.__new__
    tar, index, samples, nbytes, max_bytes, stats = (ShardEntry.__dict__[f.name].__set__ for f in fields(ShardEntry))

    def make(t: str, i: str, s: int, b: int, m: int, st: str) -> ShardEntry:
        entry = new(ShardEntry)
        tar(entry, t)
        index(entry, i)
        samples(entry, s)
        nbytes(entry, b)
        max_bytes(entry, m)
        stats(entry, st)
        return entry

    return make


_make_entry = _entry_maker()


def _all_derived(tars: list[str], joined_tars: str, ends: np.ndarray, indexes: list[str]) -> bool:
    """Whether every index name is its tar's with ``.idx`` for ``.tar`` (as the shard writer names them), checked on
    the joined names (C-level passes).

    Every tar (``joined_tars[ends[k-1]:ends[k]]``) ends with ``.tar`` and holds it once (so replacing every ``.tar``
    changes exactly the ends), and each index name is as long as its tar: then the joined names are equal after the replacement iff each pair is.
    """
    n = len(tars)
    return (joined_tars.count(".tar") == n and all(map(str.endswith, tars, [".tar"] * n))
            and np.array_equal(np.fromiter(map(len, indexes), dtype=np.int64, count=n), np.diff(ends, prepend=0))
            and joined_tars.replace(".tar", ".idx") == "".join(indexes))


class _Names:
    """A column of strings as one joined string plus offsets (``ends[k]`` is where name ``k`` ends)."""

    __slots__ = ("text", "ends")

    def __init__(self, names: list[str]):
        self.text = "".join(names)
        self.ends = np.cumsum(np.fromiter(map(len, names), dtype=np.int64, count=len(names)))

    def get(self, k: int) -> str:
        return self.text[self.ends.item(k - 1) if k else 0:self.ends.item(k)]

    def slice(self, start: int, stop: int) -> list[str]:
        if start >= stop:
            return []
        ends = self.ends[start:stop].tolist()
        starts = [int(self.ends[start - 1]) if start else 0, *ends[:-1]]
        text = self.text
        return [text[a:b] for a, b in zip(starts, ends)]


class ShardTable(Sequence[ShardEntry]):
    """The shard entries of a manifest as a read-only sequence of :class:`ShardEntry`, stored as columns.

    ``table[i]``, iteration, ``len`` and slicing behave as for the list of entries it was made from (each access
    makes a fresh, equal ``ShardEntry``); the integer columns are also there as read-only arrays (``samples``,
    ``bytes``, ``max_sample_bytes``) for callers that need a whole column (a sum, the dealing plan).

    Args:
        tars, indexes, stats: the name columns.
        samples, bytes, max_sample_bytes: the integer columns.
    """

    def __init__(self, tars: list[str], indexes: list[str], stats: list[str], samples: Iterable[int],
                 bytes: Iterable[int], max_sample_bytes: Iterable[int]):
        n = len(tars)
        self._tars = _Names(tars)
        self._indexes = None if _all_derived(tars, self._tars.text, self._tars.ends, indexes) else _Names(indexes)
        codes = {name: code for code, name in enumerate(dict.fromkeys(stats))}
        self._stats_names = list(codes)
        self._stats_codes = (np.zeros(n, dtype=np.int32) if len(codes) <= 1
                             else np.fromiter(map(codes.__getitem__, stats), dtype=np.int32, count=n))
        self.samples = self._ints(samples, n)
        self.bytes = self._ints(bytes, n)
        self.max_sample_bytes = self._ints(max_sample_bytes, n)

    @staticmethod
    def _ints(values: Iterable[int], n: int) -> np.ndarray:
        column = np.fromiter(values, dtype=np.int64, count=n)
        column.flags.writeable = False  # the entries are immutable, and so are their columns
        return column

    @classmethod
    def from_entries(cls, entries: Iterable[ShardEntry]) -> ShardTable:
        """The table of ``entries`` (a list of ``ShardEntry``, or another table)."""
        if isinstance(entries, ShardTable):
            return entries
        entries = list(entries)
        return cls([e.tar for e in entries], [e.index for e in entries], [e.stats for e in entries],
                   [e.samples for e in entries], [e.bytes for e in entries], [e.max_sample_bytes for e in entries])

    # ------------------------------------------------------------------ the sequence
    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, i: int) -> ShardEntry: ...

    @overload
    def __getitem__(self, i: slice) -> list[ShardEntry]: ...

    def __getitem__(self, i: int | slice) -> ShardEntry | list[ShardEntry]:
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step == 1:
                return list(self._entries(start, stop))
            return [self[k] for k in range(start, stop, step)]
        k = operator.index(i)
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"shard {i} of a manifest of {n}")
        tar = self._tars.get(k)
        return _make_entry(tar, self._indexes.get(k) if self._indexes is not None else tar[:-4] + ".idx",
                           self.samples.item(k), self.bytes.item(k), self.max_sample_bytes.item(k),
                           self._stats_names[self._stats_codes.item(k)])

    def __iter__(self) -> Iterator[ShardEntry]:
        for start in range(0, len(self), _CHUNK):
            yield from self._entries(start, min(start + _CHUNK, len(self)))

    def _entries(self, start: int, stop: int) -> Iterator[ShardEntry]:
        tars = self._tars.slice(start, stop)
        # Derived: every tar ends with .tar (checked when the table was made).
        indexes = self._indexes.slice(start, stop) if self._indexes is not None else [t[:-4] + ".idx" for t in tars]
        names = self._stats_names
        stats = [names[c] for c in self._stats_codes[start:stop].tolist()]
        return map(_make_entry, tars, indexes, self.samples[start:stop].tolist(), self.bytes[start:stop].tolist(),
                   self.max_sample_bytes[start:stop].tolist(), stats)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (ShardTable, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment] - equal to lists, which are unhashable

    def __repr__(self) -> str:
        return f"ShardTable({len(self)} shards)"

    # ------------------------------------------------------------------ whole columns
    def tars(self) -> list[str]:
        """Every tar name, in order."""
        return self._tars.slice(0, len(self))

    def indexes(self) -> list[str]:
        """Every index name, in order."""
        if self._indexes is not None:
            return self._indexes.slice(0, len(self))
        return [t[:-4] + ".idx" for t in self.tars()]
