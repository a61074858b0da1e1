"""The scale suite's loader curves: worker runs become median rows, and the +-20% bar is checked on each curve."""

from benchmarks.report import SuiteResult
from benchmarks.scale import COLUMNS, _add_point, flat_check


def _point(shards: int, build: float, rss: float) -> dict:
    return {"ok": True, "shards": 100_000, "rank_shards": shards, "samples": 100 * shards,
            "world_size": 100_000 // shards,
            "windows_per_pass": -(-shards // 256), "batches_per_pass": 1, "window_shards": 256, "build_s": build,
            "build_cpu_s": build, "construct_s": build / 2, "first_batch_s": build / 2, "peak_rss_mib": rss,
            "import_rss_mib": 700.0, "state_dict_s": 0.001, "manifest_s": 0.4, "manifest_parse_s": 0.2}


def test_points_are_medians_and_the_bar_is_max_over_min_of_the_best_runs():
    result = SuiteResult("scale", config={}, columns=COLUMNS, plot_metric="build_s")
    for shards, builds in ((1_000, [1.0, 5.0, 1.1]), (10_000, [1.1, 1.12, 1.2]), (100_000, [1.15, 1.15, 1.15])):
        _add_point(result, f"fixed {shards}", "loader_fixed", {"window_shards": 256},
                   [_point(shards, b, 800.0 + shards / 10_000) for b in builds])
    assert result.row("fixed 1000").value("build_s") == 1.1  # the median, not the disturbed run
    flat_check(result, "loader_fixed", "fixed_manifest", "one manifest")
    assert abs(result.extra["fixed_manifest_build_s_max_over_min"] - 1.15 / 1.0) < 1e-9  # best runs: 1.0, 1.1, 1.15
    assert abs(result.extra["fixed_manifest_build_s_median_max_over_min"] - 1.15 / 1.1) < 1e-9
    assert result.extra["fixed_manifest_build_s_within_20pct"] is True
    assert result.extra["fixed_manifest_peak_rss_mib_within_20pct"] is True
    assert "1k / 10k / 100k shards/rank" in result.notes[-1] and "build time 1.15x (within +-20%)" in result.notes[-1]
    assert result.markdown_extra.endswith(result.notes[-1])


def test_a_failed_run_is_a_skip_and_a_slow_share_fails_the_bar():
    result = SuiteResult("scale", config={}, columns=COLUMNS, plot_metric="build_s")
    assert not _add_point(result, "broken", "loader", {}, [_point(1_000, 1.0, 800.0), {"ok": False, "error": "boom"}])
    assert result.skipped == [{"name": "broken", "reason": "failed: boom"}]
    for shards, build in ((1_000, 0.4), (100_000, 1.0)):
        _add_point(result, f"share {shards}", "loader", {}, [_point(shards, build, 800.0)])
    flat_check(result, "loader", "windowed", "manifest = share")
    assert result.extra["windowed_build_s_within_20pct"] is False and "build time 2.50x (NOT within" in result.notes[-1]
