"""Shuffle-BN strategies: how the key batch is spread over BN groups (ranks) and the keys brought back.

Every strategy turns this rank's key images (B x 3 x H x W, in batch order) into
``(k_local, k_all)``: the normalised keys of this rank's samples in batch order (B x C) and those of the whole
global batch in global order ((W*B) x C, rank-major), which is what the queue receives. ``k_all`` comes from
exactly one all-gather of keys in every strategy: the gather that undoes the shuffle is the one that feeds
the queue (the original code gathers the keys a second time in ``_dequeue_and_enqueue``).

The permutation ``p`` of the N = W*B global samples means: slot ``t`` (rank ``t // B``, row ``t % B`` of the
shuffled batch) holds global sample ``p[t]`` (rank ``p[t] // B``, row ``p[t] % B``). It is drawn on the host
from a generator seeded identically on every rank, so every rank knows it without a device read.

- ``gather``: the paper's (MoCo sec. 3.3): all-gather the images, broadcast ``p`` from rank 0, take our
  slots, encode, all-gather the keys, unshuffle by indexing.
- ``all_to_all``: same ``p`` and the same keys as ``gather``, but each rank receives only the images its
  slots need, ~(W-1)/W * B images instead of (W-1) * B.
- ``split``: one rank, BN statistics per group of the batch (SplitBatchNorm2d in both encoders), the
  permutation within the local batch, so G groups on one device behave as G ranks.
- ``sync``: no shuffle; SyncBatchNorm in the key encoder (global key statistics).
- ``none``: no shuffle, plain BN (reference; can "cheat" through BN statistics).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

import distributed

STRATEGIES = ("gather", "all_to_all", "split", "sync", "none")


def resolve_strategy(name: str, world_size: int) -> str:
    """``auto`` -> ``all_to_all`` with more than one rank, ``split`` on one; other names unchanged."""
    if name == "auto":
        return "all_to_all" if world_size > 1 else "split"
    if name not in STRATEGIES:
        raise ValueError(f"shuffle_bn must be auto or one of {', '.join(STRATEGIES)}; got {name!r}")
    return name


def all_to_all_plan(perm: np.ndarray, world: int, rank: int) -> tuple[np.ndarray, list[int], list[int], np.ndarray]:
    """Who sends which image rows to whom so that rank ``rank`` ends up with global samples ``perm[rank*B:(rank+1)*B]``.

    Args:
        perm: N permutation of global sample ids (N = world * B).
        world: number of ranks W.
        rank: this rank.

    Returns:
        send_rows: local rows to send, grouped by destination rank (ascending slot order within a destination).
        send_counts: W rows sent to each rank.
        recv_counts: W rows received from each rank.
        recv_inverse: B indices; ``shuffled = received[recv_inverse]`` puts the received rows in slot order.
    """
    n = perm.shape[0]
    batch = n // world
    src = perm // batch  # N: the rank that holds the sample of each slot
    mine = np.flatnonzero(src == rank)  # the slots we serve, ascending, hence grouped by destination
    send_rows = perm[mine] % batch
    send_counts = np.bincount(mine // batch, minlength=world)
    my_src = src[rank * batch:(rank + 1) * batch]
    recv_counts = np.bincount(my_src, minlength=world)
    # all_to_all delivers rows grouped by source, each source in its ascending slot order: a stable sort.
    arrival_order = np.argsort(my_src, kind="stable")  # received row i is slot arrival_order[i]
    recv_inverse = np.argsort(arrival_order)
    return send_rows, send_counts.tolist(), recv_counts.tolist(), recv_inverse


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 host array on ``device`` without blocking the host (pinned, asynchronous copy on CUDA)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.int64))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _rowwise(images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Apply a row exchange/selection ``fn`` to images without losing channels_last.

    Collectives call ``.contiguous()``, which would turn a channels_last batch into NCHW (a copy, and the
    encoder would convert it back). A channels_last N x C x H x W batch is a contiguous N x H x W x C one, so
    ``fn`` gets that and its result is viewed back as channels_last N x C x H x W.
    """
    if images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last):
        return fn(images.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return fn(images)


Encode = Callable[[torch.Tensor], torch.Tensor]


class ShuffleBN:
    """A shuffle-BN strategy: ``keys(encode, images, perm)`` -> (k_local B x C, k_all (W*B) x C).

    ``encode`` maps images to normalised keys (the key encoder). ``perm``: optional host permutation (numpy
    int64, or a CPU tensor) to use instead of a drawn one; N = W*B long (B for ``split``). Call under no_grad.
    """

    name = "none"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int, perm: np.ndarray | torch.Tensor | None) -> np.ndarray:
        """The permutation of ``n`` slots: ``perm`` checked, or the next one from the shared generator."""
        if perm is None:
            return self.rng.permutation(n)
        if isinstance(perm, torch.Tensor):
            if perm.device.type != "cpu":
                raise ValueError("perm must be a host (CPU) tensor or numpy array; reading a device one would sync")
            perm = perm.numpy()
        perm = np.asarray(perm, dtype=np.int64)
        if perm.shape != (n,):
            raise ValueError(f"perm must have {n} entries for this batch; got shape {perm.shape}")
        return perm

    def keys(self, encode: Encode, images: torch.Tensor, perm=None) -> tuple[torch.Tensor, torch.Tensor]:
        k = encode(images)  # B x C
        return k, distributed.all_gather(k)


class SyncShuffle(ShuffleBN):
    """No shuffle; the key encoder holds SyncBatchNorm (converted by MoCo)."""

    name = "sync"

    def keys(self, encode: Encode, images: torch.Tensor, perm=None) -> tuple[torch.Tensor, torch.Tensor]:
        if distributed.world_size() > 1 and images.device.type != "cuda":
            raise ValueError("shuffle_bn=sync needs CUDA tensors with more than one rank (SyncBatchNorm has no CPU path)")
        return super().keys(encode, images, perm)


class SplitShuffle(ShuffleBN):
    """Shuffle within the local batch; BN groups are contiguous chunks (SplitBatchNorm2d in the encoders)."""

    name = "split"

    def keys(self, encode: Encode, images: torch.Tensor, perm=None) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.draw(images.shape[0], perm)
        shuffled = images[_to_device(p, images.device)]  # advanced indexing keeps channels_last
        k_shuffled = encode(shuffled)  # B x C, row t is sample p[t]
        k = k_shuffled.index_select(0, _to_device(np.argsort(p), images.device))
        return k, distributed.all_gather(k)


class _GlobalShuffle(ShuffleBN):
    """Shared tail of gather / all_to_all: encode our slots, one key gather, unshuffle by indexing."""

    def _unshuffle(self, encode: Encode, shuffled: torch.Tensor, inverse: torch.Tensor,
                   batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        k_shuffled = distributed.all_gather(encode(shuffled))  # N x C in slot order
        k_all = k_shuffled.index_select(0, inverse)  # N x C in global sample order
        r = distributed.rank()
        return k_all[r * batch:(r + 1) * batch], k_all


class GatherShuffle(_GlobalShuffle):
    """The paper's: all-gather images, permutation broadcast from rank 0, unshuffle by the key gather."""

    name = "gather"

    def keys(self, encode: Encode, images: torch.Tensor, perm=None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, world, r = images.shape[0], distributed.world_size(), distributed.rank()
        p = distributed.broadcast(_to_device(self.draw(world * batch, perm), images.device), src=0)
        mine = p[r * batch:(r + 1) * batch]
        shuffled = _rowwise(images, lambda x: distributed.all_gather(x)[mine])  # all N images in, our B slots out
        return self._unshuffle(encode, shuffled, torch.argsort(p), batch)


class AllToAllShuffle(_GlobalShuffle):
    """The paper's permutation semantics with 1/W of the image traffic: each rank receives only its slots."""

    name = "all_to_all"

    def keys(self, encode: Encode, images: torch.Tensor, perm=None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, world, r = images.shape[0], distributed.world_size(), distributed.rank()
        p = self.draw(world * batch, perm)
        send_rows, send_counts, recv_counts, recv_inverse = all_to_all_plan(p, world, r)
        device = images.device
        send_idx, recv_idx = _to_device(send_rows, device), _to_device(recv_inverse, device)
        shuffled = _rowwise(images, lambda x: distributed.all_to_all(x[send_idx], send_counts, recv_counts)[recv_idx])
        return self._unshuffle(encode, shuffled, _to_device(np.argsort(p), device), batch)


def build_shuffle(name: str, seed: int = 0) -> ShuffleBN:
    """The strategy object for a resolved strategy name (see :func:`resolve_strategy`)."""
    classes = {"gather": GatherShuffle, "all_to_all": AllToAllShuffle, "split": SplitShuffle,
               "sync": SyncShuffle, "none": ShuffleBN}
    if name not in classes:
        raise ValueError(f"unknown shuffle-BN strategy {name!r} (resolve 'auto' first)")
    return classes[name](seed)
