"""The typed results (their checks, the JSON round trip), the statistics and the timing helpers, against plain
references."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from benchmarks.report import SCHEMA, Column, SuiteResult, load_report, markdown_table, report_json
from benchmarks.timing import Stats, measure, measure_interleaved, percentile

MACHINE = {"cpu_model": "x", "cpu_cores": 2, "gpu_count": 0, "torch": "2"}


def _result() -> SuiteResult:
    result = SuiteResult("model", config={"batch": 8}, columns=[Column("pairs_per_s", "pairs/s")],
                         plot_metric="pairs_per_s")
    result.add("ours", "precision", {"p": "fp32"}, pairs_per_s=Stats.of([10.0, 11.0, 12.0]), mfu=None,
               overhead_ms_signed=-0.5, data_wait_share=0.0)
    result.add("baseline", "baseline", {}, pairs_per_s=Stats.of([5.0, 6.0]))
    result.compare("ours vs baseline", "ours", "baseline", "pairs_per_s")
    result.skip("compile", "no GPU")
    return result


def test_json_round_trip_with_provenance_and_repeats(monkeypatch):
    monkeypatch.setenv("BENCH_GIT_COMMIT", "abc123-dirty")
    doc = json.loads(json.dumps(report_json(_result(), MACHINE, ["run"], True)))
    assert doc["schema"] == SCHEMA and doc["git"] == {"commit": "abc123", "dirty": True}
    assert doc["repeats"] == 3  # the headline metric's most repeats
    assert doc["comparisons"][0]["ratio"] == pytest.approx(11.0 / 5.5)
    back = load_report(doc)
    assert back.row("ours").metrics["pairs_per_s"] == Stats(11.0, 10.0, 12.0, 3)
    assert back.skipped == [{"name": "compile", "reason": "no GPU"}]


def test_provenance_of_this_checkout(monkeypatch):
    from benchmarks.machine import git_provenance

    monkeypatch.delenv("BENCH_GIT_COMMIT", raising=False)
    prov = git_provenance()
    assert prov["commit"] is None or (len(prov["commit"]) == 40 and isinstance(prov["dirty"], bool))


@pytest.mark.parametrize("metrics, fragment", [
    ({"pairs_per_s": -1.0}, "not positive"),
    ({"x": 0}, "not positive"),
    ({"x": float("nan")}, "not finite"),
    ({"x": float("inf")}, "not finite"),
    ({"data_wait_share": 1.5}, "outside [0, 1]"),
    ({"overhead_ms_signed": float("nan")}, "not finite"),
    ({"x": "fast"}, "must be a number"),
    ({"x": True}, "must be a number"),
    ({"pairs_per_s": Stats(-1.0, -2.0, 0.0, 3)}, "not positive"),
])
def test_bad_figures_are_refused_when_added(metrics, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        _result().add("new", "g", {}, **metrics)


@pytest.mark.parametrize("mutate, error", [
    (lambda d: d.pop("machine") and d.pop("config"), KeyError),
    (lambda d: d.update(schema="moco-dali-bench/1"), ValueError),
    (lambda d: d.update(suite="nope"), ValueError),
    (lambda d: d["rows"][0]["metrics"].update(pairs_per_s={"median": 5.0, "min": 6.0, "max": 7.0, "n": 3}),
     ValueError),
    (lambda d: d["rows"][0]["metrics"].update(x=0), ValueError),
    (lambda d: d["rows"].append(dict(d["rows"][0])), ValueError),  # duplicate name
    (lambda d: d["comparisons"][0].update(baseline="nope"), KeyError),
    (lambda d: d["comparisons"][0].update(ratio=-1.0), ValueError),
    (lambda d: d["skipped"].append({"name": "x"}), KeyError),
    (lambda d: d.update(rows=[], skipped=[], comparisons=[]), ValueError),  # measured nothing
])
def test_broken_documents_are_refused_when_read(mutate, error):
    doc = json.loads(json.dumps(report_json(_result(), MACHINE, ["run"], True)))
    mutate(doc)
    with pytest.raises(error):
        load_report(doc)


def test_stats_keep_their_order():
    with pytest.raises(ValueError):
        Stats(5.0, 6.0, 7.0, 3)
    with pytest.raises(ValueError):
        Stats(float("nan"), 1.0, 2.0, 1)
    assert Stats.of([3.0, 1.0, 2.0]).scaled(-1) == Stats(-2.0, -3.0, -1.0, 3)


def test_stats_and_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 101):
        xs = rng.uniform(1, 100, n).tolist()
        st = Stats.of(xs)
        assert (st.median, st.min, st.max, st.n) == pytest.approx((np.median(xs), min(xs), max(xs), n))
        for q in (50, 90, 99):
            assert percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert Stats.of([1.0, 2.0, 4.0]).scaled(1e3) == Stats(2e3, 1e3, 4e3, 3)


def test_measure_excludes_warmup_and_counts_calls():
    calls = []
    tp = measure(lambda: calls.append(1), items_per_call=4, warmup=3, iters=5, repeats=3)
    assert len(calls) == 3 + 5 * 3
    assert tp.items_per_s.n == 3 and tp.items_per_s.min > 0
    # items/s and s/call describe the same repeats (odd n: the median is one of them)
    assert tp.items_per_s.median == pytest.approx(4 / tp.seconds_per_call.median, rel=1e-6)


def test_interleaved_runs_in_alternating_rounds():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b")}
    out = measure_interleaved(fns, items_per_call=1, iters=2, repeats=3)
    assert order == ["a", "a", "b", "b"] * 3
    assert set(out) == {"a", "b"} and all(t.items_per_s.n == 3 for t in out.values())


def test_markdown_table_shows_medians_ranges_and_na():
    result = SuiteResult("e2e", {}, [Column("pairs_per_s", "pairs/s"), Column("gpu", "GPU", "{:.0f}")], "pairs_per_s")
    result.add("loop", "x", {}, pairs_per_s=Stats.of([1.0, 2.0, 3.0]), gpu=None)
    md = markdown_table(result)
    assert "| loop | 2.0 (1.0–3.0) | N/A |" in md
