"""Bytes each shuffle-BN strategy moves per step and per rank, computed from tensor sizes (no measurement).

Notation: W ranks, N images per rank, I = 3·S·S·b_img bytes per key image (crop S, view dtype b_img bytes),
Kb = dim·b_key bytes per key, P = 8 bytes per permutation index (int64). Figures are bytes *received* by one
rank over the interconnect per step (its own slice of a collective is not counted):

- ``gather`` (the paper's): all-gather of key images (W-1)·N·I, broadcast of the permutation W·N·P, then one
  all-gather of keys that both unshuffles and feeds the queue (W-1)·N·Kb.
- ``all_to_all``: each rank receives only the images its shuffled slice needs; with a uniform permutation
  N·(W-1)/W of them live elsewhere: N·(W-1)/W·I, plus the same permutation and key all-gather.
  Image traffic is 1/W of ``gather``'s.
- ``sync``: SyncBatchNorm in the key encoder's forward all-gathers, per BN layer with C channels,
  mean and inverse std (2·C fp32) and a count (1 fp32) from every rank: (W-1)·(2C+1)·4; plus the key all-gather.
- ``split`` / ``none``: no image exchange; the key all-gather (W-1)·N·Kb feeds the queue.
- ``original``: the original code's structure (facebookresearch/moco) = ``gather`` plus a second key
  all-gather for the enqueue: 2·(W-1)·N·Kb.
"""

from __future__ import annotations

from torch import nn

STRATEGIES = ("gather", "all_to_all", "sync", "split", "none", "original")
INDEX_BYTES = 8


def bn_channels(encoder: nn.Module) -> list[int]:
    """Channel counts of the BatchNorm layers of ``encoder`` (what SyncBatchNorm exchanges)."""
    return [m.num_features for m in encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bytes_per_step(strategy: str, world: int, per_rank: int, crop_size: int, dim: int, image_bytes: int = 2,
                   key_bytes: int = 4, bn_layers: list[int] | None = None) -> dict[str, int]:
    """Bytes received by one rank in one step, split into images, keys, permutation and BN statistics.

    Args:
        strategy: one of STRATEGIES.
        world: W, the number of ranks.
        per_rank: N, images per rank per step.
        crop_size: S, the key view's side.
        dim: embedding dimension of a key.
        image_bytes: bytes per pixel value of the key view (2 for bf16/fp16 views, 4 for fp32).
        key_bytes: bytes per key element (keys are gathered in fp32 in our model; 2 if gathered in bf16).
        bn_layers: BN channel counts of the key encoder (only for ``sync``).

    Returns:
        ``{"images": .., "keys": .., "permutation": .., "bn_stats": .., "total": ..}`` in bytes.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown shuffle-BN strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if world < 1 or per_rank < 1:
        raise ValueError(f"need world >= 1 and per_rank >= 1; got {world}, {per_rank}")
    image = 3 * crop_size * crop_size * image_bytes
    keys = (world - 1) * per_rank * dim * key_bytes
    parts = {"images": 0, "keys": keys, "permutation": 0, "bn_stats": 0}
    if strategy in ("gather", "original"):
        parts["images"] = (world - 1) * per_rank * image
        parts["permutation"] = world * per_rank * INDEX_BYTES if world > 1 else 0
        if strategy == "original":
            parts["keys"] = 2 * keys
    elif strategy == "all_to_all":
        parts["images"] = per_rank * (world - 1) * image // world
        parts["permutation"] = world * per_rank * INDEX_BYTES if world > 1 else 0
    elif strategy == "sync":
        if bn_layers is None:
            raise ValueError("strategy 'sync' needs the key encoder's BN channel counts (bn_layers)")
        parts["bn_stats"] = sum((world - 1) * (2 * c + 1) * 4 for c in bn_layers)
    parts["total"] = sum(parts.values())
    return parts
