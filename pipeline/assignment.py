"""Per-rank shard assignment: disjoint, covering, balanced by sample count, reshuffled every pass, read in windows.

Every rank computes the same plan from the manifest's sample counts and the shared seed, so no
communication is needed.

Dealing. The balancing is longest-processing-time greedy (the largest shard to the least-loaded bin, the
lowest bin on ties). The greedy only ever looks at sizes, visited in the same (descending) sequence every
pass, so which *slot* of that sequence lands in which bin is computed once (:func:`least_loaded_bins`), and
with it every bin's sample and shard count. A pass then only decides which shard fills which slot: shards of
equal size are ordered by a per-pass random key, the bins are handed to ranks in a per-pass random order, and
each rank reads its shards in a per-pass random order. Consequences:

* the per-rank sample counts form the same multiset every pass, so the batch count per pass is a constant;
  greedy balancing bounds the spread between ranks by the largest shard;
* the shard builder writes equal-size shards except the last, so in practice every shard can move to any
  rank every pass;
* a pass costs one ``lexsort`` of the shards (numpy), not the greedy: ~10 ms for 100k shards at any world
  size, where the pure-Python greedy took 6.4 s at 512 ranks (``python -m benchmarks run --suite scale``).
  Greedy LPT over a run of equal sizes is a merge of the arithmetic sequences ``load_b + j * size``, which
  :func:`least_loaded_bins` takes in one vectorised step for long runs (all-equal shards: round-robin).

The random keys are the raw 64-bit outputs of PCG64 (numpy guarantees the bit stream of its bit generators,
not of ``Generator`` methods), so every machine and numpy version deals the same way.

Windows. A rank does not read its share of a pass through one reader: its shards (in reading order) are cut
into ``windows_per_pass`` consecutive windows of at most ``window_shards`` shards (sizes differing by at most
one), and each window gets its own reader (a DALI pipeline, DataLoader workers), so a reader's memory, open
files and build time are bounded by the window, not by the rank's share. ``windows_per_pass`` is the same on
every rank and pass: ``ceil(most shards in a bin / window_shards)``.

A reader yields whole batches only, so each window ``w`` of ``m_w`` samples yields ``c_w <= floor(m_w / B)``
batches. The windows are filled in order, ``c_w = min(floor(m_w / B), batches left in the pass)``, and every
rank yields the same ``batches_per_pass`` (no rank waits at a collective): the fewest that any bin's windows
can always supply, which is exact (``sum_w floor(m_w / B)``) for a bin of equal-size shards, and
``floor(load / B) - (windows - 1)`` otherwise (a window's tail loses fewer than ``B`` samples). So at most
``B - 1`` samples per window boundary are left undrawn on top of the pass's truncation, all at the end of
each window (the reader stops after ``c_w`` batches), and a window whose quota is 0 is skipped. Everything is
a function of (seed, pass, rank), so the stream stays deterministic and a position is just (pass, window,
batch in the window) plus the reader's own position.

The surplus samples of the fuller ranks are simply not drawn that pass (a different, random surplus each
pass). Padding instead (repeating samples on the short ranks) would bias the stream toward repeated images,
so we truncate.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shards.manifest import ManifestError

# Runs of equal sizes at least this long are dealt by one vectorised merge; shorter runs item by item on a heap
# (a few microseconds each, where the merge costs ~0.3 ms whatever the run's length).
_VECTOR_RUN = 256


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from ``parts`` (same on every machine and Python version, unlike ``hash``)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def random_keys(n: int, *parts: int | str) -> np.ndarray:
    """``n`` random uint64 keys seeded from ``parts``: PCG64's raw output, stable across numpy versions."""
    return np.random.PCG64(derive_seed(*parts)).random_raw(n)


def random_permutation(n: int, *parts: int | str) -> np.ndarray:
    """A permutation of ``range(n)`` seeded from ``parts`` (argsort of stable raw keys; ties keep index order)."""
    return np.argsort(random_keys(n, *parts), kind="stable")


def _merge_run(loads: np.ndarray, size: int, k: int) -> np.ndarray:
    """The bins of ``k`` greedy picks of items of ``size``: the ``k`` smallest keys ``(loads[b] + j * size, b)``.

    The greedy (least-loaded bin, lowest index on ties) takes bin ``b``'s keys in the order ``j = 0, 1, ...``,
    so its picks are the merge of those increasing sequences. Updates ``loads`` in place.
    """
    def count(t: int) -> int:  # keys <= t
        return int(np.maximum((t - loads) // size + 1, 0).sum())

    lo, hi = int(loads.min()), int(loads.min()) + (k - 1) * size  # the least-loaded bin alone has k keys <= hi
    while lo < hi:  # the smallest key value t with count(t) >= k
        mid = (lo + hi) // 2
        if count(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    below = np.where(loads < lo, (lo - loads + size - 1) // size, 0)  # keys strictly below t, per bin
    at_t = np.flatnonzero((loads <= lo) & ((lo - loads) % size == 0))[: k - int(below.sum())]  # ties: lowest bin
    taken = below
    taken[at_t] += 1
    bins = np.repeat(np.arange(len(loads)), taken)
    j = np.arange(len(bins)) - np.repeat(np.cumsum(taken) - taken, taken)
    picks = bins[np.lexsort((bins, loads[bins] + j * size))]
    loads += taken * size
    return picks


def least_loaded_bins(sizes: Sequence[int] | np.ndarray, bins: int) -> np.ndarray:
    """Greedy: put each item, in the given order, into the least-loaded bin (the lowest index on ties).

    Exactly the plain greedy loop ``b = min(range(bins), key=lambda r: (load[r], r))``, in O(n log bins) for
    short runs of equal sizes and one vectorised merge per long run (``sizes`` sorted in descending order
    makes it LPT; all-equal sizes make it round-robin).

    Args:
        sizes: item sizes (positive integers) in the order they are placed.
        bins: number of bins.

    Returns:
        The bin of each item, int64 array of ``len(sizes)``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    out = np.empty(len(sizes), dtype=np.int64)
    heap = [(0, b) for b in range(bins)]  # (load, bin): a valid heap already
    starts = np.flatnonzero(np.diff(sizes, prepend=-1)) if len(sizes) else np.zeros(0, dtype=np.int64)
    ends = np.append(starts[1:], len(sizes))
    for start, end in zip(starts.tolist(), ends.tolist()):
        size = int(sizes[start])
        if end - start >= _VECTOR_RUN:
            loads = np.empty(bins, dtype=np.int64)
            for load, b in heap:
                loads[b] = load
            out[start:end] = _merge_run(loads, size, end - start)
            heap = list(zip(loads.tolist(), range(bins)))
            heapq.heapify(heap)
            continue
        for i in range(start, end):
            load, b = heap[0]
            out[i] = b
            heapq.heapreplace(heap, (load + size, b))
    return out


@dataclass(frozen=True)
class RankPass:
    """One rank's share of one pass: its shards in reading order, cut into windows, and each window's batches.

    Attributes:
        pass_index: the pass.
        shards: shard indices (into the manifest) in reading order.
        bounds: window ``w`` is ``shards[bounds[w]:bounds[w + 1]]`` (``windows_per_pass + 1`` entries).
        batches: batches the rank yields from each window (they sum to ``batches_per_pass``).
    """

    pass_index: int
    shards: np.ndarray
    bounds: np.ndarray
    batches: np.ndarray

    def window(self, w: int) -> np.ndarray:
        """Shard indices of window ``w``, in reading order."""
        return self.shards[self.bounds[w]:self.bounds[w + 1]]


class ShardPlan:
    """The shard-to-rank plan for a data set (see the module docstring).

    Args:
        sizes: samples per shard, in manifest order.
        world_size: number of ranks.
        seed: shared seed (the run seed); every rank must pass the same one.
    """

    def __init__(self, sizes: Sequence[int] | np.ndarray, world_size: int, seed: int):
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        self.world_size, self.seed = int(world_size), int(seed)
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {self.world_size}")
        if len(self.sizes) < self.world_size:
            raise ManifestError(
                f"{len(self.sizes)} shards cannot be split over {self.world_size} ranks; "
                f"write at least one shard per rank (ideally many more)")
        if (self.sizes <= 0).any():
            raise ValueError("every shard must hold at least one sample")
        # The descending size sequence and its greedy bins are the same every pass: computed once.
        self._descending = -np.sort(-self.sizes, kind="stable")
        self._slot_bin = least_loaded_bins(self._descending, self.world_size)
        self.bin_samples = np.bincount(self._slot_bin, weights=self._descending, minlength=self.world_size
                                       ).astype(np.int64)
        self.bin_shards = np.bincount(self._slot_bin, minlength=self.world_size)
        smallest = np.full(self.world_size, np.iinfo(np.int64).max)
        largest = np.zeros(self.world_size, dtype=np.int64)
        np.minimum.at(smallest, self._slot_bin, self._descending)
        np.maximum.at(largest, self._slot_bin, self._descending)
        # A bin of equal-size shards: its windows' sample counts are known without dealing (0: mixed sizes).
        self._bin_size = np.where(smallest == largest, smallest, 0)
        self._batches: dict[tuple[int, int], int] = {}

    # ------------------------------------------------------------------ dealing
    def _deal(self, pass_index: int) -> tuple[np.ndarray, np.ndarray]:
        """(bin of every shard, bin of every rank) for ``pass_index``."""
        tiebreak = random_keys(len(self.sizes), "assign", self.seed, pass_index)
        order = np.lexsort((tiebreak, -self.sizes))  # descending size; equal sizes in random order
        bin_of = np.empty(len(self.sizes), dtype=np.int64)
        bin_of[order] = self._slot_bin
        return bin_of, random_permutation(self.world_size, "ranks", self.seed, pass_index)

    def _reading_keys(self, pass_index: int) -> np.ndarray:
        return random_keys(len(self.sizes), "read", self.seed, pass_index)

    def rank_shards(self, pass_index: int, rank: int) -> np.ndarray:
        """Shard indices (into ``sizes``) of ``rank`` for one pass, in that rank's reading order."""
        bin_of, rank_bin = self._deal(pass_index)
        mine = np.flatnonzero(bin_of == rank_bin[rank])
        return mine[np.argsort(self._reading_keys(pass_index)[mine], kind="stable")]

    def assign(self, pass_index: int) -> list[list[int]]:
        """Shard indices per rank for one pass, each list in that rank's reading order (every rank at once)."""
        bin_of, rank_bin = self._deal(pass_index)
        order = np.lexsort((self._reading_keys(pass_index), bin_of))  # by bin, then reading order
        per_bin = np.split(order, np.cumsum(np.bincount(bin_of, minlength=self.world_size))[:-1])
        return [per_bin[b].tolist() for b in rank_bin.tolist()]

    def rank_samples(self, pass_index: int = 0) -> list[int]:
        """Samples per rank in one pass."""
        return self.bin_samples[self._deal(pass_index)[1]].tolist()

    # ------------------------------------------------------------------ windows and batches
    def windows_per_pass(self, window_shards: int) -> int:
        """Windows every rank reads per pass: enough for the rank with the most shards (0: one window)."""
        most = int(self.bin_shards.max())
        return 1 if window_shards <= 0 else max(1, -(-most // window_shards))

    def batches_per_pass(self, local_batch: int, window_shards: int = 0) -> int:
        """Batches every rank yields per pass, >= 1: the fewest any rank's windows can supply (module docstring).

        With one window (``window_shards`` 0 or at least the most shards of a rank) this is
        floor(min over ranks of its samples / local batch).

        Raises:
            ValueError: a rank cannot fill one local batch (too few samples, or windows too small).
        """
        key = (local_batch, window_shards)
        if key in self._batches:
            return self._batches[key]
        fewest = int(self.bin_samples.min())
        if fewest < local_batch:
            raise ValueError(
                f"a rank gets only {fewest} samples per pass, fewer than one local batch of {local_batch}; "
                f"use a smaller batch or more data")
        windows = self.windows_per_pass(window_shards)
        supply = self.bin_samples // local_batch - (windows - 1)
        # Equal-size shards: the exact supply, r windows of q + 1 shards and the others of q (_window_counts).
        q, r = np.divmod(self.bin_shards, windows)
        size = self._bin_size
        exact = r * ((q + 1) * size // local_batch) + (windows - r) * (q * size // local_batch)
        supply = np.where(size > 0, exact, supply)
        least = int(supply.min())
        if least < 1:
            raise ValueError(f"windows of {window_shards} shards hold fewer than one local batch of {local_batch} "
                             f"on some rank; raise data.window_shards")
        self._batches[key] = least
        return least

    def rank_pass(self, pass_index: int, rank: int, local_batch: int, window_shards: int = 0) -> RankPass:
        """``rank``'s shards of ``pass_index`` in reading order, cut into windows, with each window's batches."""
        shards = self.rank_shards(pass_index, rank)
        windows = self.windows_per_pass(window_shards)
        bounds = np.concatenate([[0], np.cumsum(_window_counts(len(shards), windows))])
        total = np.concatenate([[0], np.cumsum(self.sizes[shards])])
        samples = total[bounds[1:]] - total[bounds[:-1]]
        whole = samples // local_batch
        left = self.batches_per_pass(local_batch, window_shards)
        batches = np.minimum(whole, np.maximum(left - (np.cumsum(whole) - whole), 0))  # fill windows in order
        return RankPass(pass_index, shards, bounds, batches)


def _window_counts(n: int, windows: int) -> np.ndarray:
    """Shards per window when ``n`` shards are cut into ``windows`` consecutive windows (sizes differ by <= 1)."""
    q, r = divmod(n, windows)
    return np.array([q + 1] * r + [q] * (windows - r), dtype=np.int64)
