"""Run under torchrun by tests/test_distributed.py: checks every collective on a real gloo group."""

import torch

import distributed

info = distributed.setup_distributed("cpu", timeout_s=60)
r, w = info.rank, info.world_size
assert (distributed.rank(), distributed.world_size(), info.backend) == (r, w, "gloo") and w == 2

x = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 10 * r
gathered = distributed.all_gather(x)
assert torch.equal(gathered, torch.cat([torch.arange(6.0).reshape(3, 2) + 10 * j for j in range(w)]))

# rank r sends rows [0:1] to rank 0 and [1:3] to rank 1
received = distributed.all_to_all(x, send_counts=[1, 2], recv_counts=[1, 1] if r == 0 else [2, 2])
expected = torch.cat([(torch.arange(6.0).reshape(3, 2) + 10 * j)[[0] if r == 0 else [1, 2]] for j in range(w)])
assert torch.equal(received, expected), (received, expected)

assert distributed.all_reduce_mean(torch.tensor([float(r)])).item() == 0.5
assert distributed.all_reduce_sum(torch.tensor([1.0])).item() == 2.0
assert distributed.all_gather_object({"rank": r}) == [{"rank": 0}, {"rank": 1}]
assert distributed.broadcast_object("hello" if r == 0 else None) == "hello"
t = torch.tensor([float(r + 5)])
assert distributed.broadcast(t, src=1).item() == 6.0
distributed.barrier()
print(f"rank {r}: collectives ok", flush=True)
distributed.teardown_distributed()
