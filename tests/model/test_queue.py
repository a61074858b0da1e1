"""KeyQueue: exact ring-buffer wrap-around for any K and batch, device pointer, dtype, state round trip."""

import pytest
import torch

from model.queue import KeyQueue


def python_ring(queue: torch.Tensor, ptr: int, batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    queue = queue.clone()
    for keys in batches:
        for key in keys:
            queue[ptr] = key
            ptr = (ptr + 1) % queue.shape[0]
    return queue, ptr


@pytest.mark.parametrize("size,batch", [(8, 4), (10, 4), (7, 3), (5, 12), (65, 64), (1, 3)])
def test_wraparound_matches_sequential_writes(size, batch):
    torch.manual_seed(size * 100 + batch)
    queue = KeyQueue(size, 6)
    assert queue.keys.shape == (size, 6)
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(size))
    start = queue.keys.clone()
    batches = [torch.randn(batch, 6) for _ in range(5)]
    for keys in batches:
        queue.enqueue(keys)
    expected, ptr = python_ring(start, 0, batches)
    assert torch.equal(queue.keys, expected)
    assert queue.ptr.tolist() == [ptr]


def test_pointer_is_a_long_buffer_and_keys_cast_to_queue_dtype():
    queue = KeyQueue(6, 4, dtype=torch.bfloat16)
    keys = torch.randn(4, 4)
    queue.enqueue(keys)
    assert queue.ptr.dtype == torch.long and queue.ptr.shape == (1,)
    assert queue.keys.dtype == torch.bfloat16
    assert torch.equal(queue.keys[:4], keys.to(torch.bfloat16))


def test_state_dict_round_trip_and_negatives_snapshot():
    a, b = KeyQueue(9, 3), KeyQueue(9, 3)
    a.enqueue(torch.randn(5, 3))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.keys, b.keys) and torch.equal(a.ptr, b.ptr)
    snapshot = a.negatives()
    a.enqueue(torch.randn(2, 3))
    assert not torch.equal(snapshot, a.keys)  # the logits' copy is not touched by the enqueue


def test_invalid_sizes():
    with pytest.raises(ValueError, match="queue size"):
        KeyQueue(0, 4)
