"""The JSON schema validator, the statistics and the timing helpers, against plain references."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from benchmarks.report import SCHEMA, Column, SuiteResult, markdown_table, report_json, validate_report
from benchmarks.timing import Stats, measure, measure_interleaved, percentile


def _doc() -> dict:
    result = SuiteResult("model", config={"batch": 8}, columns=[Column("pairs_per_s", "pairs/s")],
                         plot_metric="pairs_per_s")
    result.add("ours", "precision", {"p": "fp32"}, pairs_per_s=Stats.of([10.0, 11.0, 12.0]), mfu=None,
               overhead_ms_signed=-0.5, data_wait_share=0.0)
    result.add("baseline", "baseline", {}, pairs_per_s=Stats.of([5.0, 6.0]))
    result.compare("ours vs baseline", "ours", "baseline", "pairs_per_s")
    result.skip("compile", "no GPU")
    return report_json(result, {"cpu_model": "x", "cpu_cores": 2, "gpu_count": 0, "torch": "2"}, ["run"], True)


def test_valid_document_passes_and_ratio_is_ours_over_baseline():
    doc = _doc()
    assert validate_report(doc) == []
    assert doc["schema"] == SCHEMA
    assert doc["comparisons"][0]["ratio"] == pytest.approx(11.0 / 5.5)


@pytest.mark.parametrize("mutate, fragment", [
    (lambda d: d.pop("machine"), "missing key 'machine'"),
    (lambda d: d["rows"][0]["metrics"].update(pairs_per_s={"median": -1.0, "min": -2.0, "max": 0.0, "n": 3}),
     "not positive"),
    (lambda d: d["rows"][0]["metrics"].update(x=float("nan")), "not finite"),
    (lambda d: d["rows"][0]["metrics"].update(x=float("inf")), "not finite"),
    (lambda d: d["rows"][0]["metrics"].update(x=0), "not positive"),
    (lambda d: d["rows"][0]["metrics"].update(data_wait_share=1.5), "outside [0, 1]"),
    (lambda d: d["rows"][0]["metrics"].update(overhead_ms_signed=float("nan")), "not finite"),
    (lambda d: d["rows"][0]["metrics"].update(pairs_per_s={"median": 5.0, "min": 6.0, "max": 7.0, "n": 3}),
     "min <= median <= max"),
    (lambda d: d["rows"][0]["metrics"].update(x="fast"), "must be a number"),
    (lambda d: d["rows"].append(copy.deepcopy(d["rows"][0])), "duplicate row name"),
    (lambda d: d["comparisons"][0].update(baseline="nope"), "names no row"),
    (lambda d: d["comparisons"][0].update(ratio=-1.0), "not positive"),
    (lambda d: d["extra"].update(bytes={"W=2": float("nan")}), "not finite"),
    (lambda d: d["skipped"].append({"name": "x"}), "needs a name and a reason"),
    (lambda d: d.update(suite="nope"), "unknown suite"),
    (lambda d: d.update(rows=[], skipped=[]), "measured nothing"),
])
def test_invalid_documents_are_rejected(mutate, fragment):
    doc = _doc()
    mutate(doc)
    problems = validate_report(doc)
    assert any(fragment in p for p in problems), problems


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
    assert math.isfinite(float("2.0"))
