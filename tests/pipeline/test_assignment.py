"""Per-rank shard assignment: disjoint, covering, balanced, deterministic, equal batch counts per rank; the
vectorised dealing against a plain greedy; windows cover the share and yield the same batches on every rank."""

import numpy as np
import pytest

from pipeline.assignment import ShardPlan, derive_seed, least_loaded_bins, random_keys, random_permutation

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


# ----------------------------------------------------------------------------- the vectorised dealing vs a plain greedy


def _greedy(sizes, world):
    """Plain greedy, straight from LPT's definition: each item to the least-loaded bin, lowest index on ties."""
    loads, out = [0] * world, []
    for size in sizes:
        b = min(range(world), key=lambda r: (loads[r], r))
        out.append(b)
        loads[b] += size
    return out


def _reference_assign(sizes, world, seed, pass_index):
    """ShardPlan.assign written plainly: sort by (-size, random tiebreak), greedy, bins to ranks, reading order."""
    tiebreak = random_keys(len(sizes), "assign", seed, pass_index).tolist()
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], tiebreak[i]))
    bins = [[] for _ in range(world)]
    for i, b in zip(order, _greedy([sizes[i] for i in order], world)):
        bins[b].append(i)
    read = random_keys(len(sizes), "read", seed, pass_index).tolist()
    rank_bin = random_permutation(world, "ranks", seed, pass_index).tolist()
    return [sorted(bins[b], key=lambda i: read[i]) for b in rank_bin]


def _random_sizes(rng, kind: str, n: int) -> list[int]:
    if kind == "distinct":
        return rng.integers(1, 60, n).tolist()
    if kind == "long_runs":  # runs past the vectorised threshold, with unequal loads when a run starts
        return np.repeat(rng.integers(1, 400, 4), rng.integers(0, 700, 4)).tolist()
    full, tail = int(rng.integers(300, 1500)), rng.integers(1, 100, int(rng.integers(0, 20))).tolist()
    return [100] * full + tail  # the shard builder's shape: equal shards and a few short ones


@pytest.mark.parametrize("kind", ["distinct", "long_runs", "builder"])
@pytest.mark.parametrize("world", [1, 3, 8, 37])
def test_least_loaded_bins_is_the_plain_greedy(kind, world):
    rng = np.random.default_rng(world)
    for _ in range(6):
        sizes = _random_sizes(rng, kind, int(rng.integers(1, 900)))
        for order in (sizes, sorted(sizes, reverse=True)):  # any order (greedy), descending (LPT)
            assert least_loaded_bins(order, world).tolist() == _greedy(order, world)


@pytest.mark.parametrize("kind", ["distinct", "long_runs", "builder"])
@pytest.mark.parametrize("world", [2, 5, 16])
def test_assign_is_the_reference_lpt_deal(kind, world):
    rng = np.random.default_rng(100 + world)
    sizes = _random_sizes(rng, kind, 600)
    if len(sizes) < world:
        sizes += [7] * world
    plan = ShardPlan(sizes, world, seed=3)
    for p in range(3):
        per_rank = plan.assign(p)
        assert per_rank == _reference_assign(sizes, world, 3, p)
        assert all(plan.rank_shards(p, r).tolist() == per_rank[r] for r in range(world))
        assert plan.rank_samples(p) == [sum(sizes[i] for i in s) for s in per_rank]


@pytest.mark.parametrize("world", [1, 3, 7])
@pytest.mark.parametrize("window", [0, 1, 2, 5])
@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
def test_windows_cover_the_rank_share_and_yield_batches_per_pass(sizes, world, window):
    plan = ShardPlan(sizes, world, seed=9)
    batch = 4
    try:
        bpp = plan.batches_per_pass(batch, window)
    except ValueError as exc:
        assert "raise data.window_shards" in str(exc) or "fewer than one local batch" in str(exc)
        return
    windows = plan.windows_per_pass(window)
    assert windows == (1 if window == 0 else -(-max(len(s) for s in plan.assign(0)) // window))
    for p in range(4):
        for r in range(world):
            share = plan.rank_pass(p, r, batch, window)
            assert share.shards.tolist() == plan.assign(p)[r]
            cut = [share.window(w).tolist() for w in range(windows)]
            assert sum(cut, []) == share.shards.tolist()  # consecutive windows of the reading order
            assert all(len(c) <= window for c in cut) or window == 0
            assert max(map(len, cut)) - min(map(len, cut)) <= 1
            assert share.batches.sum() == bpp  # every rank, every pass
            for c, n in zip(cut, share.batches.tolist()):
                assert 0 <= n * batch <= sum(sizes[i] for i in c)  # a window yields only whole batches it holds


def test_equal_shards_lose_no_batch_to_windows():
    plan = ShardPlan((16,) * 12, 2, seed=0)  # 6 shards (96 samples) per rank
    assert [plan.batches_per_pass(8, w) for w in (0, 1, 2, 4)] == [12, 12, 12, 12]
    assert plan.batches_per_pass(12, 0) == 8 and plan.batches_per_pass(12, 1) == 6  # 16 -> one batch of 12
    assert plan.rank_pass(0, 0, 12, 4).batches.tolist() == [4, 4]  # 3 shards, 48 samples per window
