"""Linear probe: learns on real digits, never touches the backbone (and would notice if it did), CLI and torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision

import eval.linear as linear_eval_lib
from cli import ConfigError
from distributed import DistInfo
from eval.labelled_data import LabelledImages, eval_transform
from eval.linear import (
    LinearEvalConfig,
    LinearEvalDiverged,
    build_linear_classifier,
    resolve_protocol,
    run_linear_eval,
    stable_lr_limit,
    state_hash,
    step_lr,
    topk_correct,
)
from tests.conftest import run_torchrun
from tests.eval.conftest import moco_checkpoint


def calibrated_backbone(train_dir: Path, seed: int) -> torch.nn.Module:
    """A random ResNet-18 whose BN running statistics were measured on the digits, as pre-training leaves them.

    At initialisation the running statistics are (0, 1), which leaves eval-mode activations unnormalised and huge.
    """
    torch.manual_seed(seed)
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
            m.reset_running_stats()
    data = LabelledImages(train_dir, eval_transform(32, 32))
    with torch.no_grad():
        net.train()(torch.stack([data[i][0] for i in range(len(data))]))
    return net.eval()


def small_cfg(folders, **kw) -> LinearEvalConfig:
    values = dict(train=str(folders["train"]), val=str(folders["val"]), batch_size=32, train_crop=32, val_resize=32,
                  val_crop=32, workers=0, device="cpu", print_every=1000)
    return LinearEvalConfig(**{**values, **kw})


def test_probe_learns_and_backbone_is_bit_identical(digits_folders):
    """40 steps (4 epochs of 300 digits) at a learning rate suited to unnormalised random features.

    Measured while developing (seeds 0-2, 100 val digits): top-1 30, 30, 40 % against 10 % chance; the 20 %
    threshold is > 3 binomial standard deviations (3 %) above chance and well below every run.
    """
    backbone = calibrated_backbone(digits_folders["train"], seed=0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg = small_cfg(digits_folders, lr=0.003, max_steps=40, seed=0)
    result, classifier = run_linear_eval(cfg, DistInfo(), backbone=backbone)
    assert result["top1"] > 20.0 and result["top5"] >= result["top1"]
    assert (result["steps"], result["val_samples"], result["train_samples"]) == (40, 100, 300)
    after = backbone.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert result["backbone_sha256"] == state_hash(backbone)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert classifier.weight.shape == (10, 512)


def test_imagenet_lr_diverges_with_a_hint_and_small_protocol_learns(digits_folders):
    """lr 30 (MoCo's, for its small-scaled ImageNet features) on a random ResNet-18's features blows up (the issue saw
    loss 62695 without a word); the divergence check stops it, and --protocol small's lr learns on the same features."""
    backbone = calibrated_backbone(digits_folders["train"], seed=0)
    with pytest.raises(LinearEvalDiverged, match=r"diverged: loss .* lr 30 is too large .* pass --protocol small"):
        run_linear_eval(small_cfg(digits_folders, lr=30.0, max_steps=20), DistInfo(), backbone=backbone)
    result, _ = run_linear_eval(small_cfg(digits_folders, protocol="small", max_steps=40), DistInfo(), backbone=backbone)
    assert result["top1"] > 20.0 and result["lr"] == pytest.approx(1 / result["feature_top_eigenvalue"])


def test_changed_backbone_is_detected(digits_folders, monkeypatch):
    """Without eval mode, BN running statistics drift with every batch: the final hash check must refuse the result."""
    monkeypatch.setattr(linear_eval_lib, "freeze", lambda b: b.requires_grad_(False))  # forgets .eval()
    backbone = calibrated_backbone(digits_folders["train"], seed=0).train()
    with pytest.raises(RuntimeError, match="backbone changed"):
        run_linear_eval(small_cfg(digits_folders, max_steps=2, lr=0.003), DistInfo(), backbone=backbone)


def test_protocol_pieces():
    torch.manual_seed(0)
    fc = build_linear_classifier(2048, 1000)
    assert fc.bias.abs().max() == 0 and abs(fc.weight.std().item() - 0.01) < 2e-4 and abs(fc.weight.mean()) < 1e-4
    cfg = resolve_protocol(LinearEvalConfig())  # the default is MoCo's ImageNet protocol
    assert (cfg.lr, cfg.momentum, cfg.weight_decay, cfg.epochs, cfg.milestones) == (30.0, 0.9, 0.0, 100, [60, 80])
    assert (cfg.batch_size, cfg.train_crop, cfg.val_resize, cfg.val_crop) == (256, 224, 256, 224)
    assert [step_lr(e, cfg) for e in (0, 59, 60, 79, 80, 99)] == pytest.approx([30, 30, 3, 3, 0.3, 0.3])
    small = resolve_protocol(LinearEvalConfig(protocol="small"), checkpoint_crop=48)
    assert (small.lr, small.epochs, small.milestones, small.train_crop, small.val_resize, small.val_crop) == (
        0.0, 30, [18, 24], 48, 55, 48)  # lr 0: 1 / mean squared feature norm, measured on the first batch
    explicit = resolve_protocol(LinearEvalConfig(protocol="small", lr=0.5, epochs=10, val_crop=32), checkpoint_crop=48)
    assert (explicit.lr, explicit.milestones, explicit.train_crop, explicit.val_crop) == (0.5, [6, 8], 32, 32)
    with pytest.raises(ConfigError, match="records none"):
        resolve_protocol(LinearEvalConfig(protocol="small"))
    # Heavy-ball SGD on a quadratic with curvature E|x|^2 / 2 is stable below 2 (1 + mu) / (E|x|^2 / 2).
    assert stable_lr_limit(4.0, 0.9) == pytest.approx(1.9)
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3, 0.2, 0.5, 0.4], [0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.0]])
    # row 0: label 1 is top-1; row 1: label 5 is 5th (in top-5, not top-1); plain reference by sorting.
    assert topk_correct(logits, torch.tensor([1, 5])).tolist() == [1.0, 2.0]
    assert topk_correct(logits, torch.tensor([6, 6])).tolist() == [0.0, 1.0]  # row 0: 0.4 is 3rd; row 1: last


def test_script_with_checkpoint_and_bad_input(digits_folders, tmp_path, capsys):
    moco_checkpoint(tmp_path / "ckpt.pt", train_steps=1)
    args = ["--train", str(digits_folders["train"]), "--val", str(digits_folders["val"]), "--batch-size", "32",
            "--train-crop", "32", "--val-resize", "32", "--val-crop", "32", "--workers", "0", "--device", "cpu",
            "--max-steps", "2", "--protocol", "small", "--wandb-mode", "disabled"]
    linear_eval_lib.main(["--checkpoint", str(tmp_path / "ckpt.pt"), *args, "--out", str(tmp_path / "out"),
                          "--wandb-mode", "offline", "--wandb-name", "probe", "--wandb-tags", "demo"])
    saved = json.loads((tmp_path / "out" / "linear_eval.json").read_text())
    assert saved["steps"] == 2 and saved["config"]["max_steps"] == 2 and "top-1" in capsys.readouterr().out
    import wandb

    from tests.train.wandb_offline import read_offline_run_with_summary

    wandb.teardown()  # the service writes the offline run file completely when it stops
    (offline,) = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    _, history, summary = read_offline_run_with_summary(offline)
    assert [row["_step"] for row in history if "train/loss" in row] == [1, 2]
    assert summary["eval/top1"] == saved["top1"] and summary["protocol"] == "small"
    assert torch.load(tmp_path / "out" / "classifier.pt", weights_only=True)["weight"].shape == (10, 512)
    (tmp_path / "corrupt.pt").write_bytes(b"PK\x03\x04 truncated")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    bad = {
        ("--checkpoint", str(tmp_path / "corrupt.pt"), *args): "not a readable PyTorch checkpoint",
        ("--checkpoint", str(tmp_path / "ckpt.pt"), *args, "--arch", "resnet50"): "does not match resnet50",
        ("--checkpoint", str(tmp_path / "ckpt.pt"), *args[:2], "--val", str(tmp_path / "empty")): "empty",
        ("--checkpoint", str(tmp_path / "ckpt.pt"), *args, "--lr", "-1"): "lr must be > 0",
        tuple(args): "--checkpoint is required",
    }
    for argv, message in bad.items():
        code = linear_eval_lib.main(list(argv))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_linear_eval_under_torchrun(digits_folders, tmp_path):
    """Two gloo ranks with DDP on the classifier: same metrics on both ranks, backbone unchanged (hash checked)."""
    moco_checkpoint(tmp_path / "ckpt.pt", train_steps=0)
    run_torchrun("eval.linear", 2, torchrun_args=["--module"], args=[
        "--checkpoint", str(tmp_path / "ckpt.pt"), "--train", str(digits_folders["train"]), "--val",
        str(digits_folders["val"]), "--batch-size", "32", "--train-crop", "32", "--val-resize", "32", "--val-crop", "32",
        "--workers", "0", "--device", "cpu", "--max-steps", "3", "--protocol", "small", "--out", str(tmp_path / "out"),
        "--wandb-mode", "disabled"])
    result = json.loads((tmp_path / "out" / "linear_eval.json").read_text())
    assert result["steps"] == 3 and result["val_samples"] == 100  # each rank half of the val set, summed exactly
    single, _ = run_linear_eval(small_cfg(digits_folders, checkpoint=str(tmp_path / "ckpt.pt"), max_steps=1,
                                          protocol="small"),
                                DistInfo())
    assert single["backbone_sha256"] == result["backbone_sha256"]
