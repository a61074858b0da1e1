"""The DALI backend: per-rank WebDataset shards -> two views on the GPU (or with CPU operators only).

One DALI pipeline per pass and rank, whose reader sees only this rank's shards for that pass (DALI's own
``num_shards``/``shard_id`` would make every rank open and index every tar). Its position is a DALI
pipeline checkpoint, which restores the reader and every random generator exactly.

A corrupt sample makes ``pipe.run()`` raise and that batch is lost. We then replay the reader alone
(same paths, index files and seed, no decoding) up to the failed batch, decode-check its samples on the
CPU to name the culprit by its ``source_info`` (``tar:offset:member``), drop it from a private copy of
its shard's index file, and restart the pass's remaining batches with a new pipeline (a fresh reader
seed, starting again at the first of the rank's shards). The restart is deterministic, so resuming from a
checkpoint taken after it still reproduces the uninterrupted stream.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvidia.dali import Pipeline, fn, types

from config import Config
from distributed import DistInfo
from pipeline.assignment import derive_seed
from pipeline.bad_samples import decodes, filtered_index
from pipeline.dali_graph import two_views
from pipeline.loader import TrainLoader

READER = "reader"


def _pow2_at_least(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n - 1).bit_length()))


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
        self.restarts = 0  # pipelines restarted in this pass after a corrupt batch
        self.restart_at = 0  # batch_in_pass at which the current pipeline (re)started its reader
        self._pipe: Pipeline | None = None
        self._index_dir = Path(tempfile.mkdtemp(prefix="moco-dali-idx-"))

    # ------------------------------------------------------------------ building
    def _paths(self) -> tuple[list[str], list[str]]:
        """This rank's tar and index paths for the current pass, known-bad samples filtered out of the index."""
        drop = self.bad.names_by_tar()
        tars, indexes = [], []
        for i in self.my_shards(self.pass_index):
            entry = self.manifest.shards[i]
            tar, index = str(self.manifest.tar_path(entry)), self.manifest.index_path(entry)
            tars.append(tar)
            indexes.append(str(filtered_index(index, drop[tar], self._index_dir) if tar in drop else index))
        return tars, indexes

    def _seed(self, what: str) -> int:
        return derive_seed(what, self.cfg.run.seed, self.pass_index, self.dist.rank, self.restarts)

    def _reader(self, tars: list[str], indexes: list[str]):
        buffer = self.cfg.data.shuffle_buffer
        return fn.readers.webdataset(
            paths=tars, index_paths=indexes, ext=["jpg"], missing_component_behavior="error",
            random_shuffle=buffer > 0, initial_fill=max(buffer, 1), seed=self._seed("reader"),
            pad_last_batch=False, name=READER)

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

    def _make_pipe(self, checkpoint: bytes | None = None) -> Pipeline:
        tars, indexes = self._paths()
        half = self.gpu and self.dtype == torch.float16
        pipe = Pipeline(
            batch_size=self.local_batch_size, num_threads=self.cfg.data.num_threads,
            device_id=(self.device.index or 0) if self.gpu else None, seed=self._seed("augment"),
            prefetch_queue_depth=self.cfg.data.prefetch, enable_checkpointing=True, checkpoint=checkpoint)
        with pipe:
            jpegs = self._reader(tars, indexes)
            q, k = two_views(jpegs, self.recipe, self.cfg.data.crop_size, "mixed" if self.gpu else "cpu",
                             types.FLOAT16 if half else types.FLOAT, "HWC" if self.cfg.data.channels_last else "CHW",
                             self.cfg.data.view_decode, self._decoder_args())
            pipe.set_outputs(q, k)
        pipe.build()
        return pipe

    def _start_pass(self) -> None:
        self._drop_pipe()
        self.restarts = 0
        self.restart_at = 0

    def _drop_pipe(self) -> None:
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
                self._pipe = self._make_pipe()
            try:
                q, k = self._pipe.run()
            except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError for decode failures
                self._handle_failed_batch(exc)
                continue
            return self._to_torch(q), self._to_torch(k)

    def _handle_failed_batch(self, exc: Exception) -> None:
        """Find and record the corrupt sample(s) of the failed batch, then restart the pass's pipeline."""
        self._drop_pipe()
        self.bad.bad_batches += 1
        found = [loc for loc in self._scan_failed_batch() if self.bad.add(loc)]
        if self.bad.bad_batches > self.cfg.data.max_bad_batches or not found:
            reason = "no corrupt sample could be identified" if not found else "data.max_bad_batches exceeded"
            raise RuntimeError(f"DALI pipeline failed ({reason}; {self.bad.bad_batches} batches lost): "
                               f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        self.restarts += 1
        self.restart_at = self.batch_in_pass

    def _scan_failed_batch(self) -> list[str]:
        """Replay the reader (no decoding) to the failed batch and return the locations that fail to decode.

        With prefetching, DALI may surface the error of any batch up to ``prefetch`` ahead, so those are
        checked too.
        """
        first = self.batch_in_pass - self.restart_at
        last = first + self.cfg.data.prefetch
        pipe = Pipeline(batch_size=self.local_batch_size, num_threads=1, device_id=None, seed=self._seed("augment"),
                        prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        with pipe:
            jpegs = self._reader(*self._paths())
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
        blob = self._pipe.checkpoint() if self._pipe is not None else b""
        return {"restarts": self.restarts, "restart_at": self.restart_at,
                "dali_checkpoint": torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone() if blob
                else torch.zeros(0, dtype=torch.uint8)}

    def _load_backend_state(self, state: dict[str, Any]) -> None:
        self._drop_pipe()
        self.restarts = int(state["restarts"])
        self.restart_at = int(state["restart_at"])
        blob = state["dali_checkpoint"]
        if blob.numel():
            self._pipe = self._make_pipe(checkpoint=bytes(blob.numpy().tobytes()))

    def close(self) -> None:
        self._drop_pipe()
        if getattr(self, "_index_dir", None) is not None:
            shutil.rmtree(self._index_dir, ignore_errors=True)
            self._index_dir = None
