"""Per-rank shard assignment: disjoint, covering, balanced by sample count, reshuffled every pass.

Every rank computes the same plan from the manifest's sample counts and the shared seed, so no
communication is needed. The balancing is longest-processing-time greedy (largest shard to the
least-loaded rank), with two properties that matter here:

* shards of equal size are visited in a per-pass random order and the bins are handed to ranks in a
  per-pass random order, so each pass deals the shards out afresh (the shard builder writes equal-size
  shards except the last, so in practice every shard can move to any rank every pass);
* the greedy only ever looks at sizes, which are visited in the same (descending) sequence every pass,
  so the per-rank sample counts form the same multiset every pass and the batch count per pass,
  ``floor(min over ranks / local batch)``, is a constant. Greedy balancing bounds the spread between
  ranks by the largest shard, so a rank drops at most ``max_shard + local_batch - 1`` samples per pass.

Ranks yield the same number of batches (no rank waits at a collective); the surplus samples of the
fuller ranks are simply not drawn that pass (a different, random surplus each pass). Padding instead
(repeating samples on the short ranks) would bias the stream toward repeated images, so we truncate.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from shards.manifest import ManifestError


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from ``parts`` (same on every machine and Python version, unlike ``hash``)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


@dataclass(frozen=True)
class ShardPlan:
    """The shard-to-rank plan for a data set.

    Args:
        sizes: samples per shard, in manifest order.
        world_size: number of ranks.
        seed: shared seed (the run seed); every rank must pass the same one.
    """

    sizes: tuple[int, ...]
    world_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1; got {self.world_size}")
        if len(self.sizes) < self.world_size:
            raise ManifestError(
                f"{len(self.sizes)} shards cannot be split over {self.world_size} ranks; "
                f"write at least one shard per rank (ideally many more)")
        if any(s <= 0 for s in self.sizes):
            raise ValueError("every shard must hold at least one sample")

    def assign(self, pass_index: int) -> list[list[int]]:
        """Shard indices (into ``sizes``) per rank for one pass, each list in that rank's reading order."""
        rng = random.Random(derive_seed("assign", self.seed, pass_index))
        tiebreak = list(range(len(self.sizes)))
        rng.shuffle(tiebreak)
        order = sorted(range(len(self.sizes)), key=lambda i: (-self.sizes[i], tiebreak[i]))
        bins: list[list[int]] = [[] for _ in range(self.world_size)]
        loads = [0] * self.world_size
        for i in order:
            b = min(range(self.world_size), key=lambda r: (loads[r], r))
            bins[b].append(i)
            loads[b] += self.sizes[i]
        to_rank = list(range(self.world_size))
        rng.shuffle(to_rank)
        per_rank: list[list[int]] = [[] for _ in range(self.world_size)]
        for b, r in enumerate(to_rank):
            shards = bins[b]
            rng.shuffle(shards)  # reading order within the rank
            per_rank[r] = shards
        return per_rank

    def rank_samples(self, pass_index: int = 0) -> list[int]:
        """Samples per rank in one pass."""
        return [sum(self.sizes[i] for i in shards) for shards in self.assign(pass_index)]

    def batches_per_pass(self, local_batch: int) -> int:
        """Batches every rank yields per pass: floor(min over ranks of its samples / local batch), >= 1.

        Raises:
            ValueError: a rank holds fewer samples than one local batch.
        """
        fewest = min(self.rank_samples(0))
        if fewest < local_batch:
            raise ValueError(
                f"a rank gets only {fewest} samples per pass, fewer than one local batch of {local_batch}; "
                f"use a smaller batch or more data")
        return fewest // local_batch
