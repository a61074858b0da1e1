"""Shuffle-BN pieces that need no process group: strategy resolution, the all_to_all plan, traffic counts."""

import numpy as np
import pytest

from model.shuffle import ShuffleBN, all_to_all_plan, resolve_strategy


def test_resolve_strategy():
    assert resolve_strategy("auto", 1) == "split"
    assert resolve_strategy("auto", 8) == "all_to_all"
    assert resolve_strategy("gather", 1) == "gather"
    with pytest.raises(ValueError, match="shuffle_bn must be"):
        resolve_strategy("shuffle", 2)


@pytest.mark.parametrize("world,batch", [(1, 5), (2, 4), (3, 2), (4, 3), (8, 1)])
def test_all_to_all_plan_delivers_exactly_the_gather_slots(world, batch):
    """Simulate the exchange for every rank: each must end with the rows the paper's gather gives it."""
    rng = np.random.default_rng(world * 10 + batch)
    n = world * batch
    perm = rng.permutation(n)
    samples = np.arange(n) * 10 + 7  # global sample g lives on rank g // batch, row g % batch
    local = [samples[r * batch:(r + 1) * batch] for r in range(world)]
    plans = [all_to_all_plan(perm, world, r) for r in range(world)]
    outboxes = []
    for r, (send_rows, send_counts, _, _) in enumerate(plans):
        rows = local[r][send_rows]
        assert sum(send_counts) == len(send_rows)
        outboxes.append(np.split(rows, np.cumsum(send_counts)[:-1]))
    for r, (_, _, recv_counts, recv_inverse) in enumerate(plans):
        received = np.concatenate([outboxes[src][r] for src in range(world)])
        assert [len(outboxes[src][r]) for src in range(world)] == recv_counts
        shuffled = received[recv_inverse]
        assert np.array_equal(shuffled, samples[perm[r * batch:(r + 1) * batch]])


def test_permutation_checks():
    shuffle = ShuffleBN(seed=3)
    assert sorted(shuffle.draw(6, None)) == list(range(6))
    assert np.array_equal(ShuffleBN(seed=3).draw(6, None), ShuffleBN(seed=3).draw(6, None))
    with pytest.raises(ValueError, match="must have 4 entries"):
        shuffle.draw(4, np.arange(5))
