"""The compact digest set against a plain Python set, the stats-file encoding and the hash-prefix slices."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shards.digests import DIGEST_SIZE, DigestSet, decode_digests, encode_digests, prefix_slice


def _reference(batches: list[list[bytes]]) -> list[list[bool]]:
    """Per batch, per digest: already seen (earlier batch or earlier in the batch)? Straight from the definition."""
    seen: set[bytes] = set()
    out = []
    for batch in batches:
        flags = []
        for d in batch:
            flags.append(d in seen)
            seen.add(d)
        out.append(flags)
    return out


@pytest.mark.parametrize("distinct, batches, max_batch", [(10, 20, 5), (3000, 60, 200), (40_000, 150, 1500)])
def test_matches_a_python_set(distinct, batches, max_batch):
    rng = random.Random(distinct)
    pool = [rng.randbytes(DIGEST_SIZE) for _ in range(distinct)]
    pool += [pool[i][:8] + rng.randbytes(8) for i in range(min(50, distinct))]  # same high half, other low half
    work = [[rng.choice(pool) for _ in range(rng.randint(0, max_batch))] for _ in range(batches)]
    ds = DigestSet()
    got = [ds.add_many(b"".join(batch)).tolist() for batch in work]
    assert got == _reference(work)
    assert len(ds) == len({d for batch in work for d in batch})


def test_memory_per_digest_is_small():
    ds = DigestSet()
    data = np.random.default_rng(0).integers(0, 256, 200_000 * DIGEST_SIZE, dtype=np.uint8).tobytes()
    for i in range(0, len(data), 1000 * DIGEST_SIZE):
        ds.add_many(data[i:i + 1000 * DIGEST_SIZE])
    assert len(ds) == 200_000 and ds.nbytes / len(ds) <= 20
    assert ds.add_many(data[:64 * DIGEST_SIZE]).all()


def test_rejects_partial_digests():
    with pytest.raises(ValueError, match="multiple of 16"):
        DigestSet().add_many(b"x" * 17)
    with pytest.raises(ValueError, match="whole number"):
        decode_digests(encode_digests(b"x" * 20))


def test_stats_encoding_round_trips():
    raw = random.Random(1).randbytes(DIGEST_SIZE * 37)
    text = encode_digests(raw)
    assert isinstance(text, str) and decode_digests(text) == raw and decode_digests(encode_digests(b"")) == b""


@pytest.mark.parametrize("m", [1, 2, 7, 64])
def test_prefix_slices_partition_the_digests(m):
    raw = np.random.default_rng(m).integers(0, 256, 5000 * DIGEST_SIZE, dtype=np.uint8).tobytes()
    masks = np.stack([prefix_slice(raw, (k, m)) for k in range(m)])
    assert (masks.sum(0) == 1).all()  # every digest in exactly one slice
    for k in range(m):  # slice k is the k-th range of the first four bytes
        heads = [int.from_bytes(raw[i * DIGEST_SIZE:i * DIGEST_SIZE + 4], "big") for i in np.flatnonzero(masks[k])]
        assert all(k * 2**32 <= h * m < (k + 1) * 2**32 for h in heads)
    assert abs(masks.sum(1) - 5000 / m).max() < 5 * (5000 / m) ** 0.5 + 1
