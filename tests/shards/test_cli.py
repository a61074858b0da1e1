"""`python -m shards`: one-line errors before work, stats, and verify catching a corrupted shard or index."""

from __future__ import annotations

import shutil

import pytest

from shards.__main__ import main
from shards.build import BuildOptions, build_shards


@pytest.fixture(scope="module")
def built(photo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    build_shards([str(photo_dir)], out, BuildOptions(samples_per_shard=16, workers=1, progress=False))
    return out


@pytest.mark.parametrize("args, message", [
    (["build", "/no/such/dir", "--out", "{tmp}/o"], "error: input not found: /no/such/dir"),
    (["build", "{photos}", "--out", "/proc/forbidden/out"], "error: cannot write to output directory"),
    (["build", "{photos}", "--out", "{tmp}/o", "--part", "3/2"], "error: --part must be i/n"),
    (["build", "{photos}", "--out", "{tmp}/o", "--quality", "0"], "error: --quality must be in 1..100"),
    (["verify", "{tmp}/nothing"], "FAIL shard manifest not found"),
])
def test_bad_invocations_are_one_line_errors(args, message, photo_dir, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, photos=photo_dir) for a in args]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and err.startswith(message) and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing built


def test_resume_with_other_options_is_refused(built, photo_dir, capsys):
    assert main(["build", str(photo_dir), "--out", str(built), "--samples-per-shard", "16", "--quality", "80"]) == 2
    assert "built with other options" in capsys.readouterr().err


def test_stats_reports_totals_and_histogram(built, capsys):
    assert main(["stats", str(built)]) == 0
    out = capsys.readouterr().out
    assert "samples           48" in out and "shards            3" in out and "JPEG size histogram" in out
    rows = [line for line in out.splitlines() if "KiB" in line and "#" in line]
    assert sum(int(r.split()[-2]) for r in rows) == 48


def test_verify_passes_then_catches_corruption(built, tmp_path, capsys):
    assert main(["verify", str(built)]) == 0
    assert "OK: 3 shards, 48 samples, 48 read by DALI" in capsys.readouterr().out

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    tar = bad / "train-000001.tar"
    data = bytearray(tar.read_bytes())
    data[512:520] = bytes(8)  # the first JPEG's SOI / APP0 markers (its data starts after one 512-byte header)
    tar.write_bytes(bytes(data))
    assert main(["verify", str(bad), "--no-dali"]) == 1
    assert "train-000001.tar:" in capsys.readouterr().err

    shutil.rmtree(bad)
    shutil.copytree(built, bad)
    idx = bad / "train-000002.idx"
    lines = idx.read_text().splitlines()
    idx.write_text("\n".join(lines[:1] + [lines[2], lines[1]] + lines[3:]) + "\n")  # samples swapped
    assert main(["verify", str(bad)]) == 1
    assert "index does not match" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["build", "in", "--out", "o", "--quality", "high"], "error: --quality must be an integer; got 'high'"),
    (["build", "in", "--out", "o", "--max-aspect", "nan"], "error: --max-aspect must be a finite number"),
    (["build", "in"], "error: the following arguments are required: --out"),
    (["shrink", "x"], "error: argument {build,verify,stats,merge-manifests}: invalid choice: 'shrink'"),
])
def test_flag_mistakes_are_one_line_errors(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1


def test_help_shows_defaults_once_and_booleans_as_flag_pairs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["build", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_.value.code == 0
    assert "--progress/--no-progress show a progress bar on a terminal. (default: True)" in out
    assert "--quality N JPEG quality" in out and out.count("(default: 90)") == 1
    assert "(default: None)" not in out


def test_no_progress_and_no_dali_still_work(built, tmp_path, photo_dir):
    out = tmp_path / "again"
    assert main(["build", str(photo_dir), "--out", str(out), "--samples-per-shard", "16", "--workers", "1",
                 "--no-progress"]) == 0
    assert main(["verify", str(out), "--no-dali"]) == 0
