"""`python -m benchmarks run --suite all --quick` end to end: every suite's JSON follows the schema, every figure is
positive and finite, plots and tables are written. A smoke test of the real modules, not a speed assertion."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import SUITES, validate_report
from tests.conftest import REPO


def _figures(value, path=""):
    """Every number under a metrics dict, with its path (a plain walk, independent of the validator)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _figures(v, f"{path}.{k}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "all", "--quick", "--out", str(out)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    return out, proc


@pytest.mark.slow
def test_quick_run_writes_valid_reports(quick_run):
    out, proc = quick_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for suite in SUITES:
        doc = json.loads((out / f"{suite}.json").read_text())
        assert validate_report(doc) == [], (suite, validate_report(doc))
        assert doc["quick"] is True and doc["machine"]["cpu_cores"] >= 1
        assert (out / f"{suite}.png").stat().st_size > 1000
        for row in doc["rows"]:
            for path, x in _figures(row["metrics"]):
                assert math.isfinite(x), (suite, row["name"], path, x)
                if path.split(".")[1].endswith("_share"):
                    assert 0 <= x <= 1, (suite, row["name"], path, x)
                elif not path.split(".")[1].endswith("_signed"):
                    assert x > 0, (suite, row["name"], path, x)
    summary = (out / "summary.md").read_text()
    assert all(f"### {s}" in summary for s in SUITES)


@pytest.mark.slow
def test_quick_run_measures_every_suite_against_its_baseline(quick_run):
    out, _ = quick_run
    docs = {s: json.loads((out / f"{s}.json").read_text()) for s in SUITES}
    names = {s: {r["name"] for r in d["rows"]} for s, d in docs.items()}
    assert {"naive PIL loop", "shards build workers=1"} <= names["shards"]
    assert {"ours fp32", "baseline fp32", "plain encoder step fp32"} <= names["model"]
    assert any(n.startswith("DALI CPU") for n in names["pipeline"]) and any(n.startswith("PyTorch") for n in names["pipeline"])
    assert {"train loop, DALI CPU loader", "train loop, PyTorch loader"} <= names["e2e"]
    for suite in ("shards", "model", "pipeline", "e2e"):
        assert docs[suite]["comparisons"], suite
    model = docs["model"]
    assert model["config"]["encoder_fwd_gflops_per_image"] > 0
    assert all(r["metrics"]["mfu"] is None for r in model["rows"])  # no GPU here: N/A, never a made-up number
    assert set(model["extra"]["shuffle_bn_bytes"]["mib"]) >= {"gather", "all_to_all", "sync", "baseline"}
    assert "fp32" in model["extra"]["moco_overhead"]
    e2e = docs["e2e"]["rows"][0]["metrics"]
    assert e2e["step_ms_p50"] <= e2e["step_ms_p90"] <= e2e["step_ms_p99"]
    # pass boundaries reported apart from the steady state, so any corpus size's figure can be worked out
    for row in docs["pipeline"]["rows"]:
        m = row["metrics"]
        assert m["batches_per_pass"] == row["params"]["batches_per_pass"] == 6  # 48 images, batches of 8
        assert m["pairs_per_s"]["min"] > 0 and m["pairs_per_s_this_corpus"]["min"] > 0 and m["batch_ms"]["min"] > 0
        assert m["boundary_ms_signed"]["n"] == docs["pipeline"]["config"]["timed_passes"]
        assert all(math.isfinite(m["boundary_ms_signed"][k]) for k in ("median", "min", "max"))
    for row in docs["e2e"]["rows"]:
        m = row["metrics"]
        assert m["pass_boundaries"] >= 1 and m["batches_per_pass"] == 3  # 48 images, batches of 16
        assert 0 <= m["data_wait_share_in_pass"] <= 1 and m["pairs_per_s_in_pass"] > 0
        assert math.isfinite(m["boundary_wait_ms_signed"]["median"]) and m["boundary_wait_ms_signed"]["n"] >= 1
    # scaling needs > 1 GPU: here a counted skip with its reason
    assert docs["scaling"]["skipped"] and "GPU" in docs["scaling"]["skipped"][0]["reason"]
