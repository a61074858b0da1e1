"""Content digests for dedup: an exact set at < 20 bytes per image, their stats-file encoding and hash-prefix slices.

A Python ``set`` of hex strings costs ~115 bytes per image (the string object, its hash slot and the table's
spare room): 115 GB at one billion. Dedup only needs membership of fixed 16-byte blake2b digests, so
``DigestSet`` keeps them as two sorted ``uint64`` arrays (the digest's high and low 8 bytes, big-endian) and
collects new ones in a small Python set that is merged into the arrays, in place, once it holds 1/64 of them.
The arrays grow by 1/32 at a time through ``realloc`` (``ndarray.resize``), so memory is 16 bytes per digest
plus at most 1/32 spare capacity plus the buffer (~100 bytes per buffered digest, so ~1.6 per digest held), and
no step ever copies the whole set: 18.8 bytes per digest at its peak over 1M digests (``benchmarks.scale_shards``).

16 bytes rather than 8: among 10^9 random 8-byte digests a false "duplicate" is likely (~3%); among 16-byte
ones, ~10^-21.
"""

from __future__ import annotations

import base64

import numpy as np

DIGEST_SIZE = 16
_MIN_FLUSH = 1024  # buffered digests before the first merge into the sorted arrays
_MIN_CHUNK = 1 << 12  # elements moved per step of the in-place merge: 1/128 of the set, at least this many


class DigestSet:
    """An exact, insertion-ordered-dedup set of 16-byte digests.

    ``add_many`` answers, for each digest of a batch in order, whether it was already present (inserted by an
    earlier call or earlier in the same batch), and inserts the new ones. Lookups against the sorted arrays are
    vectorised per batch, so the per-image Python work is one set lookup.
    """

    def __init__(self) -> None:
        self._hi = np.zeros(0, np.uint64)
        self._lo = np.zeros(0, np.uint64)
        self._n = 0
        self._pending: set[bytes] = set()

    def __len__(self) -> int:
        return self._n + len(self._pending)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (capacity included) and, roughly, the buffer (~100 B per buffered digest)."""
        return self._hi.nbytes + self._lo.nbytes + 100 * len(self._pending)

    def add_many(self, digests: bytes) -> np.ndarray:
        """Insert the concatenated 16-byte ``digests`` in order.

        Args:
            digests: ``k * 16`` bytes.

        Returns:
            bool array of k: True where the digest was already in the set (a duplicate), False where it was added.
        """
        if len(digests) % DIGEST_SIZE:
            raise ValueError(f"digests must be a multiple of {DIGEST_SIZE} bytes, got {len(digests)}")
        count = len(digests) // DIGEST_SIZE
        if not count:
            return np.zeros(0, bool)
        found = self._in_sorted(digests)
        pending = self._pending
        for i in (~found).nonzero()[0].tolist():
            d = digests[i * DIGEST_SIZE:(i + 1) * DIGEST_SIZE]
            if d in pending:
                found[i] = True
            else:
                pending.add(d)
        if len(pending) > max(_MIN_FLUSH, self._n >> 6):
            self._flush()
        return found

    def _in_sorted(self, digests: bytes) -> np.ndarray:
        pairs = np.frombuffer(digests, ">u8").astype(np.uint64).reshape(-1, 2)
        if not self._n:
            return np.zeros(len(pairs), bool)
        hi, lo = self._hi[:self._n], self._lo[:self._n]
        qh, ql = pairs[:, 0], pairs[:, 1]
        if len(qh) > 1024:  # sorted keys let searchsorted narrow each search with the previous one
            order = np.argsort(qh)
            qh, ql = qh[order], ql[order]
        at = np.minimum(np.searchsorted(hi, qh, "left"), self._n - 1)
        same_hi = hi[at] == qh
        found = same_hi & (lo[at] == ql)
        for i in np.flatnonzero(same_hi & ~found).tolist():  # same high half, other low half: ~never below 10^9
            right = int(np.searchsorted(hi, qh[i], "right"))
            found[i] = bool((lo[at[i]:right] == ql[i]).any())
        if len(pairs) > 1024:
            unsorted = np.empty_like(found)
            unsorted[order] = found
            return unsorted
        return found

    def _flush(self) -> None:
        """Merge the buffer into the sorted arrays in place (from the back, one chunk at a time)."""
        if not self._pending:
            return
        items = sorted(self._pending)  # bytes order == (high, low) order of the big-endian halves
        self._pending = set()  # each step frees what the next one no longer needs: the peak stays low
        raw = b"".join(items)
        del items
        pairs = np.frombuffer(raw, ">u8").reshape(-1, 2)
        nh, nl = pairs[:, 0].astype(np.uint64), pairs[:, 1].astype(np.uint64)
        del pairs, raw
        n, m = self._n, len(nh)
        if n + m > len(self._hi):
            capacity = max(n + m, len(self._hi) + len(self._hi) // 32, 1024)
            self._hi.resize(capacity, refcheck=False)  # realloc: large blocks are remapped, not copied
            self._lo.resize(capacity, refcheck=False)
        hi, lo = self._hi, self._lo
        pos = np.searchsorted(hi[:n], nh, "left")  # new k lands at pos[k] + k; old t moves up by #(pos <= t)
        chunk = max(_MIN_CHUNK, n >> 7)  # temporaries ~40 bytes per element of a chunk: < 0.5 byte per digest
        for stop in range(n, 0, -chunk):
            start = max(0, stop - chunk)
            first, last = np.searchsorted(pos, [start, stop - 1], "right").tolist()
            if first == last:  # no insertion inside the chunk: one block move
                if first:
                    hi[start + first:stop + first] = hi[start:stop].copy()
                    lo[start + first:stop + first] = lo[start:stop].copy()
                continue
            runs = np.diff(np.concatenate(([start], pos[first:last], [stop])))
            dest = np.repeat(np.arange(first, last + 1), runs)
            dest += np.arange(start, stop)
            hi[dest] = hi[start:stop].copy()
            lo[dest] = lo[start:stop].copy()
        at = pos + np.arange(m)
        hi[at], lo[at] = nh, nl
        self._n = n + m


def encode_digests(digests: bytes) -> str:
    """Digests as stored in a stats file: the concatenated 16-byte digests in sample order, base64."""
    return base64.b64encode(digests).decode("ascii")


def decode_digests(text: str) -> bytes:
    """Inverse of ``encode_digests``; raises ValueError on anything but whole 16-byte digests."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) % DIGEST_SIZE:
        raise ValueError(f"digest data of {len(raw)} bytes is not a whole number of {DIGEST_SIZE}-byte digests")
    return raw


def prefix_slice(digests: bytes, hash_slice: tuple[int, int]) -> np.ndarray:
    """Mask of the digests in slice k of m: the first 4 bytes, read as a number, fall in the k-th of m equal ranges.

    Two copies of an image have the same digest, hence the same slice: dedup per slice is exact.
    """
    k, m = hash_slice
    head = np.frombuffer(digests, ">u4")[::DIGEST_SIZE // 4].astype(np.uint64)
    return (head * np.uint64(m)) >> np.uint64(32) == np.uint64(k)
