"""The sharder rows of the scale suite: each memory point measures its own process, never its parent's peak."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import benchmarks.scale_shards as scale_shards
from tests.conftest import REPO


def test_a_point_reports_its_own_peak_not_its_parents():
    """A parent that once held 300 MiB starts a point process: ``ru_maxrss`` there reads the parent's peak (Linux keeps
    it across fork and exec), the point's figure reads its own."""
    parent = (
        "import resource, subprocess, sys\n"
        "big = bytearray(300 * 2**20)\n"
        "for i in range(0, len(big), 4096): big[i] = 1\n"
        "del big\n"
        "code = 'import resource, benchmarks.scale_shards as b; "
        "print(b._peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)'\n"
        "print(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout)\n"
    )
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, cwd=REPO, check=True).stdout
    own, inherited = map(float, out.split())
    assert own < 150, own
    if sys.platform == "linux":
        assert inherited > 300, inherited  # the reason: the point's own figure cannot come from ru_maxrss


def test_part_points_make_one_row_per_list_and_part(tmp_path, monkeypatch):
    monkeypatch.setattr(scale_shards, "PART_COUNTS", (1, 10))
    doc = {"rows": [], "notes": [], "skipped": []}
    scale_shards._part_memory(doc, tmp_path, None, (200, 2000))
    assert [r["name"] for r in doc["rows"]] == [f"part 0/{n} of a {lines:,}-line list (after)"
                                                for lines in (200, 2000) for n in (1, 10)]
    for row in doc["rows"]:
        params, metrics = row["params"], row["metrics"]
        assert params["part_inputs"] == params["list_inputs"] // params["parts"] and params["code"] == "after"
        assert 0 < metrics["part_rss_mib"] < metrics["peak_rss_mib"] < 1000 and metrics["build_s"] > 0
    assert [item["name"] for item in doc["skipped"]] == [r["name"].replace("after", "before") for r in doc["rows"]]
    assert doc["notes"][0].startswith("part memory (after), peak RSS over a one-input build's, MiB: "
                                      "a part of 200 inputs in a list of 200 lines ")
    png = scale_shards.plot_part_memory([(r["params"], r["metrics"]) for r in doc["rows"]], tmp_path / "curve.png")
    assert png is None or Path(png).stat().st_size > 0
