"""The DALI backend: per-rank WebDataset shards -> two views on the GPU (or with CPU operators only).

One DALI pipeline per window (``pipeline.assignment``): its reader sees only the at most ``data.window_shards``
shards of one window of this rank's share of a pass (DALI's own ``num_shards``/``shard_id`` would make every
rank open and index every tar; one reader over a rank's whole share indexes every sample it is dealt, ~225 B
each, and fails past ~32k shards with "Too many open files"). Its position is a DALI pipeline checkpoint, which
restores the reader and every random generator exactly; at a window boundary there is nothing to restore (the
next window's pipeline starts from its seeds).

A corrupt sample makes ``pipe.run()`` raise and that batch is lost. We then replay the reader alone
(same paths, index files and seed, no decoding) up to the failed batch, decode-check its samples on the
CPU to name the culprit by its ``source_info`` (``tar:offset:member``), drop it from a private copy of
its shard's index file, and restart the window's remaining batches with a new pipeline (a fresh reader
seed, starting again at the first of the window's shards). The restart is deterministic, so resuming from a
checkpoint taken after it still reproduces the uninterrupted stream.

The next window's pipeline (the next pass's first at a pass boundary) is built ahead, in a background thread,
once ``prepare_ahead`` batches of the window are left; the thread first checks the window's shards
(``pipeline.shard_check``) and also runs the first batch, so at the boundary the loader only swaps pipelines
(building at the boundary cost 0.4-2 s per pass on an H200). It is built from the same paths, filtered indexes
and seeds as a build at the boundary, hence the same stream; if a corrupt sample found after it was started
changes what the window's reader must leave out, it is thrown away and the boundary builds afresh. DALI allows
this: the pipeline being defined is thread-local (``Pipeline.current()``), operator ids come from a locked
counter, and separate pipelines may be built and run in separate threads (DALI's own multithreading tests run one
pipeline per thread); the new pipeline is touched by the background thread only until the loader joins it.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types

from config import Config
from distributed import DistInfo
from pipeline.assignment import derive_seed
from pipeline.bad_samples import BadSampleLog, decodes, filtered_index
from pipeline.base import TrainLoader
from pipeline.dali_graph import two_views

READER = "reader"
# Batches before the end of a window at which the next window's pipeline starts building: about 3 s at DALI GPU's
# 12 ms per batch of 256 on an H200, where the build and first batch took up to 2 s. Earlier costs only memory
# (the second pipeline and its first batches wait for the boundary).
PREPARE_AHEAD = 256


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n - 1).bit_length()))


class _NextWindow:
    """The pipeline of window ``window`` of the stream, built and run for its first batch in a background thread.

    Args:
        window: the window it reads (``TrainLoader.window_serial``).
        bad: the known-bad sample locations it was built without (its filtered indexes).
        files: checks the window's shards and returns what its reader reads (called in the thread first).
        build: builds the pipeline (called in the thread).
    """

    def __init__(self, window: int, bad: tuple[str, ...], files: Callable[[], list[tuple[str, str, frozenset]]],
                 build: Callable[[], Pipeline]):
        self.window, self.bad = window, bad
        self.files: list[tuple[str, str, frozenset]] | None = None  # (tar, index, names left out) it was built from
        self.pipe: Pipeline | None = None
        self.first: Any = None  # the first batch's DALI outputs, or the exception its run raised
        self.error: BaseException | None = None  # what checking or building it raised
        self._thread = threading.Thread(target=self._run, args=(files, build), name=f"dali-window-{window}",
                                        daemon=True)
        self._thread.start()

    def _run(self, files: Callable[[], list[tuple[str, str, frozenset]]], build: Callable[[], Pipeline]) -> None:
        try:
            self.files = files()
            self.pipe = build()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the loader at the boundary
            self.error = exc
            return
        try:
            self.first = self.pipe.run()
        except Exception as exc:  # noqa: BLE001 - a corrupt sample: the loader handles it as if it had run it
            self.first = exc

    def wait(self) -> _NextWindow:
        self._thread.join()
        return self

    def discard(self) -> None:
        self.wait()
        self.pipe = self.first = None


class DaliLoader(TrainLoader):
    """DALI two-view loader (GPU decode with ``device="mixed"`` or CPU operators with ``device_id=None``)."""

    backend = "dali"

    def __init__(self, cfg: Config, dist: DistInfo):
        super().__init__(cfg, dist)
        want = cfg.data.dali_device
        if want == "auto":
            want = "gpu" if self.device.type == "cuda" else "cpu"
        if want == "gpu" and self.device.type != "cuda":
            raise ValueError("data.dali_device=gpu needs a CUDA training device")
        self.gpu = want == "gpu"
        self.restarts = 0  # pipelines restarted in this window after a corrupt batch
        self.restart_at = 0  # batch_in_window at which the current pipeline (re)started its reader
        self._pipe: Pipeline | None = None
        self._first: Any = None  # the current pipeline's first batch when it was run ahead (or its exception)
        self._next: _NextWindow | None = None
        self.prepare_ahead = PREPARE_AHEAD
        self._index_dir = Path(tempfile.mkdtemp(prefix="moco-dali-idx-"))

    # ------------------------------------------------------------------ building
    def _window_files(self, window: int, bad: BadSampleLog) -> list[tuple[str, str, frozenset]]:
        """What the reader of ``window`` (a serial) reads: ``(tar, index, member names left out)`` per shard, its
        shards checked first. Left out: the samples in ``bad`` and those the shard check found lost (beyond the
        end of a truncated tar). Thread-safe: the next window's thread calls it."""
        drop = bad.names_by_tar()
        files = []
        for i in self.readable_window(window):
            entry = self.manifest.shards[i]
            tar = str(self.manifest.tar_path(entry))
            names = drop.get(tar, set()) | {loc.rsplit(":", 1)[1] for loc in self.shard_checks.check(i).lost}
            files.append((tar, str(self.manifest.index_path(entry)), frozenset(names)))
        return files

    def _paths(self, window: int, bad: BadSampleLog) -> tuple[list[str], list[str]]:
        """The tar and index paths of ``window`` (a serial), the samples left out filtered out of the index."""
        files = self._window_files(window, bad)
        tars = [tar for tar, _index, _names in files]
        indexes = [str(filtered_index(index, set(names), self._index_dir)) if names else index
                   for _tar, index, names in files]
        return tars, indexes

    def _seed(self, what: str, window: int, restarts: int) -> int:
        return derive_seed(what, self.cfg.run.seed, window, self.dist.rank, restarts)

    def _reader(self, window: int, restarts: int, bad: BadSampleLog):
        buffer = self.cfg.data.shuffle_buffer
        tars, indexes = self._paths(window, bad)
        # dont_use_mmap: a mapped tar cut while it is read (cp over it, a failing disk) kills the process with
        # SIGBUS, no checkpoint, no message; read() instead fails the batch, which _handle_failed_batch recovers
        # from. The cost is a copy per sample; DALI's docs: mapping gives a small benefit on local file systems,
        # none on most network ones.
        return fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg"], missing_component_behavior="error",
            random_shuffle=buffer > 0, initial_fill=max(buffer, 1), seed=self._seed("reader", window, restarts),
            pad_last_batch=False, dont_use_mmap=True, name=READER)

    def _decoder_args(self) -> dict[str, Any]:
        if not self.gpu:
            return {}
        # Memory hints from the manifest: nvJPEG's buffers sized once for the largest sample, not regrown.
        args: dict[str, Any] = {
            "hw_decoder_load": self.cfg.data.hw_decoder_load,
            "host_memory_padding": _pow2_at_least(2 * self.manifest.max_sample_bytes, 8 << 20),
        }
        opts = self.manifest.options or {}
        short, aspect = int(opts.get("short_side") or 0), float(opts.get("max_aspect") or 0)
        if short > 0 and aspect > 0:
            long_side = int(short * aspect)
            args.update(preallocate_width_hint=long_side, preallocate_height_hint=long_side,
                        device_memory_padding=_pow2_at_least(3 * long_side * short, 16 << 20))
        return args

    def _make_pipe(self, window: int, restarts: int, bad: BadSampleLog, checkpoint: bytes | None = None
                   ) -> Pipeline:
        """The pipeline of ``window`` (a serial) after ``restarts`` restarts, without the samples in ``bad``."""
        half = self.gpu and self.dtype == torch.float16
        pipe = Pipeline(
            batch_size=self.local_batch_size, num_threads=self.cfg.data.num_threads,
            device_id=(self.device.index or 0) if self.gpu else None, seed=self._seed("augment", window, restarts),
            prefetch_queue_depth=self.cfg.data.prefetch, enable_checkpointing=True, checkpoint=checkpoint)
        with pipe:
            jpegs = self._reader(window, restarts, bad)
            q, k = two_views(jpegs, self.recipe, self.cfg.data.crop_size, "mixed" if self.gpu else "cpu",
                             types.FLOAT16 if half else types.FLOAT, "HWC" if self.cfg.data.channels_last else "CHW",
                             self.cfg.data.view_decode, self._decoder_args())
            pipe.set_outputs(q, k)
        pipe.build()
        return pipe

    def _prepare_next_window(self) -> None:
        if self._next is None:
            upcoming = self.next_window(self.window_serial)  # deals the next pass here, not in the thread
            bad = BadSampleLog(self.bad.locations)  # a copy: finds after this point must not reach the thread
            # The thread checks the window's shards (what it finds is counted by this thread, in __next__).
            self._next = _NextWindow(upcoming, tuple(bad.locations), lambda: self._window_files(upcoming, bad),
                                     lambda: self._make_pipe(upcoming, 0, bad))

    def _start_window(self) -> bool:
        switched = self._switch_to_next()
        self._keep_index_copies()  # no thread is preparing a window now
        return switched

    def _keep_index_copies(self) -> None:
        """Drop the local index copies (object storage) of every window but the current one: a restart after a
        corrupt sample rebuilds its reader from them, and the next window's are fetched as it is prepared, so at most
        two windows' copies are on disk (DALI parses a reader's index files when it is built)."""
        self.manifest.keep_index_copies(self.readable_window(self.window_serial))

    def _switch_to_next(self) -> bool:
        """Retire the last window's pipeline and take the one prepared ahead for this window, if it still fits."""
        holder, self._pipe, self._first = [self._pipe], None, None
        self.retirer.retire(holder)  # its shutdown waits for batches it prefetched beyond the window
        self.restarts = 0
        self.restart_at = 0
        upcoming, self._next = self._next, None
        if upcoming is None:
            return False
        upcoming.wait()
        if upcoming.window != self.window_serial or (
                upcoming.files != self._window_files(self.window_serial, self.bad) if upcoming.error is None
                else upcoming.bad != tuple(self.bad.locations)):
            upcoming.discard()  # corrupt samples of this window found since it was started: build afresh without them
            return False
        if upcoming.error is not None:
            upcoming.error.add_note(
                f"raised while building the DALI pipeline of pass {self.pass_index} (window {self.window} of "
                f"{self.windows_per_pass}) ahead of the window boundary, in a background thread")
            raise upcoming.error
        self._pipe, self._first = upcoming.pipe, upcoming.first
        return True

    def _discard_next(self) -> None:
        if self._next is not None:
            self._next.discard()
            self._next = None

    def _drop_pipe(self) -> None:
        self._first = None
        if self._pipe is not None:
            del self._pipe
            self._pipe = None

    # ------------------------------------------------------------------ running
    def _to_torch(self, out) -> torch.Tensor:
        """A DALI batch (N x S x S x 3 or N x 3 x S x S) as an N x 3 x S x S torch tensor."""
        if self.gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = out.as_tensor()
            dtype = torch.float16 if dense.dtype == types.FLOAT16 else torch.float32
            arr = torch.empty(dense.shape(), dtype=dtype, device=self.device)
            feed_ndarray(dense, arr, cuda_stream=torch.cuda.current_stream(self.device))
        else:
            arr = torch.from_numpy(np.array(out.as_tensor()))
        if self.cfg.data.channels_last:
            arr = arr.permute(0, 3, 1, 2)  # N x H x W x C memory seen as N x C x H x W: channels_last, no copy
        return self.finish(arr)

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._pipe is None:
                self._pipe = self._make_pipe(self.window_serial, self.restarts, self.bad)
            try:
                first, self._first = self._first, None
                if isinstance(first, Exception):
                    raise first
                q, k = first if first is not None else self._pipe.run()
            except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError for decode failures
                self._handle_failed_batch(exc)
                continue
            return self._to_torch(q), self._to_torch(k)

    def _handle_failed_batch(self, exc: Exception) -> None:
        """Find and record the corrupt sample(s) of the failed batch, then restart the window's pipeline."""
        self._drop_pipe()
        self._discard_next()  # built without the sample about to be found; prepared again after the next batch
        self.bad.bad_batches += 1
        try:
            found = [loc for loc in self._scan_failed_batch() if self.note_bad_sample(loc)]
        except Exception:  # noqa: BLE001 - the reader itself fails: a shard changed on disk after it was checked
            found = self._recheck_shards()
        if not found:  # too many bad samples is train.py's call (data.max_bad_samples, each item counted once over ranks)
            raise RuntimeError(f"DALI pipeline failed (no corrupt sample could be identified; {self.bad.bad_batches} "
                               "batches lost): "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        self.restarts += 1
        self.restart_at = self.batch_in_window

    def _recheck_shards(self) -> list[str]:
        """Check the shards this window reads afresh (not the rest of the pass); return what is newly found
        unreadable (locations, dropped tars)."""
        self._note_found()
        seen, dropped = len(self.bad.locations), len(self.bad.dropped)
        for i in self.readable_window(self.window_serial):
            self.shard_checks.forget(i)
        self.readable_window(self.window_serial)
        self._note_found()
        return self.bad.locations[seen:] + list(self.bad.dropped)[dropped:]

    def _scan_failed_batch(self) -> list[str]:
        """Replay the reader (no decoding) to the failed batch and return the locations that fail to decode.

        With prefetching, DALI may surface the error of any batch up to ``prefetch`` ahead, so those are
        checked too.
        """
        first = self.batch_in_window - self.restart_at
        last = first + self.cfg.data.prefetch
        pipe = Pipeline(batch_size=self.local_batch_size, num_threads=1, device_id=None,
                        seed=self._seed("augment", self.window_serial, self.restarts),
                        prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            jpegs = self._reader(self.window_serial, self.restarts, self.bad)
            pipe.set_outputs(jpegs, fn.get_property(jpegs, key="source_info"))
        pipe.build()
        bad: list[str] = []
        for b in range(last + 1):
            data, info = pipe.run()
            if b < first:
                continue
            for i in range(len(data)):
                if not decodes(np.array(data[i]).tobytes()):
                    bad.append(np.array(info[i]).tobytes().decode())
        del pipe
        return bad

    # ------------------------------------------------------------------ resume
    def _backend_state(self) -> dict[str, Any]:
        # At a window boundary the next window's pipeline starts from its seeds: nothing to restore.
        within = self.batch_in_window < self.window_batches(self.window_serial)
        blob = self._pipe.checkpoint() if self._pipe is not None and within else b""
        return {"restarts": self.restarts, "restart_at": self.restart_at,
                "dali_checkpoint": torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone() if blob
                else torch.zeros(0, dtype=torch.uint8)}

    def _load_backend_state(self, state: dict[str, Any]) -> None:
        self._discard_next()
        self._drop_pipe()
        self.restarts = int(state["restarts"])
        self.restart_at = int(state["restart_at"])
        self._keep_index_copies()
        blob = state["dali_checkpoint"]
        if blob.numel():
            self._pipe = self._make_pipe(self.window_serial, self.restarts, self.bad,
                                         checkpoint=bytes(blob.numpy().tobytes()))

    def close(self) -> None:
        if getattr(self, "_next", None) is not None:
            self._discard_next()
        self._drop_pipe()
        if getattr(self, "retirer", None) is not None:
            self.retirer.join()
        if getattr(self, "_index_dir", None) is not None:
            shutil.rmtree(self._index_dir, ignore_errors=True)
            self._index_dir = None
        if getattr(self, "manifest", None) is not None:
            self.manifest.index_copies.close()
