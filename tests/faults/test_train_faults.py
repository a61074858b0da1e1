"""Training-side faults, caused for real: user mistakes, a diverging loss, full disks, dead and stopped peers, signals.

Real shards of real photos, real checkpoint files, real processes and signals (ResNet-18 at 32 px, a few steps).
User mistakes run ``train.main`` in-process (they must fail before any work, so they are quick); everything that
needs a process (signals, ranks, Slurm, a full filesystem) runs ``python train.py``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import cli
import config as config_lib
import train
from distributed import DistInfo, free_port
from tests.conftest import REPO
from training.checkpoint import (
    Checkpointer,
    CheckpointWriteError,
    NonFiniteState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    tensors_in,
)
from training.preemption import requeue_slurm_job
from training.resume import load_resume_state


def train_args(shards: Path, run_dir: Path, **overrides) -> list[str]:
    """The smallest real run: ResNet-18 at 32 px, global batch 8, on the CPU with the PyTorch loader."""
    args = {
        "shards": shards, "run-dir": run_dir, "total-steps": 3, "arch": "resnet18", "crop-size": 32, "batch-size": 8,
        "queue-size": 16, "num-threads": 1, "shuffle-buffer": 16, "split-bn-groups": 2, "lr": 0.01,
        "schedule": "constant", "log-every": 1, "checkpoint-every-steps": 0, "checkpoint-every-minutes": 0,
        "image-log-every": 0, "wandb-mode": "disabled", "device": "cpu", "backend": "pytorch", "seed": 7,
        "torch-threads": 1,
    }
    args.update({k.replace("_", "-"): v for k, v in overrides.items()})
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **extra}


def start(args: list[str], **extra_env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], env=env(**extra_env), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list[str], timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], env=env(**extra_env), cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def the_error_line(stderr: str) -> str:
    """The one ``error: ...`` line of a failed run; no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        if proc.poll() is not None:
            pytest.fail(f"train.py exited early ({proc.returncode}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    pytest.fail(f"no {steps} steps logged in {timeout} s")


# ----------------------------------------------------------------------------- user mistakes: exit 2, no work


def _main(argv: list[str], capsys) -> tuple[int, str]:
    code = train.main(argv)
    return code, capsys.readouterr().err


def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error(shard_dir, tmp_path, capsys):
    for content in (b"hello, not a checkpoint\n", b""):
        bogus = tmp_path / "notes.pt"
        bogus.write_bytes(content)
        code, err = _main(train_args(shard_dir, tmp_path / "run", resume=bogus), capsys)
        assert code == 2 and "is not a checkpoint of this project" in the_error_line(err)
    torch.save({"weights": torch.zeros(2)}, bogus)  # a real torch file, but not a training checkpoint
    code, err = _main(train_args(shard_dir, tmp_path / "run", resume=bogus), capsys)
    assert code == 2 and "is not a training checkpoint" in the_error_line(err)
    assert not (tmp_path / "run").exists()  # found before any work: not even config.yaml


def test_a_run_dir_that_is_a_file_and_a_batch_larger_than_the_data_are_one_line_errors(shard_dir, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("something else")
    code, err = _main(train_args(shard_dir, taken), capsys)
    assert code == 2 and f"{taken} is a file" in the_error_line(err)
    code, err = _main(train_args(shard_dir, tmp_path / "run", batch_size=64, split_bn_groups=1), capsys)
    line = the_error_line(err)
    assert code == 2 and "data.batch_size=64 is more than the data can fill" in line and "48 samples" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("flag, value, field", [("device", "cuda", "run.device=cuda"),
                                                ("dali_device", "gpu", "data.dali_device=gpu")])
def test_asking_for_a_gpu_on_a_machine_without_one_is_a_one_line_error(shard_dir, tmp_path, capsys, flag, value,
                                                                        field):
    code, err = _main(train_args(shard_dir, tmp_path / "run", **{flag: value}), capsys)
    line = the_error_line(err)
    assert code == 2 and field in line and "no CUDA GPU" in line


def _fake_checkpoint(run_dir: Path, argv: list[str], step: int = 3) -> Path:
    """A real checkpoint file with the config a run with ``argv`` resolves to (no weights: only the check reads it)."""
    saved = config_lib.to_dict(cli.parse(config_lib.Config, argv))
    path = run_dir / "checkpoints" / f"step-{step:09d}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"step": step, "model": {}, "config": saved}, path)
    return path


def test_resuming_with_another_config_names_every_field_that_differs(shard_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    _fake_checkpoint(run_dir, train_args(shard_dir, run_dir))
    changed = train_args(shard_dir, run_dir, arch="resnet34", queue_size=32, stem="cifar", backend="dali",
                         batch_size=16, seed=8, total_steps=9)
    code, err = _main(changed, capsys)
    line = the_error_line(err)
    assert code == 2 and "was written with a different config" in line
    for change in ("model.arch 'resnet18' -> 'resnet34'", "model.queue_size 16 -> 32",
                   "model.stem 'imagenet' -> 'cifar'", "data.backend 'pytorch' -> 'dali'", "data.batch_size 8 -> 16",
                   "run.seed 7 -> 8"):
        assert change in line
    assert "total_steps" not in line  # may change on resume
    assert not (run_dir / "config.yaml").exists()  # the rejected config did not replace anything


def test_what_may_change_on_resume_is_one_warning_line(shard_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    path = _fake_checkpoint(run_dir, train_args(shard_dir, run_dir))
    changed = cli.parse(config_lib.Config, train_args(shard_dir, run_dir, total_steps=9, log_every=2,
                                                      checkpoint_every_steps=5, wandb_project="other"))
    found, state = load_resume_state("auto", run_dir / "checkpoints", config_lib.to_dict(changed), verbose=True)
    assert found == path and state["step"] == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: resuming step-000000003.pt with ")
    for change in ("run.total_steps 3 -> 9", "run.log_every 1 -> 2", "run.checkpoint_every_steps 0 -> 5",
                   "run.wandb_project 'moco' -> 'other'", "schedules follow the new length"):
        assert change in lines[0]


def test_the_old_max_bad_batches_field_is_gone_and_the_threshold_counts_samples():
    fields = {f.name for f in config_lib.dataclasses.fields(config_lib.DataConfig)}
    assert "max_bad_samples" in fields and "max_bad_batches" not in fields
    with pytest.raises(cli.ConfigError, match=r"data\.max_bad_batches.*renamed.*data\.max_bad_samples"):
        config_lib.from_dict({"data": {"max_bad_batches": 10}}, source="old.yaml")


# ----------------------------------------------------------------------------- non-finite loss


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(shard_dir, tmp_path):
    """lr 1e30 overflows the weights at step 2 (weight decay alone moves them by lr x 1e-4 x w): the loss read at the
    log step is NaN, the run stops with one line and exit 1, and the step-1 checkpoint stays as it was."""
    proc = run(train_args(shard_dir, tmp_path, total_steps=8, lr=1e30, checkpoint_every_steps=1))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = the_error_line(proc.stderr)
    kept = tmp_path / "checkpoints" / "step-000000001.pt"
    assert line.startswith("error: loss is nan in the log window ending at step 2: training diverged")
    assert f"the last good checkpoint {kept} is kept" in line
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [kept.name]
    assert all(torch.isfinite(t).all() for t in tensors_in(load_checkpoint(kept)["model"]) if t.is_floating_point())


class _Loader:
    def state_dict(self) -> dict:
        return {"pass_index": 0, "batch_in_pass": 3}


def test_weights_that_are_no_longer_finite_are_never_checkpointed(tmp_path):
    """A checkpoint may fall between log steps (or a run may log rarely): the checkpointer checks the weights itself."""
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpointer = Checkpointer(tmp_path, 3, DistInfo(), {"run": {"seed": 1}}, model, optimizer, scaler, _Loader())
    good = checkpointer.save(1, 8)
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteState, match=f"weights are NaN or infinite at step 2: .*{good} is kept"):
        checkpointer.save(2, 16)
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    assert torch.isfinite(load_checkpoint(good)["model"]["weight"]).all()


# ----------------------------------------------------------------------------- checkpoints and disks


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((1000,), float(step))}, "step": step}


def test_a_full_disk_is_a_one_line_error_that_leaves_every_earlier_checkpoint_loadable(tmp_path, monkeypatch):
    for step in (10, 20, 30):
        save_checkpoint(_state(step), tmp_path, step, keep=5)
    real_statvfs = os.statvfs

    class Full:
        def __init__(self, st):
            self.f_frsize, self.f_bavail = st.f_frsize, 1

    monkeypatch.setattr(os, "statvfs", lambda path: Full(real_statvfs(path)))
    with pytest.raises(CheckpointWriteError, match=r"not enough free space .*resumes from step-000000030.pt") as info:
        save_checkpoint(_state(40), tmp_path, 40, keep=2)
    assert "\n" not in str(info.value)
    # Checkpoints beyond keep go first (they would be deleted after the write anyway); the kept ones are untouched.
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000000030.pt", "step-000000020.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000020.pt", "step-000000030.pt"]
    assert load_checkpoint(tmp_path / "step-000000030.pt")["step"] == 30


def test_a_write_that_fails_midway_removes_its_temporary_file(tmp_path, monkeypatch):
    save_checkpoint(_state(10), tmp_path, 10, keep=5)

    def torch_save_on_a_full_disk(obj, fh):  # torch.save writes part of the file, then reports ENOSPC like this
        fh.write(b"PK\x03\x04 partial zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", torch_save_on_a_full_disk)
    with pytest.raises(CheckpointWriteError, match=r"writing checkpoint .*step-000000020.pt failed"):
        save_checkpoint(_state(20), tmp_path, 20, keep=5)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000000010.pt"]
    assert load_checkpoint(tmp_path / "step-000000010.pt")["step"] == 10


def test_temporary_files_of_dead_writers_are_swept_at_start(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        names = [f".step-000000005.pt.tmp-{pid}" for pid in (dead.pid, alive.pid, os.getpid())]
        for name in names:
            (tmp_path / name).write_bytes(b"half a checkpoint")
        save_checkpoint(_state(4), tmp_path, 4, keep=3)
        Checkpointer(tmp_path, 3, DistInfo(), {}, model=None, optimizer=None, scaler=None, loader=None)
        # Another live process may be writing; this process has written nothing yet (a container reuses PIDs).
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[1], "step-000000004.pt"])
    finally:
        alive.kill()
        alive.wait()


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unprivileged user and mount namespaces (unshare -rm)")
def test_a_really_full_filesystem_stops_cleanly_and_a_relaunch_resumes(shard_dir, tmp_path):
    """A tmpfs with room for one checkpoint (about 150 MB for this ResNet-18), in a private mount namespace."""
    mount, out = tmp_path / "small", tmp_path / "out"
    mount.mkdir()
    out.mkdir()
    args = " ".join(train_args(shard_dir, mount / "run", total_steps=3, checkpoint_every_steps=1, keep_checkpoints=3))
    script = f"""
        set -u
        mount -t tmpfs -o size=230m tmpfs {mount}
        {sys.executable} {REPO / 'train.py'} {args} > {out}/1.out 2> {out}/1.err; echo $? > {out}/1.rc
        ls -a {mount}/run/checkpoints > {out}/1.ls
        mount -o remount,size=600m {mount}
        {sys.executable} {REPO / 'train.py'} {args} > {out}/2.out 2> {out}/2.err; echo $? > {out}/2.rc
        ls -a {mount}/run/checkpoints > {out}/2.ls
    """
    subprocess.run(["unshare", "-rm", "bash", "-c", script], env=env(), cwd=REPO, timeout=600, check=True)
    read = {p.name: p.read_text() for p in out.iterdir()}
    assert read["1.rc"].strip() == "1", read["1.err"][-3000:]
    assert "not enough free space" in the_error_line(read["1.err"])
    assert read["1.ls"].split() == [".", "..", "step-000000001.pt"]  # no temporary file, the good one intact
    assert read["2.rc"].strip() == "0", read["2.err"][-3000:]
    assert "resumed from" in read["2.out"] and "at step 1" in read["2.out"]
    assert "step-000000003.pt" in read["2.ls"].split()


# ----------------------------------------------------------------------------- peers and signals


def start_ranks(args: list[str], world: int = 2, **extra_env: str) -> list[subprocess.Popen]:
    """``world`` ranks of train.py launched as torchrun would (RANK, WORLD_SIZE, MASTER_*), without torchrun: a
    dead rank is then not followed by torchrun killing the others, so each survivor's own handling shows."""
    port = str(free_port())
    return [start(args, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra_env) for r in range(world)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dead", "stopped"])
def test_a_dead_or_stopped_peer_is_one_line_on_the_survivor(shard_dir, tmp_path, sig):
    ranks = start_ranks(train_args(shard_dir, tmp_path, total_steps=200, dist_timeout_s=5))
    try:
        wait_for_steps(tmp_path, 2, ranks[0])
        ranks[1].send_signal(sig)
        _, err = ranks[0].communicate(timeout=180)
    finally:
        for proc in ranks:
            proc.kill()
            proc.communicate()
    assert ranks[0].returncode == 1
    line = the_error_line(err)
    assert line.startswith("error: rank 0: a collective failed (") and "another rank died or stopped" in line
    if sig == signal.SIGSTOP:  # a dead peer reads as "Connection reset/closed" or, mid-receive, as a timeout too
        # gloo words a stopped peer as "Timed out waiting ...ms for recv" or, when the timeout closed the pair
        # first, as "Application timeout caused pair closure": both name the timeout
        assert "Timed out" in line or "Application timeout" in line, line


# ----------------------------------------------------------------------------- Slurm


def fake_command(bin_dir: Path, name: str, body: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


@pytest.mark.slow
def test_usr1_to_one_rank_under_slurm_stops_both_and_rank_0_checkpoints_and_requeues(shard_dir, tmp_path):
    """Slurm's time-limit warning reaches rank 1 only: both ranks stop at the same step, rank 0 names the signal it did
    not receive itself, writes the checkpoint and requeues the job (a fake scontrol records its arguments)."""
    calls = tmp_path / "scontrol.calls"
    fake_command(tmp_path / "bin", "scontrol", f'echo "$@" >> {calls}\n')
    run_dir = tmp_path / "run"
    ranks = start_ranks(train_args(shard_dir, run_dir, total_steps=200), SLURM_JOB_ID="4242",
                        PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    try:
        wait_for_steps(run_dir, 2, ranks[0])
        ranks[1].send_signal(signal.SIGUSR1)
        outs = [proc.communicate(timeout=180) for proc in ranks]
    finally:
        for proc in ranks:
            proc.kill()
    assert [proc.returncode for proc in ranks] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    stopped = int(outs[0][0].split("preempted by SIGUSR1: checkpoint at step ")[1].split()[0])
    assert (run_dir / "checkpoints" / f"step-{stopped:09d}.pt").exists()
    assert "requeued Slurm job 4242" in outs[0][0]
    assert calls.read_text().split() == ["requeue", "4242"]  # once, by rank 0


def test_requeue_only_on_the_warning_signal_under_slurm_and_a_refusal_is_a_warning(tmp_path, monkeypatch):
    calls = tmp_path / "scontrol.calls"
    fake_command(tmp_path / "bin", "scontrol",
                 f'echo "$@" >> {calls}\n[ -e {tmp_path}/refuse ] && {{ echo "Job is not requeueable" >&2; exit 1; }}\n'
                 "exit 0\n")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    assert requeue_slurm_job(signal.SIGTERM, {"SLURM_JOB_ID": "7"}) is None  # scancel / preemption: never requeue
    assert requeue_slurm_job(signal.SIGUSR1, {}) is None  # not under Slurm
    assert not calls.exists()
    assert requeue_slurm_job(signal.SIGUSR1, {"SLURM_JOB_ID": "7"}).startswith("requeued Slurm job 7")
    (tmp_path / "refuse").touch()
    line = requeue_slurm_job(signal.SIGUSR1, {"SLURM_JOB_ID": "7"})
    assert line.startswith("warning: scontrol requeue 7 failed (Job is not requeueable)")
    assert calls.read_text().split() == ["requeue", "7", "requeue", "7"]


def test_the_sbatch_script_runs_as_written(tmp_path):
    """``sbatch scripts/train.sbatch`` with srun faked: the --output folder exists, the command line parses."""
    script = REPO / "scripts" / "train.sbatch"
    text = script.read_text()
    output = next(line.split("=", 1)[1].split()[0] for line in text.splitlines() if line.startswith("#SBATCH --output"))
    assert (REPO / output).parent.is_dir(), f"Slurm opens {output} before the script runs: its folder must exist"
    assert "--signal=USR1@" in text and "--requeue" in text
    fake_command(tmp_path / "bin", "srun", 'while [[ "$1" == -* ]]; do shift; done\nexec "$@"\n')
    proc = subprocess.run(
        ["bash", str(script), "--print-config"], cwd=REPO, capture_output=True, text=True, timeout=120,
        env=env(PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO), SLURM_JOB_ID="99",
                SLURM_JOB_NAME="moco-test", SLURM_CPUS_PER_TASK="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run_dir: runs/moco-test" in proc.stdout and "resume: auto" in proc.stdout

