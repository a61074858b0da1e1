"""The plain PyTorch backend: tar reading at the index offsets + torchvision.transforms.v2 + DataLoader workers.

The baseline for the benchmarks and the fallback where DALI is absent; same recipe, same per-rank shard
plan, read window after window (``pipeline.assignment``). Within a window, its shards are dealt round-robin to
``W`` streams (one per DataLoader worker, ``W = min(num_threads, shards of the window)``). Each stream cycles
through its shards forever (reshuffled every cycle), so the DataLoader's strict round-robin makes batch ``j`` of
the window come from stream ``j % W``. Every random draw is seeded from (seed, window serial, rank, stream,
sample position), so a resumed stream skips the samples it already consumed without decoding them and then
produces the same bits.

Window boundaries (every pass boundary is one): each window has its own DataLoader (the shards, and so the
streams, change). A stream stops after its share of the window's batches, so the workers go idle, and shut down
at once, when the window ends
(endless streams kept computing batches nobody would take, and shutting them down waited for those, up to
5 s per worker). Even idle, a forked worker takes tens of milliseconds to exit (the kernel tears down its
copy of this process's address space), so the finished window's DataLoader is shut down in a background thread
(``TrainLoader.retirer``).
The next window's shards are checked (``pipeline.shard_check``) in a background thread started at the window's
first batch: on object storage that is a size request and ~4 small reads per shard, ~1,000 requests for a window of
256 shards, which stalled the training step when they ran on the loader's thread, and which can outlast the
``prepare_ahead`` batches before the window's end. From ``prepare_ahead`` batches before the end, the loader's
thread looks after each batch whether the checks are done and then forks the next window's DataLoader itself
(forking while another thread runs could copy a lock that thread holds into the workers), so its workers have their
first batches ready by the boundary; at the window's last batch it waits for the checks, as the boundary would
have to. It counts and reports what they found (``TrainLoader._note_found``). The reader is started from the same
verdicts whenever the checks end, so the stream is the same bits.
"""

from __future__ import annotations

import random
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from config import Config
from distributed import DistInfo
from pipeline.assignment import derive_seed
from pipeline.bad_samples import location
from pipeline.base import TrainLoader
from pipeline.recipes import Recipe
from shards import storage
from shards.check import jpg_file
from shards.writer import read_index


def build_view_transform(recipe: Recipe, size: int) -> v2.Compose:
    """One view's torchvision v2 transform on a uint8 3 x H x W tensor (normalisation happens on the device)."""
    jitter = v2.ColorJitter(recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
    gray = v2.RandomGrayscale(p=recipe.grayscale_p)
    steps: list[Any] = [v2.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=recipe.crop_ratio, antialias=True)]
    color = [v2.RandomApply([jitter], p=recipe.jitter_p)]
    steps += [gray, *color] if recipe.grayscale_first else [*color, gray]
    if recipe.blur_p > 0:
        # The kernel covers +-3 sigma of the largest sigma, as DALI's default window does per sample.
        kernel = 2 * int(-(-3 * recipe.blur_sigma[1] // 1)) + 1
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=recipe.blur_sigma)], p=recipe.blur_p))
    steps.append(v2.RandomHorizontalFlip(p=recipe.flip_p))
    return v2.Compose(steps)


_MAX_FAILURES_IN_A_ROW = 1000  # a stream that decodes nothing would otherwise spin forever


def indexed_samples(urls: list[str], index_of: dict[str, str], lost_of: dict[str, set[str]]) -> Iterator[dict]:
    """The samples of the tars at ``urls``, in order, read at the offsets of their index.

    Like DALI's reader, this never parses the tar's member headers: a corrupt header (which ends a ``tarfile``
    walk early, silently) loses nothing. A sample whose bytes come back short (the tar was cut after it was
    checked) yields ``jpg = None``, so it is counted as unreadable.

    Args:
        urls: tar paths.
        index_of: per tar, its (local) index file.
        lost_of: per damaged tar, the ``.jpg`` members the shard check found unreadable (left out).

    Yields:
        ``{"__key__", "__url__", "jpg", "offset", "name"}`` per sample with a ``.jpg`` member.
    """
    for url in urls:
        lost = lost_of.get(url, set())
        records = [(rec.key, *jpg[1:]) for rec in read_index(index_of[url])
                   if (jpg := jpg_file(rec)) is not None and jpg[3] not in lost]
        with storage.open_file(url, readahead=storage.READAHEAD) as fh:  # a local path or an s3:// / gs:// URL
            for key, offset, size, name in records:
                fh.seek(offset)
                data = fh.read(size)
                yield {"__key__": key, "__url__": url, "jpg": data if len(data) == size else None, "offset": offset,
                       "name": name}


def _one_thread_per_worker(_: int) -> None:
    torch.set_num_threads(1)  # parallelism comes from the workers; intra-op threads would oversubscribe the cores


class _WindowStreams(IterableDataset):
    """The streams of one window on one rank; DataLoader worker ``w`` runs stream ``(w + rotate) % W``."""

    def __init__(self, shard_urls: list[str], index_of: dict[str, str], lost_of: dict[str, set[str]], num_streams: int,
                 batch: int, recipe: Recipe, size: int, buffer: int, seed_parts: tuple, skip: list[int], rotate: int,
                 quota: list[int]):
        self.shard_urls, self.index_of, self.lost_of = shard_urls, index_of, lost_of
        self.num_streams, self.batch = num_streams, batch
        self.recipe, self.size, self.buffer, self.seed_parts = recipe, size, buffer, seed_parts
        self.skip, self.rotate, self.quota = skip, rotate, quota  # quota: batches left to yield, per stream

    def _raw(self, stream: int) -> Iterator[dict]:
        """Samples of this stream's shards, cycling, through a seeded shuffle buffer."""
        mine = self.shard_urls[stream::self.num_streams]
        rng = random.Random(derive_seed("buffer", *self.seed_parts, stream))
        buf: list[dict] = []
        cycle = 0
        while True:
            order = list(mine)
            random.Random(derive_seed("cycle", *self.seed_parts, stream, cycle)).shuffle(order)
            for sample in indexed_samples(order, self.index_of, self.lost_of):
                if self.buffer <= 1:
                    yield sample
                    continue
                buf.append(sample)
                if len(buf) >= self.buffer:
                    i = rng.randrange(len(buf))
                    buf[i], buf[-1] = buf[-1], buf[i]
                    yield buf.pop()
            cycle += 1

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = (worker + self.rotate) % self.num_streams
        left = self.quota[stream]
        if left <= 0:
            return
        transform = build_view_transform(self.recipe, self.size)
        views_q, views_k, bad = [], [], []
        failures_in_a_row = 0
        for position, sample in enumerate(self._raw(stream)):
            if position < self.skip[stream]:
                continue
            try:
                data = torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8)  # TypeError when read short
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    image = decode_image(data, mode=ImageReadMode.RGB)
            except Exception:  # noqa: BLE001 - any decoder failure: count the sample and skip it
                bad.append(location(sample["__url__"], sample["offset"], sample["name"]))
                failures_in_a_row += 1
                if failures_in_a_row > _MAX_FAILURES_IN_A_ROW:
                    shards = ", ".join(self.shard_urls[stream::self.num_streams])
                    raise RuntimeError(f"{failures_in_a_row} undecodable samples in a row in {shards}; "
                                       "the shards look broken") from None
                continue
            failures_in_a_row = 0
            torch.manual_seed(derive_seed("view", *self.seed_parts, stream, position))
            views_q.append(transform(image))
            views_k.append(transform(image))
            if len(views_q) == self.batch:
                yield torch.stack(views_q), torch.stack(views_k), stream, position + 1, bad
                views_q, views_k, bad = [], [], []
                left -= 1
                if left == 0:
                    return


class _NextWindow:
    """Window ``serial`` of the stream being prepared ahead: its shards checked in a background thread, then its
    DataLoader started by the loader's thread.

    Args:
        serial: the window it reads (``TrainLoader.window_serial``).
        shards: the window's shards (``TrainLoader.window_shards_of``), checked in the thread.
        check_many: ``TrainLoader.shard_checks.check_many`` (thread-safe; the loader's thread takes what it finds;
            in object storage several shards at once).
        readable: ``TrainLoader.readable_window``, called in the thread last (it checks more shards only when none
            of the window's can be read).
    """

    def __init__(self, serial: int, shards: list[int], check_many: Callable[[list[int], threading.Event], None],
                 readable: Callable[[int], list[int]]):
        self.serial = serial
        self.batches: Iterator | None = None  # its DataLoader iterator, once the loader's thread has started it
        self.error: BaseException | None = None  # what the checks raised, re-raised on the loader's thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(shards, check_many, readable), daemon=True,
                                        name=f"torch-window-check-{serial}")
        self._thread.start()

    def _run(self, shards: list[int], check_many: Callable[[list[int], threading.Event], None],
             readable: Callable[[int], list[int]]) -> None:
        try:
            check_many(shards, self._stop)  # returns early once stopped
            if self._stop.is_set():  # abandoned: the loader is closing or resuming elsewhere
                return
            readable(self.serial)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the loader's thread in wait()
            self.error = exc

    def checked(self) -> bool:
        """Whether the checks are over (without waiting)."""
        return not self._thread.is_alive()

    def wait(self) -> None:
        """Wait for the checks; re-raise what they raised."""
        self._thread.join()
        if self.error is not None:
            self.error.add_note(f"raised while checking the shards of window {self.serial} of the stream ahead of "
                                "its boundary, in a background thread")
            raise self.error

    def abandon(self) -> None:
        """Stop after the checks under way (a verdict is recorded whole or not at all) and wait for them."""
        self._stop.set()
        self._thread.join()
        self.batches = None


class TorchLoader(TrainLoader):
    """PyTorch DataLoader two-view loader; views are normalised and cast on ``dist.device``."""

    backend = "pytorch"

    def __init__(self, cfg: Config, dist: DistInfo):
        super().__init__(cfg, dist)
        self._iter: Iterator | None = None
        self._next: _NextWindow | None = None  # the window being prepared ahead
        # Enough batches for the next window's workers to start and make their first batch (each worker makes
        # a whole batch) while this window's last (prefetch + 1) x workers batches are delivered.
        self.prepare_ahead = (cfg.data.prefetch + 1) * max(1, cfg.data.num_threads)
        self.consumed: list[int] = []  # raw samples consumed per stream in this window (the resume position)
        mean = torch.tensor(self.recipe.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.recipe.std).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    def _num_streams(self, window: int) -> int:
        return max(1, min(self.cfg.data.num_threads, len(self.readable_window(window))))

    def _open(self, window: int, consumed: list[int], start: int) -> Iterator:
        """A DataLoader iterator over batches ``start`` to the end of ``window`` (a serial), whose streams have
        already consumed ``consumed`` raw samples (all zero from the start of the window)."""
        shards = self.readable_window(window)
        entries = [self.manifest.shards[i] for i in shards]
        urls = [str(self.manifest.tar_path(e)) for e in entries]
        # Read at the index's offsets (parsed in the workers); the samples the shard check found lost are left out.
        index_of = {url: str(self.manifest.index_path(e)) for url, e in zip(urls, entries)}
        lost_of = {url: {loc.rsplit(":", 1)[1] for loc in found.lost} for url, i in zip(urls, shards)
                   if (found := self.shard_checks.check(i)).lost}
        streams = len(consumed)
        # batch j of the window comes from stream j % streams: stream s owns the j in [start, B) with j = s mod W
        batches = self.window_batches(window)
        quota = [len(range(start + (s - start) % streams, batches, streams)) for s in range(streams)]
        dataset = _WindowStreams(
            urls, index_of, lost_of, streams, self.local_batch_size, self.recipe, self.cfg.data.crop_size,
            max(1, self.cfg.data.shuffle_buffer // streams), (self.cfg.run.seed, window, self.dist.rank),
            list(consumed), rotate=start % streams, quota=quota)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=streams, prefetch_factor=self.cfg.data.prefetch,
            pin_memory=self.device.type == "cuda", persistent_workers=False, worker_init_fn=_one_thread_per_worker,
            multiprocessing_context="fork" if torch.multiprocessing.get_start_method(True) in (None, "fork") else None)
        return iter(loader)

    def _check_next_window(self) -> _NextWindow:
        """Start checking the shards of the window after this one in a background thread."""
        serial = self.next_window(self.window_serial)  # deals the next pass here, not in the thread
        self._next = _NextWindow(serial, self.window_shards_of(serial).tolist(), self.shard_checks.check_many,
                                 self.readable_window)
        return self._next

    def _prepare_next_window(self) -> None:
        upcoming = self._next or self._check_next_window()
        last = self.batch_in_window >= self.window_batches(self.window_serial)
        if upcoming.batches is None and (upcoming.checked() or last):  # the boundary would wait for the checks too
            upcoming.wait()
            serial = upcoming.serial
            upcoming.batches = self._open(serial, [0] * self._num_streams(serial), 0)  # verdicts known: no I/O

    def _start_window(self) -> bool:
        holder, self._iter = [self._iter], None  # its workers have delivered their share of the window, are idle
        self.retirer.retire(holder)
        upcoming, self._next = self._next, None
        if upcoming is not None and upcoming.batches is None:
            upcoming.abandon()  # checks not waited for (preparing was switched off): this thread checks the rest
        self.consumed = [0] * self._num_streams(self.window_serial)
        # The retired window's workers have read all they will; this window's index copies stay (its workers read
        # them as they open each tar), the next window's are fetched when it is checked ahead: at most two windows'.
        self._keep_index_copies()
        if upcoming is not None and upcoming.serial == self.window_serial and upcoming.batches is not None:
            self._iter = upcoming.batches
            return True
        return False

    def _keep_index_copies(self) -> None:
        """Drop the local index copies (object storage) of every window but the current one."""
        self.manifest.keep_index_copies(self.readable_window(self.window_serial))

    def _shutdown(self) -> None:
        self._iter = None
        upcoming, self._next = getattr(self, "_next", None), None
        if upcoming is not None:
            upcoming.abandon()
        self.retirer.join()

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None:
            if len(self.consumed) != self._num_streams(self.window_serial):
                self.consumed = [0] * self._num_streams(self.window_serial)
            self._iter = self._open(self.window_serial, self.consumed, self.batch_in_window)
        q, k, stream, consumed, bad = next(self._iter)
        if self._next is None and self.prepare_ahead is not None:
            self._check_next_window()  # the whole window to hide the checks in, not only the last prepare_ahead batches
        self.consumed[stream] = consumed
        for loc in bad:
            self.note_bad_sample(loc)
        return self._normalise(q), self._normalise(k)

    def _normalise(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x S x S -> normalised, on the device, in the training dtype and memory format."""
        views = views.to(self.device, non_blocking=True).float()
        return self.finish((views - self._mean) / self._std)

    def _backend_state(self) -> dict[str, Any]:
        return {"consumed": list(self.consumed)}

    def _load_backend_state(self, state: dict[str, Any]) -> None:
        self._shutdown()
        self.consumed = [int(c) for c in state["consumed"]]
        self._keep_index_copies()

    def close(self) -> None:
        self._shutdown()
        if getattr(self, "manifest", None) is not None:
            self.manifest.index_copies.close()
