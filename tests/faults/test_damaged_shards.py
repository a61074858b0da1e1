"""Damaged shard files at training time, on both backends: never a crash, never a silent loss.

Real shards (3 x 16 real photos) are damaged on disk the way disks and copies do it (``tests/faults/damage.py``):
what cannot be read is skipped, counted and named by ``<tar>:<offset>:<member>``; a shard that cannot be read at
all is dropped with one warning line; every rank still yields the same number of batches per pass.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import DistInfo
from pipeline import build_train_loader
from pipeline.torch_loader import indexed_samples
from shards.check import check_shard
from shards.manifest import ManifestError
from shards.verify import verify_shards
from tests.conftest import REPO, run_torchrun, write_simple_shards
from tests.faults import damage
from tests.pipeline.helpers import BACKENDS, make_cfg

SHARD = "train-000001"  # the shard every case damages (the middle one of three)


@pytest.fixture(scope="module")
def clean(photo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    write_simple_shards(sorted(photo_dir.rglob("*.*")), out, per_shard=16)
    return out


def _files(root: Path) -> tuple[Path, Path]:
    return root / f"{SHARD}.tar", root / f"{SHARD}.idx"


def _damage(case: str, root: Path) -> tuple[list[str], int, str]:
    """Apply ``case`` to the middle shard; returns (lost locations, samples of the dropped shard, warning text)."""
    tar, idx = _files(root)
    if case == "cut_in_data":  # the cut falls in sample 8's JPEG: samples 8..15 are lost
        return damage.truncate_inside(tar, idx, 8, into=100), 0, "truncated at"
    if case == "cut_in_header":  # the cut falls in sample 5's header: 5..15 are lost
        return damage.truncate_in_header(tar, idx, 5), 0, "truncated at"
    if case == "zero_bytes":
        damage.empty_file(tar)
        return [], 16, "empty file (0 bytes)"
    if case == "empty_index":
        damage.empty_file(idx)
        return [], 16, f"index file {SHARD}.idx is unusable (empty index file)"
    if case == "garbled_index":  # same size: stat cannot tell, the reader's check can
        damage.garble_index(idx)
        return [], 16, f"index file {SHARD}.idx is unusable"
    if case == "not_a_tar":  # same size, random bytes
        damage.overwrite_random(tar)
        return [], 16, "not a tar file"
    if case == "foreign_index":  # the index of another shard
        damage.swap_index(idx, root / "train-000002.idx")
        return [], 16, "its index does not match the tar"
    if case == "bad_jpeg":  # an undecodable JPEG in a sound tar: skipped and named, no shard-level warning
        return [damage.spoil_jpeg(tar, idx, 4)], 0, ""
    if case == "first_header":  # a corrupt member header loses nothing: samples are read at the index's offsets
        damage.corrupt_header(tar, idx, 0)
        return [], 0, "1 corrupt member headers"
    raise AssertionError(case)


CASES = ["cut_in_data", "cut_in_header", "zero_bytes", "empty_index", "garbled_index", "not_a_tar", "foreign_index",
         "first_header", "bad_jpeg"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_damaged_shard_is_skipped_counted_and_named(clean, tmp_path, capsys, case, backend):
    root = damage.copy_corpus(clean, tmp_path / "shards")
    lost, dropped, says = _damage(case, root)
    loader = build_train_loader(make_cfg(root, backend), DistInfo())
    try:
        batches = [next(loader) for _ in range(loader.batches_per_pass + 2)]  # into the second pass
        assert all(q.shape == (8, 3, 64, 64) and torch.isfinite(q).all() for q, _ in batches)
        assert loader.bad_samples == len(lost) + dropped
        assert loader.bad_sample_locations == lost
        assert loader.dropped_shards == ({str(root / f"{SHARD}.tar"): 16} if dropped else {})
    finally:
        loader.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and SHARD in warnings[0] and says in warnings[0], warnings


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_cut_while_they_are_read(clean, tmp_path, backend):
    # Damage after the checks: DALI's reader fails, its replay fails too, the shards are checked afresh and the
    # pass restarts without the lost samples; the PyTorch backend's reads come back short, each one counted.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    loader = build_train_loader(make_cfg(root, backend), DistInfo())
    loader.prepare_ahead = None  # no reader built ahead of the boundary: pass 1 is built after the damage
    try:
        next(loader)
        lost = [loc for i in range(3) for loc in damage.truncate_inside(
            root / f"train-{i:06d}.tar", root / f"train-{i:06d}.idx", 8, into=100)]
        for _ in range(2 * loader.batches_per_pass):
            assert next(loader)[0].shape == (8, 3, 64, 64)
        assert sorted(loader.bad_sample_locations) == sorted(lost) and loader.bad_samples == 24
    finally:
        loader.close()


def test_the_plan_deals_what_the_manifest_lists_whatever_the_damage(clean, tmp_path):
    # No survey before dealing (it cost O(shards) at start-up): a cut shard keeps its manifest count in the plan,
    # 3 x 16 samples make 6 batches of 8, and its window's reader cycles through the 40 it can read.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    lost, _, _ = _damage("cut_in_data", root)
    loader = build_train_loader(make_cfg(root, "pytorch"), DistInfo())
    try:
        assert loader.plan.sizes.tolist() == [16, 16, 16] and loader.batches_per_pass == 6
        assert loader.bad_samples == len(lost) == 8  # the first window's shards are checked at construction
    finally:
        loader.close()


def test_corrupt_member_header_loses_nothing(clean, tmp_path):
    # The reported case: a corrupt header of member 3 made the tarfile walk stop there, silently losing 13 of 16.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    tar, idx = _files(root)
    offset = damage.corrupt_header(tar, idx, 3)
    check = check_shard(tar, idx)
    assert check.usable and len(check.samples) == 16 and not check.lost  # the two-end probe does not read it
    full = check_shard(tar, idx, all_headers=True)
    assert [(h.offset, h.name) for h in full.bad_headers] == [(offset, "000000019.jpg")]
    samples = list(indexed_samples([str(tar)], {str(tar): str(idx)}, {}))
    assert len(samples) == 16 and all(s["jpg"] is not None for s in samples)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_is_exact_on_a_damaged_corpus(clean, tmp_path, backend):
    # Shard 1 cut and shard 2's index garbled, each found when the reader of a window holding it is prepared.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    _damage("cut_in_data", root)
    damage.garble_index(root / "train-000002.idx")
    cfg = make_cfg(root, backend)
    loader = build_train_loader(cfg, DistInfo())
    assert loader.batches_per_pass == 6
    for _ in range(4):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(4)]  # across the pass boundary (after batch 6)
    loader.close()
    resumed = build_train_loader(cfg, DistInfo())
    resumed.load_state_dict(state)
    try:
        got = [next(resumed) for _ in range(4)]
        assert resumed.bad_samples == 8 + 16 and resumed.pass_index == 1
    finally:
        resumed.close()
    for (q1, k1), (q2, k2) in zip(expected, got):
        assert torch.equal(q1, q2) and torch.equal(k1, k2)


def test_resume_onto_newly_damaged_shards_counts_them(clean, tmp_path, capsys):
    root = damage.copy_corpus(clean, tmp_path / "shards")
    cfg = make_cfg(root, "pytorch")
    loader = build_train_loader(cfg, DistInfo())
    next(loader)
    state = loader.state_dict()
    loader.close()
    _damage("cut_in_data", root)  # between the checkpoint and the relaunch
    capsys.readouterr()
    resumed = build_train_loader(cfg, DistInfo())
    resumed.load_state_dict(state)
    try:
        assert next(resumed)[0].shape == (8, 3, 64, 64) and resumed.bad_samples == 8
    finally:
        resumed.close()
    err = capsys.readouterr().err
    assert "changed since the checkpoint" not in err  # the plan deals the manifest: same order of windows
    assert "train-000001.tar: truncated at" in err


def _dealt_in(loader, passes: int, shard: int) -> list[int]:
    """The ranks that were dealt ``shard`` in any of the first ``passes`` passes."""
    return sorted({r for p in range(passes) for r in range(loader.plan.world_size)
                   if shard in loader.plan.rank_shards(p, r).tolist()})


@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_yield_the_same_batches_when_a_shard_is_dropped(clean, tmp_path, capsys, backend):
    # 3 shards over 2 ranks with one of them empty: a rank whose share is that shard alone reads readable shards of
    # the manifest in its place. Each rank counts and says the damage its own windows' checks find.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    _damage("zero_bytes", root)
    cfg = make_cfg(root, backend, batch_size_per_gpu=4)
    loaders = [build_train_loader(cfg, DistInfo(rank=r, world_size=2)) for r in range(2)]
    try:
        assert [loader.batches_per_pass for loader in loaders] == [4, 4]
        for loader in loaders:
            for _ in range(2 * loader.batches_per_pass + 1):
                assert next(loader)[0].shape == (4, 3, 64, 64)
            assert loader.pass_index == 2
        finders = _dealt_in(loaders[0], 3, 1)
        assert finders and [loader.bad_samples for loader in loaders] == [16 * (r in finders) for r in range(2)]
    finally:
        for loader in loaders:
            loader.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert sorted(line.split(":")[1] for line in warnings) == [f" rank {r}" for r in finders], warnings


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_window_left_without_a_shard_reads_the_rest_of_the_pass(clean, tmp_path, capsys, backend):
    # One shard per window (reader): the window whose only shard has a garbled index reads shards 0 and 2 instead.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    _damage("garbled_index", root)
    loader = build_train_loader(make_cfg(root, backend, window_shards=1), DistInfo())
    try:
        assert loader.windows_per_pass == 3 and loader.batches_per_pass == 6
        for _ in range(loader.batches_per_pass + 1):
            assert next(loader)[0].shape == (8, 3, 64, 64)
        assert loader.pass_index == 1 and loader.bad_samples == 16
    finally:
        loader.close()
    assert sum(line.startswith("warning:") for line in capsys.readouterr().err.splitlines()) == 1


def test_a_rank_dealt_only_an_unreadable_shard_reads_another(clean, tmp_path):
    # One shard per rank: whichever rank is dealt the empty shard in a pass reads a readable shard of the manifest
    # in its place, so all three ranks yield their batches (no rank stalls a collective, none fails).
    root = damage.copy_corpus(clean, tmp_path / "shards")
    _damage("zero_bytes", root)
    cfg = make_cfg(root, "pytorch", batch_size_per_gpu=4, num_threads=1)
    loaders = [build_train_loader(cfg, DistInfo(rank=r, world_size=3)) for r in range(3)]
    try:
        assert [loader.batches_per_pass for loader in loaders] == [4, 4, 4]
        for loader in loaders:
            for _ in range(2 * loader.batches_per_pass):
                assert next(loader)[0].shape == (4, 3, 64, 64)
        finders = _dealt_in(loaders[0], 2, 1)
        assert [loader.dropped_shards for loader in loaders] == [
            {str(root / f"{SHARD}.tar"): 16} if r in finders else {} for r in range(3)]
        for r in finders:  # the shard it read instead: the next readable one of the manifest
            p = next(p for p in range(2) if loaders[r].plan.rank_shards(p, r).tolist() == [1])
            assert loaders[r].readable_window(p * loaders[r].windows_per_pass) == [2]
    finally:
        for loader in loaders:
            loader.close()


@pytest.mark.slow
def test_ranks_of_a_process_group_check_their_own_windows(clean, tmp_path):
    # Real gloo ranks, no collective in the loader: each rank checks the shards of its own windows. Seed 0 deals the
    # empty shard to both ranks (pass 0 and pass 1): each counts it, the exchanged ledger counts it once.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    _damage("zero_bytes", root)
    proc = run_torchrun(Path(__file__).with_name("dist_worker_damaged.py"), nproc=2,
                        args=[str(root), "dali", str(tmp_path)], timeout=240)
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [s["batches_per_pass"] for s in seen] == [4, 4] and [s["pass"] for s in seen] == [2, 2]
    assert all(s["shapes"] == [[4, 3, 64, 64]] for s in seen)
    finders = [r for r in range(2) if seen[r]["dealt_shard_1"]]
    assert finders == [0, 1] and [s["bad"] for s in seen] == [16, 16]
    assert [(s["ledger"], s["ledger_count"]) for s in seen] == [([[f"{SHARD}.tar", "", 16]], 16)] * 2
    assert all(s["dropped"] == ([str(root / f"{SHARD}.tar")] if r in finders else []) for r, s in enumerate(seen))
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("warning:")]
    assert len(said) == len(finders) and all("empty file (0 bytes)" in line for line in said)


def test_a_corpus_without_a_readable_shard_is_a_one_line_error(clean, tmp_path):
    root = damage.copy_corpus(clean, tmp_path / "shards")
    for i in range(3):
        damage.empty_file(root / f"train-{i:06d}.tar")
    with pytest.raises(ManifestError, match="none of the 3 shards .* can be read .*shards verify"):
        build_train_loader(make_cfg(root, "pytorch"), DistInfo())


@pytest.mark.parametrize("case", CASES)
def test_verify_names_each_kind_of_damage(clean, tmp_path, case):
    root = damage.copy_corpus(clean, tmp_path / "shards")
    lost, dropped, says = _damage(case, root)
    report = verify_shards(root, dali=False)
    assert not report.ok
    mine = [e for e in report.errors if SHARD in e]
    assert mine and all(e.startswith(f"{SHARD}.") for e in mine), report.errors
    text = "\n".join(mine)
    if lost and case != "bad_jpeg":
        assert says in text and f"{len(lost)} of 16 samples lost" in text
        assert f"first at {lost[0].split(':')[-2]}" in text
    elif case == "first_header":
        assert "corrupt tar header at offset 0 (000000016.jpg): not a tar header" in text
    elif case == "bad_jpeg":
        assert f"{lost[0].rsplit('/', 1)[-1]}: jpg does not decode" in text
    else:
        assert says in text and (len(mine) == 1 or not dropped)  # an unreadable shard is one line, not 16


def test_verify_names_a_missing_index_and_checks_the_other_shards(clean, tmp_path):
    root = damage.copy_corpus(clean, tmp_path / "shards")
    (root / f"{SHARD}.idx").unlink()
    damage.empty_file(root / "train-000002.tar")
    report = verify_shards(root, dali=False)
    structural = [e for e in report.errors if "json says" not in e]  # these shards' JSON records no image size
    assert structural == [f"{SHARD}.idx: missing index file", "train-000002.tar: empty file (0 bytes)"]
    assert report.shards == 3 and report.samples == 16


def test_verify_cli_exits_1_on_damage(clean, tmp_path, capsys):
    from shards.__main__ import main

    root = damage.copy_corpus(clean, tmp_path / "shards")
    _damage("cut_in_data", root)
    assert main(["verify", str(root)]) == 1  # the DALI pass is skipped once a problem is found
    out, err = capsys.readouterr()
    assert f"FAIL {SHARD}.tar: truncated at" in err and "FAILED: 3 shards, 40 samples" in out


@pytest.mark.slow
def test_train_runs_to_the_end_on_a_damaged_corpus(clean, tmp_path):
    # DALI: the default backend, and the one whose failed-batch replay used to raise again on a cut tar.
    root = damage.copy_corpus(clean, tmp_path / "shards")
    lost, _, _ = _damage("cut_in_data", root)
    damage.empty_file(root / "train-000002.idx")
    run_dir = tmp_path / "run"
    args = ["--shards", root, "--run-dir", run_dir, "--total-steps", 3, "--arch", "resnet18", "--crop-size", 32,
            "--batch-size", 8, "--split-bn-groups", 2, "--queue-size", 16, "--num-threads", 1, "--shuffle-buffer", 8,
            "--log-every", 1, "--checkpoint-every-minutes", 0, "--image-log-every", 0, "--wandb-mode", "disabled",
            "--device", "cpu", "--backend", "dali"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "train-000001.tar: truncated" in warnings[0] and "train-000002" in warnings[1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["bad_samples"] == len(lost) + 16


@pytest.mark.slow
def test_two_ranks_count_a_shard_they_both_drop_once_and_a_resume_keeps_the_count(clean, tmp_path):
    # Seed 0 deals the emptied shard to rank 1 in pass 0 and to rank 0 in pass 1 (4 steps a pass): both drop it, and
    # the run counts its 16 samples once, so --max-bad-samples 16 lets it finish (a sum over ranks, 32, stopped it).
    root = damage.copy_corpus(clean, tmp_path / "shards")
    damage.empty_file(root / f"{SHARD}.tar")
    run_dir = tmp_path / "run"
    args = ["--shards", root, "--run-dir", run_dir, "--arch", "resnet18", "--crop-size", 32, "--batch-size", 8,
            "--split-bn-groups", 2, "--queue-size", 16, "--num-threads", 1, "--shuffle-buffer", 8, "--log-every", 2,
            "--checkpoint-every-minutes", 0, "--image-log-every", 0, "--wandb-mode", "disabled", "--device", "cpu",
            "--backend", "pytorch", "--seed", 0, "--max-bad-samples", 16]
    proc = run_torchrun(REPO / "train.py", nproc=2, args=[*map(str, args), "--total-steps", "6"], timeout=300)
    said = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert sorted(line.split(":")[1] for line in said) == [" rank 0", " rank 1"], said
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["bad_samples"] == 16 and summary["bad_shards"] == 1
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_samples"] for r in logged if "loss" in r] == [16, 16, 16]
    state = torch.load(run_dir / "checkpoints" / f"step-{6:09d}.pt", weights_only=True)
    assert [list(s["dropped_shards"].values()) for s in state["loader"]] == [[16], [16]]
    assert state["bad_data"] == {"items": [[f"{SHARD}.tar", "", 16]]}
    # One rank now, the shard repaired: no loader state is restored (another world size) and nothing is found
    # again, yet the count carries on from the checkpoint.
    shutil.copyfile(clean / f"{SHARD}.tar", root / f"{SHARD}.tar")
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *map(str, args), "--total-steps", "8"], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "data order restarts" in proc.stderr and SHARD not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["world_size"] == 1 and summary["bad_samples"] == 16
