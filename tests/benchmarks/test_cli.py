"""Command-line mistakes are one-line errors with exit code 2; `validate` flags a broken file."""

from __future__ import annotations

import json

import pytest

from benchmarks.__main__ import main


@pytest.mark.parametrize("args, message", [
    (["--suite", "model,nope"], "expected all or a comma-separated list"),
    (["--suite", "scaling", "--shards", "/nonexistent/shards"], "--shards /nonexistent/shards: not a directory"),
    (["--suite", "scaling", "--torch-threads", "-1"], "--torch-threads must be >= 0"),
])
def test_bad_arguments(tmp_path, capsys, args, message):
    assert main(["run", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_scaling_on_a_machine_without_gpus_is_a_counted_skip(tmp_path, capsys):
    assert main(["run", "--suite", "scaling", "--out", str(tmp_path), "--device", "cpu"]) == 0
    doc = json.loads((tmp_path / "scaling.json").read_text())
    assert doc["rows"] == [] and "needs more than one GPU" in doc["skipped"][0]["reason"]
    assert main(["validate", str(tmp_path / "scaling.json")]) == 0
    doc["rows"] = [{"name": "x", "group": "g", "params": {}, "metrics": {"pairs_per_s": -3.0}}]
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    assert main(["validate", str(tmp_path / "bad.json")]) == 1
    assert "not positive" in capsys.readouterr().out


def test_only_selects_configurations_in_the_loader_suites(shard_dir, tmp_path):
    args = ["run", "--suite", "pipeline", "--quick", "--device", "cpu", "--shards", str(shard_dir), "--out", str(tmp_path)]
    assert main([*args, "--only", "^DALI CPU threads=1 "]) == 0
    doc = json.loads((tmp_path / "pipeline.json").read_text())
    assert [row["name"] for row in doc["rows"]] == ["DALI CPU threads=1 batch=8"]
    assert main(["validate", str(tmp_path / "pipeline.json")]) == 0


@pytest.mark.parametrize("args, message", [
    (["run", "--device", "gpu"], "error: --device must be one of auto, cuda, cpu; got 'gpu'"),
    (["run", "--only", "("], "error: --only '(': not a regular expression"),
    (["prepare", "--images", "-3"], "error: --images must be >= 0; got -3"),
    (["run", "--quick", "yes"], "error: unrecognized arguments: yes"),
])
def test_flag_mistakes_are_one_line_errors(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1


def test_help_lists_choices_and_flag_pairs_without_importing_torch():
    import subprocess
    import sys

    code = ("import atexit, sys; atexit.register(lambda: print('torch' in sys.modules)); "
            "from benchmarks.__main__ import main; main(['run', '--help'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 0 and out.endswith("False")
    assert "--device {auto,cuda,cpu} auto: CUDA when available. (default: auto)" in out
    assert "--quick/--no-quick" in out and "(default: None)" not in out
