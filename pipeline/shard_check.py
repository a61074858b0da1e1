"""The loader's shard checks: a survey at start, then each shard checked once when a reader is built.

What a check finds and what it costs is :mod:`shards.check`. :class:`ShardChecks` runs the checks for a loader: at
start, rank 0 looks up the size of every shard and checks further the ones whose size differs from the manifest's
or whose index is empty, and every rank takes its verdicts (so the shard plan, the same on every rank, leaves out
or shrinks what is damaged before it deals); when a reader is built, each shard it is dealt is checked once (the
index parse catches what a size cannot).
"""

from __future__ import annotations

from dataclasses import replace

from shards import storage
from shards.check import ShardCheck, check_shard
from shards.manifest import Manifest, ManifestError, ShardEntry


def suspicious(manifest: Manifest, i: int) -> bool:
    """True when ``stat`` says shard ``i`` differs from the manifest: tar size changed, index missing or empty."""
    entry = manifest.shards[i]
    try:
        return (storage.size(manifest.tar_path(entry)) != entry.bytes
                or storage.size(manifest.index_url(entry)) == 0)
    except OSError:
        return True


class ShardChecks:
    """A loader's shard checks: a survey at start (the same on every rank), then once per shard at reader build.

    Args:
        manifest: the data set as its manifest lists it.
        survey: run the survey here (else :meth:`adopt` another rank's).
    """

    def __init__(self, manifest: Manifest, survey: bool = True):
        self.manifest = manifest
        self.samples_of = {str(manifest.tar_path(e)): e.samples for e in manifest.shards}  # what the manifest says
        self._checked: dict[str, ShardCheck] = {}
        # The verdicts on the shards whose stat differs from the manifest, in manifest order.
        self.surveyed = [self.check(e) for i, e in enumerate(manifest.shards) if survey and suspicious(manifest, i)]

    @property
    def at_start(self) -> list[ShardCheck]:
        """The damaged shards the survey found, in manifest order."""
        return [c for c in self.surveyed if c.damaged]

    def adopt(self, surveyed: list[ShardCheck]) -> None:
        """Take another rank's survey as this one's (rank 0's, broadcast: every rank then deals the same)."""
        self.surveyed = list(surveyed)
        self._checked.update({c.tar: c for c in surveyed})

    def check(self, entry: ShardEntry) -> ShardCheck:
        """The verdict on shard ``entry`` (checked on the first call only)."""
        tar = str(self.manifest.tar_path(entry))
        if tar not in self._checked:
            found = check_shard(tar, self.manifest.index_path(entry))
            # A sound shard's records are not kept: every rank checks every shard in time, and its readers parse
            # the index themselves (1.28M records take ~0.9 GB, measured with tracemalloc).
            self._checked[tar] = found if found.damaged else replace(found, samples=[])
        return self._checked[tar]

    def is_checked(self, entry: ShardEntry) -> bool:
        return str(self.manifest.tar_path(entry)) in self._checked

    def forget(self, entry: ShardEntry) -> None:
        """Check ``entry`` afresh next time (its files changed while they were read)."""
        self._checked.pop(str(self.manifest.tar_path(entry)), None)

    def readable_manifest(self) -> Manifest:
        """The manifest the shard plan deals: what the survey found unreadable left out, a truncated shard
        with the samples it still has.

        Raises:
            ManifestError: no shard can be read.
        """
        shards = []
        for entry in self.manifest.shards:
            found = self._checked.get(str(self.manifest.tar_path(entry)))
            if found is None:
                shards.append(entry)
            elif found.usable:
                shards.append(replace(entry, samples=found.readable))
        if not shards:
            raise ManifestError(f"none of the {len(self.manifest.shards)} shards of {self.manifest.root} can be read "
                                f"(first: {self.at_start[0].tar}: {self.at_start[0].problem}); "
                                f"run `python -m shards verify {self.manifest.root}`")
        return replace(self.manifest, shards=shards)
