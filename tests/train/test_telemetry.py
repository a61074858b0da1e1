"""RunLogger: metrics.jsonl, the live progress bar on a terminal, summary and loss curve; the view-pair grid."""

import json
import re

import torch

from training.telemetry import RunLogger, view_pair_grid


def _log_run(run_dir, capsys):
    logger = RunLogger(run_dir, {"run": {}}, total_steps=6, enabled=True, wandb_mode="disabled")
    for step in range(1, 7):
        logger.log(step, {"loss": 5.0 - 0.1 * step, "acc1": 10.0, "lr": 0.01, "pairs_per_s": 50.0,
                          "step_time_s": 0.02, "data_wait_share": 0.1})
        logger.record_step_time(0.02)
    summary = logger.finish({"steps": 6})
    return logger, summary, capsys.readouterr().out


def test_plain_lines_in_a_log_file(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "dumb")
    logger, summary, out = _log_run(tmp_path, capsys)
    assert logger._progress is None
    assert out.count("step ") == 6 and "loss 4.4000" in out
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert summary["step_time_s"]["p50"] == 0.02 and (tmp_path / "loss_curve.png").stat().st_size > 0


def test_live_progress_bar_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats the output as a terminal
    monkeypatch.setenv("COLUMNS", "250")
    logger, _, out = _log_run(tmp_path, capsys)
    assert logger._progress is not None
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out)
    assert "6/6" in plain and "loss 4.4000" in plain and "pairs/s" in plain
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 6


def test_view_pair_grid_denormalises_side_by_side():
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    white, black = (torch.ones(3, 3, 4, 5) - mean) / std, (torch.zeros(3, 3, 4, 5) - mean) / std
    grid = view_pair_grid(white.to(torch.bfloat16), black, max_pairs=2)
    assert grid.shape == (8, 10, 3) and grid.dtype == torch.uint8
    assert grid[:, :5].min() >= 254 and grid[:, 5:].max() <= 1
