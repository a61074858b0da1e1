"""The loader's shard checks: each shard checked once, when the reader of a window that holds it is prepared.

What a check finds and what it costs is :mod:`shards.check` (a size lookup, the index parse, a few 512-byte reads).
No shard is checked at start-up beyond those of the first window: a survey of every shard (rank 0 used to ``stat``
all of them and broadcast its verdicts, then rebuild the manifest without the damaged ones) cost O(shards in the
manifest) before the first batch: 7.7 s of the 15 s constructor at 100k shards per rank (cProfile). The plan
therefore deals every shard the manifest lists, and a window's reader reads the window's shards less those found
unreadable (``TrainLoader.readable_window``); readers cycle, so every rank still yields the same number of batches.

Checks run in a background thread (each loader prepares the next window in one: DALI builds its reader there, the
PyTorch backend only checks there and forks its DataLoader on the training thread): verdicts are recorded under a
lock, and the damaged ones are queued until the loader's own thread takes them (:meth:`ShardChecks.take_found`) to
count and report them.

In object storage a check is 7 small requests (index GET, 2 HEADs of the tar, 4 probe GETs), each mostly waiting
on it (~10-50 ms): a window's shards are checked ``CHECKS_IN_FLIGHT`` at a time there
(:meth:`ShardChecks.check_many`; 48 shards at 20 ms a request: 9.4 s one by one, 1.9 s so), one by one on local disk
(a check costs ~0.1-1 ms there; threads would only add overhead).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable
from dataclasses import replace

from shards import storage
from shards.check import ShardCheck, check_shard
from shards.manifest import Manifest

CHECKS_IN_FLIGHT = storage.REQUESTS_IN_FLIGHT  # shards checked at once in object storage


class ShardChecks:
    """A loader's shard checks, by index into ``manifest.shards``; thread-safe.

    Args:
        manifest: the data set as its manifest lists it.
    """

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.remote = storage.is_url(manifest.root)  # checks mostly wait on the store: run several at once
        self._checked: dict[int, ShardCheck] = {}
        self._damaged: dict[int, ShardCheck] = {}  # the damaged verdicts, in the order found
        self._found: list[tuple[int, ShardCheck]] = []  # damaged verdicts the loader has not taken yet
        self._lock = threading.Lock()

    def check(self, i: int) -> ShardCheck:
        """The verdict on shard ``i`` (checked on the first call only)."""
        found = self._checked.get(i)
        if found is not None:
            return found
        return self._record(i, self._verdict(i))

    def check_many(self, indices: Iterable[int], stop: threading.Event | None = None) -> None:
        """Check the shards ``indices`` not checked yet: in object storage ``CHECKS_IN_FLIGHT`` at a time, on local
        disk one by one.

        Verdicts are recorded in the order of ``indices``, whatever order the checks end in, so the damaged shards
        are found (and reported) in the same order as by :meth:`check` called on each in turn; a check that raises
        raises here once the verdicts before it are recorded, and those after it are dropped, as one by one.

        Args:
            indices: shards (indices into ``manifest.shards``), in the order their verdicts are to be recorded.
            stop: once set, no further verdict is recorded: the checks not started are cancelled, and those under
                way are waited for (one check's time) and dropped (checked afresh on the next call).
        """
        todo = list(dict.fromkeys(i for i in indices if i not in self._checked))
        if not self.remote or len(todo) < 2:
            for i in todo:
                if stop is not None and stop.is_set():
                    return
                self.check(i)
            return
        verdicts = storage.map_ahead(self._verdict, todo, min(CHECKS_IN_FLIGHT, len(todo)), "shard-check")
        with contextlib.closing(verdicts):  # after a raise or a stop: the checks not started are cancelled
            for i, found in zip(todo, verdicts):
                if stop is not None and stop.is_set():
                    return
                self._record(i, found)

    def _verdict(self, i: int) -> ShardCheck:
        """Check shard ``i`` (no state touched: safe in any thread)."""
        entry = self.manifest.shards[i]
        found = check_shard(str(self.manifest.tar_path(entry)), self.manifest.index_path(entry))
        # A sound shard's records are not kept: readers parse the index themselves (1.28M records take ~0.9 GB,
        # measured with tracemalloc).
        return found if found.damaged else replace(found, samples=[])

    def _record(self, i: int, found: ShardCheck) -> ShardCheck:
        """Record the verdict ``found`` on shard ``i``; returns the verdict kept (another thread's if it was first)."""
        with self._lock:
            if i in self._checked:  # checked meanwhile in another thread: one verdict, reported once
                return self._checked[i]
            self._checked[i] = found
            if found.damaged:
                self._damaged[i] = found
                self._found.append((i, found))
        return found

    def is_checked(self, i: int) -> bool:
        return i in self._checked

    def forget(self, i: int) -> None:
        """Check shard ``i`` afresh next time (its files changed while they were read)."""
        with self._lock:
            self._checked.pop(i, None)
            self._damaged.pop(i, None)

    def damaged(self) -> list[tuple[int, ShardCheck]]:
        """Every damaged shard found so far, as ``(index, verdict)`` in the order found."""
        with self._lock:
            return list(self._damaged.items())

    def take_found(self) -> list[tuple[int, ShardCheck]]:
        """The damaged shards found since the last call, as ``(index, verdict)`` in the order found."""
        with self._lock:
            found, self._found = self._found, []
        return found
