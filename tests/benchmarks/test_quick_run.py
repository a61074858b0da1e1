"""The GPU procedure (``scripts/gpu_measure.sh``) in its CPU dry mode, stage by stage, and the ``--quick`` suites it
does not run (shards, scaling): every stage exits 0, every suite's JSON reads back through the typed checks, with
its commit, repeats, the tuned baseline and the pass boundaries apart. A smoke test of the real modules and of the
script a GPU session will run, not a speed assertion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import load_report
from tests.conftest import REPO

STAGES = ("prepare", "model", "pipeline", "e2e", "gpu_tests", "train", "model_compile")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dry")
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHON": sys.executable, "WANDB_MODE": "disabled",
           "BUDGET_S": "1200"}
    proc = subprocess.run(["bash", "scripts/gpu_measure.sh", "dry", str(out)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "run", "--suite", "shards,scaling", "--quick",
                           "--device", "cpu", "--out", str(out / "bench")], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _doc(out: Path, suite: str, folder: str = "bench") -> dict:
    doc = json.loads((out / folder / f"{suite}.json").read_text())
    load_report(doc)  # raises on any figure that breaks its rule
    assert doc["quick"] is True and doc["git"]["commit"] and isinstance(doc["git"]["dirty"], bool)
    return doc


@pytest.mark.slow
def test_every_stage_of_the_gpu_procedure_runs_on_a_cpu(dry_run):
    stages = (dry_run / "stages.txt").read_text()
    for name in STAGES:
        assert f"rc=0 {name} " in stages, stages
    assert "skipped" not in stages, stages
    train = (dry_run / "train.log").read_text()
    assert "SIGTERM run: exit 0" in train and "preempted by SIGTERM" in train, train
    assert "resumed from" in train and "resumed run: exit 0" in train, train
    summary = json.loads((dry_run / "run" / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["stop_signal"] is None, summary  # the resumed run finished the 8 steps


@pytest.mark.slow
def test_quick_suites_measure_against_same_run_baselines(dry_run):
    docs = {s: _doc(dry_run, s) for s in ("shards", "model", "pipeline", "e2e", "scaling")}
    names = {s: {r["name"] for r in d["rows"]} for s, d in docs.items()}
    assert {"naive PIL loop", "shards build workers=1"} <= names["shards"]
    assert {"ours fp32", "baseline fp32", "plain encoder step fp32", "ours fp32 batch=32",
            "plain encoder step fp32 batch=32"} <= names["model"]
    for suite in ("shards", "model", "pipeline", "e2e"):
        assert docs[suite]["comparisons"] and docs[suite]["repeats"] >= 3, suite
    model = docs["model"]
    assert all(r["metrics"]["mfu"] is None for r in model["rows"])  # no GPU here: N/A, never a made-up number
    assert "fp32" in model["extra"]["moco_overhead"]
    assert docs["scaling"]["skipped"] and "GPU" in docs["scaling"]["skipped"][0]["reason"]
    compile_doc = _doc(dry_run, "model", "bench_compile")  # --quick on a CPU: the compile rows are counted skips
    assert any("compile" in s["name"] for s in compile_doc["skipped"])


@pytest.mark.slow
def test_loader_figures_keep_pass_boundaries_apart(dry_run):
    pipeline, e2e = _doc(dry_run, "pipeline"), _doc(dry_run, "e2e")
    assert pipeline["config"]["corpus"]["images"] == 192
    rows = {r["name"]: r for r in pipeline["rows"]}
    assert any(n.startswith("PyTorch tuned") for n in rows) and any(n.startswith("DALI CPU") for n in rows)
    for name, row in rows.items():
        m = row["metrics"]
        assert m["batches_per_pass"] == 24 and m["timed_batches"] == 20  # 192 images, batches of 8; 5 windows of 4
        assert m["pairs_per_s"]["n"] == (5 if name.startswith("PyTorch tuned") else 4)
        if name.startswith("PyTorch tuned"):
            assert m["boundary_ms_signed"] is None  # no pass boundary in that loader
        else:
            assert m["boundary_ms_signed"]["n"] == 1  # the window over calls 22-25 crosses the boundary at 24
    assert {c["baseline"] for c in pipeline["comparisons"]} <= {n for n in rows if n.startswith("PyTorch tuned")}
    for row in e2e["rows"]:
        m = row["metrics"]
        assert m["repeats"] == 3 and m["pairs_per_s"]["n"] == 3 and m["data_wait_share"]["n"] == 3
        assert m["step_ms_p50"] <= m["step_ms_p90"] <= m["step_ms_p99"]
        if row["params"]["backend"] == "PyTorch tuned":
            assert m["pass_boundaries"] is None
        else:  # 12 batches of 16 per pass: warm-up step 0, timed steps 1-12, the last one starts pass 1
            assert m["batches_per_pass"] == 12 and m["pass_boundaries"] == 1
            assert 0 <= m["data_wait_share_in_pass"] <= 1 and m["boundary_wait_ms_signed"]["n"] == 1
