"""Per-rank shard assignment: disjoint, covering, balanced, deterministic, equal batch counts per rank."""

import pytest

from pipeline.assignment import ShardPlan, derive_seed

SIZES = {
    "equal": (16,) * 12,
    "uneven": (16, 16, 16, 16, 16, 7, 30, 3, 16, 16, 25),
    "last_short": (100,) * 9 + (37,),
}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_plan_is_a_balanced_partition_every_pass(sizes, world):
    plan = ShardPlan(sizes, world, seed=5)
    counts_seen = set()
    for p in range(6):
        per_rank = plan.assign(p)
        flat = [i for shards in per_rank for i in shards]
        assert sorted(flat) == list(range(len(sizes)))  # disjoint and covering
        loads = [sum(sizes[i] for i in shards) for shards in per_rank]
        assert max(loads) - min(loads) <= max(sizes)  # greedy balance bound
        counts_seen.add(tuple(sorted(loads)))
        assert per_rank == ShardPlan(sizes, world, seed=5).assign(p)  # deterministic: every rank computes the same
    assert len(counts_seen) == 1  # same per-rank sample counts every pass -> constant batches per pass
    for batch in (1, 4, 8):
        if min(plan.rank_samples()) >= batch:
            bpp = plan.batches_per_pass(batch)
            for p in range(6):
                assert all(n // batch >= bpp for n in plan.rank_samples(p))  # every rank can yield bpp batches
            assert bpp == min(plan.rank_samples()) // batch


def test_plan_reshuffles_across_passes():
    plan = ShardPlan(SIZES["equal"], 3, seed=1)
    assignments = {tuple(map(tuple, plan.assign(p))) for p in range(8)}
    assert len(assignments) == 8
    assert ShardPlan(SIZES["equal"], 3, seed=2).assign(0) != plan.assign(0)


def test_plan_balance_on_equal_shards_is_exact():
    assert ShardPlan((16,) * 12, 3, seed=0).rank_samples(4) == [64, 64, 64]


def test_plan_rejects_too_few_shards_or_samples():
    with pytest.raises(ValueError, match="3 shards cannot be split over 4 ranks"):
        ShardPlan((5, 5, 5), 4, seed=0)
    with pytest.raises(ValueError, match="fewer than one local batch"):
        ShardPlan((5, 5, 5), 3, seed=0).batches_per_pass(8)


def test_derive_seed_is_stable():
    assert derive_seed("a", 1, 2) == derive_seed("a", 1, 2) != derive_seed("a", 2, 1)
    assert 0 <= derive_seed("x") < 2**31
