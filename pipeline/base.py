"""What every loader backend shares: the stream position over passes, the shard plan, bad-sample counts, output format."""

from __future__ import annotations

import threading
from typing import Any

import torch

from config import Config, global_batch
from distributed import DistInfo
from pipeline.assignment import ShardPlan
from pipeline.bad_samples import BadSampleLog
from pipeline.recipes import RECIPES, Recipe
from shards.manifest import Manifest, read_manifest

STATE_VERSION = 1


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

    Subclasses implement ``_next_batch() -> (view_q, view_k)`` for the current ``(pass_index, batch_in_pass)``
    and the backend part of ``state_dict``/``load_state_dict``.

    Pass boundaries: every pass re-deals the shards, so a backend needs a new reader (a DALI pipeline, new
    DataLoader workers) for the next pass. Built at the boundary, its start-up is a stall of seconds, which a
    small corpus of a few batches per pass pays every few batches. So once at most ``prepare_ahead`` batches of
    the pass are left (and at least one has been delivered), ``_prepare_next_pass()`` starts preparing the next
    pass's reader while this one still delivers, and ``_start_pass()`` switches to it at the boundary. What is
    prepared is exactly what the boundary would build, so the stream is the same bits with or without it;
    ``prepare_ahead = None`` turns it off.
    """

    backend = ""
    prepare_ahead: int | None = None  # set by each backend; None: build the next pass's reader at the boundary

    def __init__(self, cfg: Config, dist: DistInfo):
        self.cfg = cfg
        self.dist = dist
        self.recipe: Recipe = RECIPES[cfg.data.recipe]
        self.manifest: Manifest = read_manifest(cfg.data.shards)  # raises naming a missing shard or index file
        self.local_batch_size = global_batch(cfg, dist.world_size) // dist.world_size
        self.plan = ShardPlan(tuple(s.samples for s in self.manifest.shards), dist.world_size, cfg.run.seed)
        self.batches_per_pass = self.plan.batches_per_pass(self.local_batch_size)
        self.device = dist.device
        self.dtype = resolve_dtype(cfg, self.device)
        self.pass_index = 0
        self.batch_in_pass = 0
        self.bad = BadSampleLog()
        self.passes_prepared_ahead = 0  # boundaries that switched to a reader prepared ahead (not built there)
        self.retirer = Retirer()

    # ------------------------------------------------------------------ stream
    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_in_pass >= self.batches_per_pass:
            self.pass_index += 1
            self.batch_in_pass = 0
            self._start_pass()
        views = self._next_batch()
        self.batch_in_pass += 1
        if self.prepare_ahead is not None and self.batches_per_pass - self.batch_in_pass <= self.prepare_ahead:
            self._prepare_next_pass()
        return views

    @property
    def bad_samples(self) -> int:
        """Corrupt samples found and skipped so far (on this rank)."""
        return len(self.bad.locations)

    @property
    def bad_sample_locations(self) -> list[str]:
        """Where the corrupt samples are, as ``<tar>:<offset>:<member>``."""
        return list(self.bad.locations)

    def my_shards(self, pass_index: int) -> list[int]:
        """This rank's shard indices for ``pass_index``, in reading order."""
        return self.plan.assign(pass_index)[self.dist.rank]

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
        """The stream position; only plain types and tensors, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "version": STATE_VERSION, "backend": self.backend, "world_size": self.dist.world_size,
            "rank": self.dist.rank, "seed": self.cfg.run.seed, "local_batch_size": self.local_batch_size,
            "pass_index": self.pass_index, "batch_in_pass": self.batch_in_pass,
            "shards": self.my_shards(self.pass_index),  # this pass's shard indices (informational: logs, tests)
            "bad_sample_locations": list(self.bad.locations), "bad_batches": self.bad.bad_batches,
            **self._backend_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` was taken (same backend, world size, seed and batch)."""
        expect = {"version": STATE_VERSION, "backend": self.backend, "world_size": self.dist.world_size,
                  "rank": self.dist.rank, "seed": self.cfg.run.seed, "local_batch_size": self.local_batch_size}
        for key, want in expect.items():
            if state.get(key) != want:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this run has {want!r}; "
                                 f"an exact resume needs the same value")
        self.pass_index = int(state["pass_index"])
        self.batch_in_pass = int(state["batch_in_pass"])
        self.bad = BadSampleLog(state["bad_sample_locations"], int(state["bad_batches"]))
        self._load_backend_state(state)

    def close(self) -> None:
        """Release workers, pipelines and temporary files."""

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finaliser
            pass

    # ------------------------------------------------------------------ for subclasses
    def _start_pass(self) -> None:
        raise NotImplementedError

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _prepare_next_pass(self) -> None:
        """Start preparing pass ``pass_index + 1``'s reader (called after every batch near the end of a pass:
        a no-op when it is already under way)."""

    def _backend_state(self) -> dict[str, Any]:
        return {}

    def _load_backend_state(self, state: dict[str, Any]) -> None:
        pass
