"""The run's ledger of damaged data: each damaged shard and unreadable sample counted once over all ranks and passes.

Each rank's loader counts what its own windows find (``pipeline.bad_samples.BadSampleLog``), so a shard dealt to
two ranks, or to one rank in two passes after a resume, is found more than once; a sum over ranks would count it
each time and stop a run on ``data.max_bad_samples`` sooner than the damage warrants. The ledger keeps the distinct
items instead. An item's identity is where it lives in the data set, named relative to the manifest's root (so a
resume with ``data.shards`` moved still recognises it):

* an unreadable shard (truncated to nothing, garbled index, not a tar): ``(shard, "")``, losing every sample the
  manifest gives it;
* an unreadable sample (a corrupt JPEG, bytes beyond the end of a cut tar): ``(shard, member)``, losing one. A
  DALI batch that fails is restarted without the corrupt samples found in it, so those samples are what it lost;
  a sample of a shard that is also unreadable as a whole is not counted a second time.

Ranks exchange only the items the ledger lacks, at log points and in the checkpoint's gather (no collective per
step), and merge the exchanged parts in rank order: every rank holds the same ledger and takes the same decision on
``data.max_bad_samples``. The ledger grows only until the run aborts on that threshold (checked every ``log_every``
steps), so it holds about ``max_bad_samples + 1`` items plus what one log window finds.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from typing import Any

import distributed
from pipeline.bad_samples import parse_location
from shards import storage

# One damaged item: (shard relative to the root, member name or "" for the whole shard, samples it loses).
Item = tuple[str, str, int]


class BadDataLedger:
    """The distinct damaged items of the run, identical on every rank after each exchange.

    Args:
        root: the manifest's root (``loader.manifest.root``): item names are relative to it.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = root
        self._prefix = os.fspath(storage.join(root, "x"))[:-1]  # "<root>/" as the loader joins paths ("" for ".")
        self.items: dict[tuple[str, str], int] = {}  # (shard, member) -> samples lost, in the order merged

    def shard_name(self, tar: str) -> str:
        """``tar`` (a path the loader read) relative to the root; as given when it lies elsewhere."""
        return tar[len(self._prefix):] if tar.startswith(self._prefix) else tar

    def unseen(self, dropped: dict[str, int], locations: Iterable[str]) -> list[Item]:
        """This rank's damage that the ledger does not hold yet.

        Args:
            dropped: the loader's unreadable shards (``loader.dropped_shards``: tar path -> samples).
            locations: the loader's unreadable samples (``loader.bad_sample_locations``: ``<tar>:<offset>:<member>``).
        """
        found = [(self.shard_name(tar), "", int(samples)) for tar, samples in dropped.items()]
        for loc in locations:
            tar, _offset, member = parse_location(loc)
            found.append((self.shard_name(tar), member, 1))
        return [item for item in found if item[:2] not in self.items]

    def merge(self, items: Iterable[Item]) -> None:
        """Add ``items``; those already held are ignored."""
        for shard, member, samples in items:
            self.items.setdefault((shard, member), int(samples))

    def gather(self, items: list[Item]) -> None:
        """Exchange each rank's ``items`` (from :meth:`unseen`) and merge them all, in rank order.

        A collective: every rank calls it at the same point (a no-op exchange without a process group).
        """
        for part in distributed.all_gather_object(items):
            self.merge(part)

    @property
    def count(self) -> int:
        """Samples lost, each counted once: every sample of the unreadable shards, plus the unreadable samples of
        the other shards."""
        whole = {shard: samples for (shard, member), samples in self.items.items() if not member}
        return sum(whole.values()) + sum(samples for (shard, member), samples in self.items.items()
                                         if member and shard not in whole)

    @property
    def shards(self) -> int:
        """Unreadable shards (each dropped from every window that holds it)."""
        return sum(1 for _shard, member in self.items if not member)

    def examples(self, k: int = 3) -> list[str]:
        """The first ``k`` items found, as paths: ``<root>/<shard>`` or ``<root>/<shard>:<member>``."""
        out = []
        for shard, member in itertools.islice(self.items, k):
            outside = storage.is_url(shard) or os.path.isabs(shard)  # a path the root does not lead to, kept whole
            path = shard if outside else os.fspath(storage.join(self.root, shard))
            out.append(f"{path}:{member}" if member else f"{path} (unreadable shard)")
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain lists (``torch.load(weights_only=True)`` reads them): the count survives a resume, even one with
        another number of ranks, which restores no loader's own log."""
        return {"items": [[shard, member, samples] for (shard, member), samples in self.items.items()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = {}
        self.merge((str(shard), str(member), int(samples)) for shard, member, samples in state["items"])
