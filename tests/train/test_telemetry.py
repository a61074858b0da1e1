"""RunLogger: metrics.jsonl, the live progress bar on a terminal, W&B names and prefixes, summary and loss curve, the
view-pair grid, and resuming from a checkpoint logged as a W&B artifact (offline: no account, no network)."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from tests.train.test_train_loop import env as train_env
from tests.train.wandb_offline import read_offline_run_with_summary
from training.telemetry import ArtifactError, RunLogger, checkpoint_from_artifact, infonce_chance_loss, view_pair_grid

TIMESTAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def _flush_wandb():
    """wandb's service process writes the offline run file completely only when it shuts down."""
    import wandb

    wandb.teardown()


def _log_run(run_dir, capsys, **kwargs):
    logger = RunLogger(run_dir, {"run": {}, "model": {"queue_size": 64}}, total_steps=6, enabled=True,
                       wandb_mode=kwargs.pop("wandb_mode", "disabled"), **kwargs)
    logger.log_eval(0, {"knn_top1": 20.0}, chance=10.0)
    for step in range(1, 7):
        logger.advance(step)
        if step % 2 == 0:
            logger.log(step, {"loss": 5.0 - 0.1 * step, "acc1": 10.0, "lr": 0.01, "pairs_per_s": 50.0,
                              "step_time_s": 0.01 * step, "data_wait_share": 0.1})
            logger.record_step_time(0.01 * step)
    logger.log_eval(6, {"knn_top1": 30.0}, chance=10.0)
    summary = logger.finish({"steps": 6})
    _flush_wandb()
    return logger, summary, capsys.readouterr().out


def test_plain_lines_in_a_log_file_are_timestamped(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "dumb")
    logger, summary, out = _log_run(tmp_path, capsys)
    assert logger._progress is None
    lines = out.splitlines()
    assert len(lines) == 5 and all(re.match(TIMESTAMP + " step ", line) for line in lines), out
    assert "loss 4.4000" in out and out.count("ETA") == 3  # one ETA per training line
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 2, 4, 6, 6] and all(re.fullmatch(TIMESTAMP, r["time"]) for r in records)
    assert records[0] == {"step": 0, "time": records[0]["time"], "knn_top1": 20.0, "chance_top1": 10.0}
    assert summary["step_time_s"]["p50"] == 0.04 and summary["step_time_s"]["p99"] == 0.06
    assert summary["eval"] == {"knn_top1": {"first_step": 0, "first": 20.0, "last_step": 6, "last": 30.0, "gain": 10.0,
                                            "chance": 10.0}}
    assert (tmp_path / "loss_curve.png").stat().st_size > 0


def test_live_bar_moves_every_step_with_one_eta(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the output as a terminal
    monkeypatch.setenv("COLUMNS", "250")
    logger = RunLogger(tmp_path, {"run": {}}, total_steps=6, enabled=True, wandb_mode="disabled")
    assert logger._progress is not None
    progress, task = logger._progress
    logger.advance(3)  # no metrics logged yet: the bar still moves
    assert progress.tasks[task].completed == 3
    logger.log(4, {"loss": 4.4, "acc1": 10.0, "lr": 0.01, "pairs_per_s": 50.0, "step_time_s": 0.02,
                   "data_wait_share": 0.1})
    logger.advance(5)
    assert progress.tasks[task].completed == 5 and "loss 4.4000" in progress.tasks[task].fields["metrics"]
    logger.finish({"steps": 5})
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().out)
    assert "5/6" in plain and "loss 4.4000" in plain and "pairs/s" in plain
    assert max(line.count("ETA") for line in plain.splitlines()) == 1


def test_loss_plot_has_chance_line_and_eval_panel(tmp_path, capsys, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {}
    savefig = matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        drawn["axes"] = fig.axes
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    _log_run(tmp_path, capsys)
    loss_ax, eval_ax = drawn["axes"]
    assert [line.get_ydata()[0] for line in loss_ax.lines[1:]] == [pytest.approx(infonce_chance_loss(64))]
    assert list(eval_ax.lines[0].get_ydata()) == [20.0, 30.0] and eval_ax.lines[1].get_ydata()[0] == 10.0
    plt.close("all")


def test_wandb_offline_name_tags_prefixes_and_summary_percentiles(tmp_path, capsys):
    _, summary, _ = _log_run(tmp_path, capsys, wandb_mode="offline", name="r18-demo", tags=["demo", "cpu"],
                             group="sweep-1", notes="a note")
    (offline,) = list((tmp_path / "wandb").glob("offline-run-*"))
    _, history, wb_summary = read_offline_run_with_summary(offline)
    keys = {k for row in history for k in row if not k.startswith("_")}
    assert {"train/loss", "train/step_time_s", "eval/knn_top1"} <= keys and "loss" not in keys
    # summary.json's percentiles, not the last window's step time (0.06), are in the W&B summary.
    assert wb_summary["step_time_s"] == summary["step_time_s"] and wb_summary["train/step_time_s"] == 0.06
    from training.wandb_offline import read_records

    (run,) = [r.run for r in read_records(next(offline.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, list(run.tags), run.run_group, run.notes) == ("r18-demo", ["demo", "cpu"], "sweep-1", "a note")


def test_name_tags_group_notes_default_to_the_run_config(tmp_path):
    logger = RunLogger(tmp_path, {"run": {"wandb_name": "from-config", "wandb_tags": ["t"], "wandb_group": "g",
                                          "wandb_notes": ""}}, total_steps=1, enabled=True, wandb_mode="offline")
    logger.finish({})
    _flush_wandb()
    from training.wandb_offline import read_records

    (offline,) = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    (run,) = [r.run for r in read_records(offline) if r.WhichOneof("record_type") == "run"]
    assert (run.display_name, list(run.tags), run.run_group, run.notes) == ("from-config", ["t"], "g", "")


def test_resume_source_from_an_offline_checkpoint_artifact(tmp_path):
    logger = RunLogger(tmp_path, {"run": {}}, total_steps=2, enabled=True, wandb_mode="offline", run_id="abcd1234")
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    for step in (1, 2):
        torch.save({"step": step, "model": {"w": torch.full((3,), float(step))}}, ckpt / f"step-{step:09d}.pt")
        logger.log_checkpoint_artifact(ckpt / f"step-{step:09d}.pt", step)
    logger.finish({})
    _flush_wandb()
    for spec, step in (("wandb:checkpoint-abcd1234", 2), ("wandb:checkpoint-abcd1234:latest", 2),
                       ("wandb:checkpoint-abcd1234:step-1", 1), ("wandb:me/moco/checkpoint-abcd1234:v0", 1),
                       ("wandb:checkpoint-abcd1234:v1", 2)):
        path = checkpoint_from_artifact(spec, tmp_path, "offline")
        assert torch.load(path, weights_only=True)["step"] == step, spec
    for spec, message in (("wandb:checkpoint-other", "no artifact 'checkpoint-other'"),
                          ("wandb:checkpoint-abcd1234:step-9", "no version 'step-9' .*aliases: latest, step-1, step-2")):
        with pytest.raises(ArtifactError, match=message):
            checkpoint_from_artifact(spec, tmp_path, "disabled")
    staged = checkpoint_from_artifact("wandb:checkpoint-abcd1234:latest", tmp_path)
    staged.chmod(0o600)
    staged.write_bytes(staged.read_bytes()[:-1] + b"x")
    with pytest.raises(ArtifactError, match="does not match the artifact's MD5"):
        checkpoint_from_artifact("wandb:checkpoint-abcd1234:latest", tmp_path)


def test_view_pair_grid_denormalises_side_by_side():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    white, black = (torch.ones(3, 3, 4, 5) - mean) / std, (torch.zeros(3, 3, 4, 5) - mean) / std
    grid = view_pair_grid(white.to(torch.bfloat16), black, max_pairs=2)
    assert grid.shape == (8, 10, 3) and grid.dtype == torch.uint8
    assert grid[:, :5].min() >= 254 and grid[:, 5:].max() <= 1


@pytest.mark.slow
def test_train_resumes_from_a_checkpoint_artifact_of_an_offline_run(shard_dir, tmp_path):
    """train.py logs checkpoints as artifacts offline; with the local checkpoints gone, --resume wandb:... continues."""
    from tests.train.test_train_loop import base_args, losses, run_train

    run_train([*base_args(shard_dir, tmp_path, steps=4, batch=8, crop_size=32, wandb_mode="offline",
                          checkpoint_every_steps=2), "--wandb-log-checkpoints"])
    run_id = json.loads((tmp_path / "summary.json").read_text())["wandb_run_id"]
    first = losses(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")  # only W&B's copies remain
    resumed = run_train(base_args(shard_dir, tmp_path, steps=4, batch=8, crop_size=32, wandb_mode="offline",
                                  resume=f"wandb:checkpoint-{run_id}:step-2"))
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout, resumed.stdout[-2000:]
    assert losses(tmp_path) == first  # steps 3-4 again, from the artifact's exact state: the same losses
    missing = subprocess.run([sys.executable, str(REPO / "train.py"), *base_args(
        shard_dir, tmp_path, steps=4, batch=8, crop_size=32, resume="wandb:checkpoint-nope")],
        env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=240)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --resume wandb:checkpoint-nope: no artifact")
