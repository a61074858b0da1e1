"""Export round trip: a MoCo checkpoint's query backbone as torchvision / detectron2 weights, and bad checkpoints."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
import torchvision

from eval.export import (
    CheckpointError,
    backbone_state_dict,
    detectron2_resnet_settings,
    export,
    load_backbone,
    load_checkpoint,
    to_detectron2,
)
from eval.export import main as export_main
from eval.labelled_data import LabelledImages, eval_transform
from model.encoder import use_cifar_stem
from tests.conftest import REPO
from tests.eval.conftest import moco_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    return path, moco_checkpoint(path, train_steps=2)


def digit_batch(digits_folders) -> torch.Tensor:
    data = LabelledImages(digits_folders["val"], eval_transform(32))
    return torch.stack([data[i][0] for i in range(0, len(data), 5)])  # 20 x 3 x 32 x 32 real digits


def test_torchvision_round_trip_gives_the_query_encoder_features(checkpoint, tmp_path, digits_folders):
    path, model = checkpoint
    out = export(path, "torchvision", tmp_path / "r18.pth")
    weights = torch.load(out, weights_only=True)
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = torch.nn.Identity()
    images = digit_batch(digits_folders)
    with torch.no_grad():
        expected = model.encoder_q.backbone.eval()(images)
        key_feats = model.encoder_k.backbone.eval()(images)
        assert torch.equal(net.eval()(images), expected)
    assert not torch.equal(expected, key_feats)  # it is the query encoder, not the momentum (key) encoder
    # The same weights straight from the checkpoint dict, without a file.
    assert all(torch.equal(a, b) for a, b in zip(load_backbone(torch.load(path, weights_only=True)).state_dict().values(),
                                                 net.state_dict().values()))


@pytest.fixture(scope="module")
def cifar_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt_cifar") / "ckpt.pt"
    return path, moco_checkpoint(path, train_steps=2, stem="cifar")


def test_cifar_stem_round_trip(cifar_checkpoint, tmp_path, digits_folders, capsys):
    """A --stem cifar backbone loads (kNN, linear eval), exports with a note, and refuses detectron2 in one line."""
    path, model = cifar_checkpoint
    images = digit_batch(digits_folders)
    with torch.no_grad():
        expected = model.encoder_q.backbone.eval()(images)
        assert torch.equal(load_backbone(path).eval()(images), expected)  # what eval.linear loads
    out = tmp_path / "r18_cifar.pth"
    assert export_main([str(path), "--format", "torchvision", "--out", str(out)]) == 0
    assert "use_cifar_stem" in capsys.readouterr().out
    weights = torch.load(out, weights_only=True)
    net = torchvision.models.resnet18()
    with pytest.raises(RuntimeError, match="conv1.weight"):  # torchvision's own 7x7 stem cannot take it
        net.load_state_dict(weights, strict=False)
    use_cifar_stem(net)
    missing, unexpected = net.load_state_dict(weights, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    net.fc = torch.nn.Identity()
    with torch.no_grad():
        assert torch.equal(net.eval()(images), expected)
        assert torch.equal(load_backbone(out, "resnet18").eval()(images), expected)  # stem read off conv1's shape
    with pytest.raises(CheckpointError, match="cifar stem"):
        export(path, "detectron2", tmp_path / "r18_cifar.pkl")
    assert export_main([str(path), "--format", "detectron2", "--out", str(tmp_path / "r18_cifar.pkl")]) == 2
    assert "cifar stem" in capsys.readouterr().err


def test_detectron2_names_and_values(checkpoint, tmp_path):
    path, model = checkpoint
    out = export(path, "detectron2", tmp_path / "r18.pkl")
    with open(out, "rb") as fh:
        obj = pickle.load(fh)
    assert obj["matching_heuristics"] is True and obj["__author__"]
    names = obj["model"]
    tv = backbone_state_dict(load_checkpoint(path)[0], "resnet18")
    renames = {
        "conv1.weight": "stem.conv1.weight", "bn1.running_var": "stem.conv1.norm.running_var",
        "layer1.0.conv2.weight": "res2.0.conv2.weight", "layer1.1.bn2.bias": "res2.1.conv2.norm.bias",
        "layer2.0.downsample.0.weight": "res3.0.shortcut.weight",
        "layer4.0.downsample.1.running_mean": "res5.0.shortcut.norm.running_mean",
        "layer4.1.bn1.weight": "res5.1.conv1.norm.weight",
    }
    for old, new in renames.items():
        assert (names[new] == tv[old].numpy()).all()
    assert len(names) == sum(not k.endswith("num_batches_tracked") for k in tv)
    assert all(k.split(".")[0] in ("stem", "res2", "res3", "res4", "res5") for k in names)
    assert not any(".bn" in k or "layer" in k or "downsample" in k for k in names)


@pytest.mark.parametrize("arch, settings", [
    ("resnet18", {"DEPTH": 18, "RES2_OUT_CHANNELS": 64}),
    ("resnet34", {"DEPTH": 34, "RES2_OUT_CHANNELS": 64}),
    ("resnet50", {"DEPTH": 50, "RES2_OUT_CHANNELS": 256, "STRIDE_IN_1X1": False}),
    ("resnet152", {"DEPTH": 152, "RES2_OUT_CHANNELS": 256, "STRIDE_IN_1X1": False}),
    ("resnext50_32x4d", {"DEPTH": 50, "RES2_OUT_CHANNELS": 256, "STRIDE_IN_1X1": False, "NUM_GROUPS": 32,
                         "WIDTH_PER_GROUP": 4}),
])
def test_detectron2_config_settings_per_depth(arch, settings):
    """detectron2 defaults to R50 (RES2_OUT_CHANNELS 256) and asserts 64 for R18/R34: the export names what to set."""
    with torch.device("meta"):
        net = torchvision.models.get_model(arch)
    weights = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    assert detectron2_resnet_settings(to_detectron2_names(weights)) == settings


def to_detectron2_names(weights):
    """to_detectron2's renaming on meta tensors (its numpy conversion needs real data)."""
    real = {k: torch.empty(v.shape) for k, v in weights.items()}
    return to_detectron2(real)["model"]


def test_detectron2_resnet50_bottleneck_names():
    """ResNet-50's bottleneck third conv and norm follow the same rule (res2.0.conv3.norm.*)."""
    with torch.device("meta"):
        tv = torchvision.models.resnet50().state_dict()
    names = to_detectron2({k: torch.zeros(1) for k in tv})["model"]
    assert "res2.0.conv3.norm.weight" in names and "res5.2.conv3.weight" in names and "res4.5.conv1.weight" in names
    assert len(names) == sum(not (k.endswith("num_batches_tracked") or k.startswith("fc.")) for k in tv)


def test_original_moco_checkpoint_layout(tmp_path):
    """The original release stores {'state_dict': {'module.encoder_q.*'}, 'arch'} with the MLP head under fc.0/fc.2."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    state = {f"module.encoder_q.{k}": v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    state.update({"module.encoder_q.fc.0.weight": torch.zeros(512, 512), "module.encoder_q.fc.2.weight": torch.zeros(4, 512),
                  "module.queue": torch.zeros(4, 16)})
    torch.save({"state_dict": state, "arch": "resnet18", "epoch": 200}, tmp_path / "moco_v2_200ep.pth.tar")
    weights = torch.load(export(tmp_path / "moco_v2_200ep.pth.tar", "torchvision", tmp_path / "tv.pth"), weights_only=True)
    assert all(torch.equal(weights[k], v) for k, v in net.state_dict().items() if not k.startswith("fc."))


def test_wrong_architecture_is_a_one_line_error(checkpoint, tmp_path):
    path, _ = checkpoint
    for arch, message in (("resnet50", "198 backbone tensors missing"), ("resnet34", "missing .*layer1.2"),
                          ("resnet_nope", "unknown torchvision architecture")):
        with pytest.raises(CheckpointError, match=message) as info:
            export(path, "torchvision", tmp_path / "x.pth", arch=arch)
        assert "\n" not in str(info.value)
    state = dict(load_checkpoint(path)[0])
    state["encoder_q.backbone.layer2.0.conv1.weight"] = torch.zeros(128, 64, 1, 1)  # same names, another layer shape
    with pytest.raises(CheckpointError, match=r"layer2.0.conv1.weight has shape \(128, 64, 1, 1\)"):
        backbone_state_dict(state, "resnet18")
    deeper = moco_checkpoint(tmp_path / "r34.pt", arch="resnet34", train_steps=0)
    assert deeper is not None
    with pytest.raises(CheckpointError, match="unexpected tensor .*layer1.2"):  # resnet34 holds every resnet18 name
        export(tmp_path / "r34.pt", "torchvision", tmp_path / "x.pth", arch="resnet18")


def test_cli_and_corrupt_files(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    proc = subprocess.run([sys.executable, "-m", "eval.export", str(path), "--format", "detectron2", "--out",
                           str(tmp_path / "ok.pkl")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and (tmp_path / "ok.pkl").is_file(), proc.stderr
    assert "MODEL.RESNETS.DEPTH 18, MODEL.RESNETS.RES2_OUT_CHANNELS 64" in proc.stdout

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"step": 3}, tmp_path / "nomodel.pt")
    import argparse

    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pt")
    for bad, message in ((truncated, "not a readable PyTorch checkpoint (the file is truncated or not a torch.save "
                                     "archive)"), (tmp_path / "text.pt", "not a readable"),
                         (tmp_path / "pickled.pt", "it pickles argparse.Namespace, which torch.load(weights_only=True) "
                                                   "refuses to run; only tensors and plain containers are accepted)"),
                         (tmp_path / "nomodel.pt", "no model state"), (tmp_path / "absent.pt", "not found")):
        assert export_main([str(bad), "--out", str(tmp_path / "bad.pth")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "bad.pth").exists()
