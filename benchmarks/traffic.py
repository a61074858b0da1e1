"""Bytes one rank receives per step on the key path of each shuffle-BN strategy (the byte tables of the model suite)."""

from __future__ import annotations


def traffic_bytes(strategy: str, world: int, batch_per_rank: int, image_bytes: int, key_bytes: int,
                  bn_channels: int = 0) -> dict[str, float]:
    """Bytes one rank receives per step for the key path of ``strategy`` (payload only, expected value).

    Args:
        strategy: one of STRATEGIES or ``baseline`` (the original: image gather, perm broadcast, two key gathers).
        world: W ranks. batch_per_rank: B. image_bytes: bytes of one key image (3*224*224*2 in bf16).
        key_bytes: bytes of one key (128*4 for fp32 keys).
        bn_channels: sum of channels over the key encoder's BN layers (``sync`` exchanges mean, var, count per channel).

    Returns:
        {"images": ..., "keys": ..., "other": ..., "total": ...}.
    """
    others = world - 1
    keys = others * batch_per_rank * key_bytes
    images = other = 0.0
    if strategy in ("gather", "baseline"):
        images = others * batch_per_rank * image_bytes
        other = world * batch_per_rank * 8  # the int64 permutation broadcast from rank 0
    elif strategy == "all_to_all":
        images = others / world * batch_per_rank * image_bytes  # each slot's sample is remote w.p. (W-1)/W
    elif strategy == "sync":
        other = others * bn_channels * 3 * 4  # SyncBatchNorm all-gathers fp32 (mean, invstd, count) per channel
    elif strategy not in ("split", "none"):
        raise ValueError(f"unknown strategy {strategy!r}")
    if strategy == "baseline":
        keys *= 2
    return {"images": images, "keys": float(keys), "other": float(other), "total": images + keys + other}
