"""What every loader backend shares: the stream position over passes and windows, the shard plan, bad-sample counts,
output format."""

from __future__ import annotations

import sys
import threading
from typing import Any

import numpy as np
import torch

from config import Config, global_batch
from distributed import DistInfo
from pipeline.assignment import RankPass, ShardPlan
from pipeline.bad_samples import BadSampleLog
from pipeline.recipes import RECIPES, Recipe
from pipeline.shard_check import ShardCheck, ShardChecks
from shards.manifest import Manifest, ManifestError, read_manifest

STATE_VERSION = 2  # 2: dealt by pipeline.assignment's numpy plan, read in windows


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """The dtype of the views: data.dtype, or with ``auto`` the training precision's dtype on CUDA, fp32 on CPU."""
    if cfg.data.dtype != "auto":
        return getattr(torch, cfg.data.dtype)
    if device.type != "cuda":
        return torch.float32
    precision = cfg.optim.precision
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


class Retirer:
    """Releases finished passes' readers (a DALI pipeline, a DataLoader iterator) in background threads.

    Their shutdown waits for worker threads or processes to exit (a forked DataLoader worker takes tens of
    milliseconds to tear down its copy of the address space), which need not hold up the next batch.
    """

    def __init__(self) -> None:
        self._threads: list[threading.Thread] = []

    def retire(self, holder: list[Any]) -> None:
        """Release the object in ``holder`` (a one-element list holding its only reference) in a thread."""
        self._threads = [t for t in self._threads if t.is_alive()]
        if holder and holder[0] is not None:
            thread = threading.Thread(target=holder.clear, name="loader-retire", daemon=True)
            self._threads.append(thread)
            thread.start()

    def join(self) -> None:
        """Wait until everything retired so far is released."""
        for thread in self._threads:
            thread.join()
        self._threads = []


class TrainLoader:
    """What both backends share: the shard plan, the stream position, bad-sample counts, output format.

    Subclasses implement ``_next_batch() -> (view_q, view_k)`` for the current window and the backend part of
    ``state_dict``/``load_state_dict``.

    Windows (``pipeline.assignment``): a pass deals this rank a list of shards, read through
    ``windows_per_pass`` consecutive windows of at most ``data.window_shards`` shards, window ``w`` yielding
    ``batches`` of its own. A backend builds one reader (a DALI pipeline, DataLoader workers) per window, so
    a reader's memory and build time are bounded by the window whatever the rank's share. The stream is a
    sequence of windows numbered ``serial = pass_index * windows_per_pass + window`` (windows whose quota is 0
    are skipped); the backends name a window by its serial. The pass's plan is dealt once, when the pass (or its
    first prepared window) is first needed, and kept while the pass is read.

    Window boundaries (every pass boundary is one): built at the boundary, a reader's start-up is a stall of
    seconds, which a small corpus of a few batches per pass pays every few batches. So once at most
    ``prepare_ahead`` batches of the window are left (and at least one has been delivered),
    ``_prepare_next_window()`` starts preparing the next window's reader while this one still delivers, and
    ``_start_window()`` switches to it at the boundary. What is prepared is exactly what the boundary would
    build, so the stream is the same bits with or without it; ``prepare_ahead = None`` turns it off.

    Start-up costs the same whatever the rank's share: the manifest read (O(shards in the manifest), inherent:
    every rank deals from the whole list), one plan, and the checks of the first window's shards. Every other
    shard is checked when a window holding it is prepared (``pipeline.shard_check``; both backends check in a
    background thread, off the training thread, the PyTorch one from the first batch of the window before), so a
    damaged shard is found then: counted and said once on stderr by the loader's thread (:meth:`_note_found`), and
    left out of that window's reader.
    """

    backend = ""
    prepare_ahead: int | None = None  # set by each backend; None: build the next window's reader at the boundary

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.recipe: Recipe = RECIPES[cfg.data.recipe]
        self.manifest: Manifest = read_manifest(cfg.data.shards)  # raises naming a missing shard or index file
        self.shard_checks = ShardChecks(self.manifest)
        self.local_batch_size = global_batch(cfg, dist.world_size) // dist.world_size
        # The samples column as it is stored: no ShardEntry made per shard (1.3 us each, O(manifest) per rank).
        self.plan = ShardPlan(self.manifest.shards.samples, dist.world_size, cfg.run.seed)
        self.window_shards = cfg.data.window_shards
        self.windows_per_pass = self.plan.windows_per_pass(self.window_shards)
        self.batches_per_pass = self.plan.batches_per_pass(self.local_batch_size, self.window_shards)
        self.device = dist.device
        self.dtype = resolve_dtype(cfg, self.device)
        self._passes: dict[int, RankPass] = {}  # this rank's share of the passes being read or prepared
        self.pass_index = 0
        self.batch_in_pass = 0
        self.window, self.batch_in_window = self._first_window(0), 0
        self.bad = BadSampleLog()
        self.windows_prepared_ahead = 0  # window boundaries that switched to a reader prepared ahead (not built there)
        self.passes_prepared_ahead = 0  # the pass boundaries among them
        self.retirer = Retirer()
        # The first window's shards are checked now: a corpus of which nothing can be read fails here, before training.
        self.readable_window(self.window_serial)
        self._note_found()

    # ------------------------------------------------------------------ stream
    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_in_window >= self.window_batches(self.window_serial):
            pass_index, self.window = divmod(self.next_window(self.window_serial), self.windows_per_pass)
            new_pass = pass_index != self.pass_index
            if new_pass:
                self.pass_index, self.batch_in_pass = pass_index, 0
                self._passes = {p: share for p, share in self._passes.items() if p >= pass_index}
            self.batch_in_window = 0
            if self._start_window():
                self.windows_prepared_ahead += 1
                self.passes_prepared_ahead += new_pass
        views = self._next_batch()
        self._note_found()
        self.batch_in_window += 1
        self.batch_in_pass += 1
        left = self.window_batches(self.window_serial) - self.batch_in_window
        if self.prepare_ahead is not None and left <= self.prepare_ahead:
            self._prepare_next_window()
        return views

    @property
    def window_serial(self) -> int:
        """The current window's number in the stream: ``pass_index * windows_per_pass + window``."""
        return self.pass_index * self.windows_per_pass + self.window

    @property
    def bad_samples(self) -> int:
        """Unreadable samples found and skipped so far (on this rank), every sample of a dropped shard included."""
        return self.bad.count

    @property
    def bad_sample_locations(self) -> list[str]:
        """Where the unreadable samples are, as ``<tar>:<offset>:<member>`` (dropped shards: ``dropped_shards``)."""
        return list(self.bad.locations)

    @property
    def dropped_shards(self) -> dict[str, int]:
        """Shards that cannot be read at all: tar path -> the samples the manifest gives it."""
        return dict(self.bad.dropped)

    def rank_pass(self, pass_index: int) -> RankPass:
        """This rank's share of ``pass_index`` (dealt on first use, then kept while the pass is read)."""
        share = self._passes.get(pass_index)
        if share is None:
            share = self.plan.rank_pass(pass_index, self.dist.rank, self.local_batch_size, self.window_shards)
            self._passes[pass_index] = share
        return share

    def my_shards(self, pass_index: int) -> list[int]:
        """This rank's shard indices for ``pass_index``, in reading order."""
        return self.rank_pass(pass_index).shards.tolist()

    def window_shards_of(self, serial: int) -> np.ndarray:
        """Shard indices of window ``serial`` of the stream, in reading order."""
        pass_index, window = divmod(serial, self.windows_per_pass)
        return self.rank_pass(pass_index).window(window)

    def window_batches(self, serial: int) -> int:
        """Batches this rank yields from window ``serial`` of the stream."""
        pass_index, window = divmod(serial, self.windows_per_pass)
        return int(self.rank_pass(pass_index).batches[window])

    def next_window(self, serial: int) -> int:
        """The serial of the first window after ``serial`` that yields batches."""
        serial += 1
        while self.window_batches(serial) == 0:
            serial += 1
        return serial

    def _first_window(self, pass_index: int) -> int:
        return self.next_window(pass_index * self.windows_per_pass - 1) - pass_index * self.windows_per_pass

    # ------------------------------------------------------------------ output format
    def finish(self, views: torch.Tensor) -> torch.Tensor:
        """Move to the device, cast to the training dtype and set the memory format.

        Args:
            views: N x 3 x S x S (any strides), already normalised.

        Returns:
            N x 3 x S x S on ``self.device`` in ``self.dtype``, channels_last when configured.
        """
        fmt = torch.channels_last if self.cfg.data.channels_last else torch.contiguous_format
        views = views.to(self.device, non_blocking=True)
        return views.to(dtype=self.dtype, memory_format=fmt)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The stream position; only plain types and tensors, so ``torch.load(weights_only=True)`` reads it.

        A few numbers, whatever the rank's share: the shard lists are dealt again from the seed on resume.
        """
        self._note_found()  # damage found by a check ahead of its window is counted in the checkpoint
        return {
            "version": STATE_VERSION, "backend": self.backend, "world_size": self.dist.world_size,
            "rank": self.dist.rank, "seed": self.cfg.run.seed, "local_batch_size": self.local_batch_size,
            "windows_per_pass": self.windows_per_pass, "pass_index": self.pass_index, "window": self.window,
            "batch_in_window": self.batch_in_window, "batch_in_pass": self.batch_in_pass,
            "bad_sample_locations": list(self.bad.locations), "bad_batches": self.bad.bad_batches,
            "dropped_shards": dict(self.bad.dropped),
            "readable": [len(self.plan.sizes), int(self.plan.sizes.sum())],  # what the plan dealt
            **self._backend_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (same backend, world size, seed, batch and windows per pass)."""
        expect = {"version": STATE_VERSION, "backend": self.backend, "world_size": self.dist.world_size,
                  "rank": self.dist.rank, "seed": self.cfg.run.seed, "local_batch_size": self.local_batch_size,
                  "windows_per_pass": self.windows_per_pass}
        for key, want in expect.items():
            if state.get(key) != want:
                hint = " (data.window_shards decides it)" if key == "windows_per_pass" else ""
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this run has {want!r}{hint}; "
                                 f"an exact resume needs the same value")
        self.pass_index = int(state["pass_index"])
        self.window = int(state["window"])
        self.batch_in_window = int(state["batch_in_window"])
        self.batch_in_pass = int(state["batch_in_pass"])
        self._passes = {}
        self.bad = BadSampleLog(state["bad_sample_locations"], int(state["bad_batches"]), state.get("dropped_shards"))
        self._note_damage(self.shard_checks.damaged(), warn=False)  # found since the checkpoint (said when found)
        readable = [len(self.plan.sizes), int(self.plan.sizes.sum())]
        if state.get("readable", readable) != readable and self.dist.is_main:
            print(f"warning: the shards the plan deals changed since the checkpoint ({state['readable'][0]} shards, "
                  f"{state['readable'][1]} samples then, {readable[0]} / {readable[1]} now): the data order differs "
                  "from the uninterrupted run", file=sys.stderr, flush=True)
        self._load_backend_state(state)

    # ------------------------------------------------------------------ damaged shards
    def readable_window(self, serial: int) -> list[int]:
        """The shards the reader of window ``serial`` reads (call it where a reader's shard list is built): the
        window's shards less those found unreadable, each checked on first use. Readers never run dry (they
        cycle), so the window still yields its quota of batches. A window left with no shard at all reads, in
        their place, the first readable shards (as many as the window has) of the rest of the rank's share of
        the pass, then of the whole manifest, both taken cyclically from the window on: a rank dealt nothing
        readable (a tiny corpus) still yields its batches.

        Safe to call from a thread preparing a window ahead: it checks, the loader's thread counts
        (:meth:`_note_found`).

        Raises:
            ManifestError: no shard of the manifest can be read.
        """
        window = self.window_shards_of(serial).tolist()
        self.shard_checks.check_many(window)  # several at once in object storage (each check mostly waits on it)
        kept = [i for i in window if self.shard_checks.check(i).usable]
        if kept:
            return kept
        share = self.rank_pass(serial // self.windows_per_pass)
        after = int(share.bounds[serial % self.windows_per_pass + 1])  # where the window ends in the share
        total = len(self.manifest.shards)
        for candidates in (np.roll(share.shards, -after), (np.arange(total) + window[0]) % total):
            for i in candidates.tolist():
                if self.shard_checks.check(i).usable:
                    kept.append(i)
                    if len(kept) == len(window):
                        return kept
            if kept:
                return kept
        first = self.shard_checks.check(window[0])
        raise ManifestError(f"none of the {total} shards of {self.manifest.root} can be read (first: {first.tar}: "
                            f"{first.problem}); run `python -m shards verify {self.manifest.root}`")

    def note_bad_sample(self, loc: str) -> bool:
        """Count the unreadable sample at ``loc`` (``<tar>:<offset>:<member>``: it does not decode, or its bytes
        came back short) and say so once; False if it was known."""
        if not self.bad.add(loc):
            return False
        who = f"rank {self.dist.rank}: " if self.dist.world_size > 1 else ""
        print(f"warning: {who}skipped an unreadable sample at {loc}", file=sys.stderr, flush=True)
        return True

    def _note_found(self) -> None:
        """Count and report the damaged shards the checks found since the last call (in any thread)."""
        found = self.shard_checks.take_found()
        if found:
            self._note_damage(found)

    def _note_damage(self, found: list[tuple[int, ShardCheck]], warn: bool = True) -> None:
        """Count the samples the verdicts ``found`` (``(shard index, verdict)``) say are unreadable; with ``warn``,
        one line per damaged shard on stderr (naming the rank: each rank counts what its own windows' checks find,
        and a shard dealt to two ranks in two passes is counted by both)."""
        who = f"rank {self.dist.rank}: " if self.dist.world_size > 1 else ""
        for i, check in found:
            if not check.usable:
                samples = self.manifest.shards[i].samples
                if self.bad.drop(check.tar, samples) and warn:
                    print(f"warning: {who}shard {check.tar} dropped ({samples} samples): {check.problem}",
                          file=sys.stderr, flush=True)
                continue
            new = [loc for loc in check.lost if self.bad.add(loc)]
            if new and warn:
                print(f"warning: {who}shard {check.tar}: {check.note or 'samples without a .jpg member'}; "
                      f"{len(new)} samples skipped, the rest is read", file=sys.stderr, flush=True)
            if check.bad_headers and warn:
                print(f"warning: {who}shard {check.tar}: {len(check.bad_headers)} corrupt member headers (the first "
                      f"at offset {check.bad_headers[0].offset}); nothing lost, samples are read at the index's "
                      "offsets", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Release workers, pipelines and temporary files."""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # ------------------------------------------------------------------ for subclasses
    def _start_window(self) -> bool:
        """Switch to the reader of the (new) current window: the one prepared ahead, or none (built on demand).

        Returns:
            Whether it switched to a reader prepared ahead.
        """
        raise NotImplementedError

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _prepare_next_window(self) -> None:
        """Start preparing the reader of window ``next_window(window_serial)`` (called after every batch near the
        end of a window: when it is already under way, a no-op or a look at whether a step of it is done)."""

    def _backend_state(self) -> dict[str, Any]:
        return {}

    def _load_backend_state(self, state: dict[str, Any]) -> None:
        pass
