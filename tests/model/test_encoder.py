"""Encoder builders: the ImageNet and CIFAR ResNet stems, against torchvision's own network."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import cli
import config as config_lib
from model import MoCo
from model.encoder import build_backbone, build_encoder, use_cifar_stem


def spatial_size_at_layer1(net: nn.Module, size: int) -> tuple[int, int]:
    seen = {}

    def record(module, inputs, output):  # returns None: the output passes on unchanged
        seen["hw"] = tuple(output.shape[-2:])

    handle = net.layer1.register_forward_hook(record)
    with torch.no_grad():
        net.eval()(torch.zeros(2, 3, size, size))
    handle.remove()
    return seen["hw"]


@pytest.mark.parametrize("size", [32, 64])
def test_cifar_stem_keeps_full_resolution(size):
    imagenet, _ = build_backbone("resnet18", "imagenet")
    cifar, feat_dim = build_backbone("resnet18", "cifar")
    assert spatial_size_at_layer1(imagenet, size) == (size // 4, size // 4)  # 7x7/2 conv, then 3x3/2 max-pool
    assert spatial_size_at_layer1(cifar, size) == (size, size)
    assert (cifar.conv1.kernel_size, cifar.conv1.stride, cifar.conv1.padding) == ((3, 3), (1, 1), (1, 1))
    assert isinstance(cifar.maxpool, nn.Identity) and feat_dim == 512
    assert cifar(torch.zeros(2, 3, size, size)).shape == (2, 512)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_stems_differ_only_in_conv1(arch):
    """Everything but conv1 has torchvision's names and shapes, so exports and checkpoints keep their layout."""
    tv = torchvision.models.get_model(arch).state_dict()
    for stem, kernel in (("imagenet", 7), ("cifar", 3)):
        state = build_backbone(arch, stem)[0].state_dict()
        assert sorted(state) == sorted(k for k in tv if not k.startswith("fc."))
        assert {k for k in state if state[k].shape != tv[k].shape} == (set() if stem == "imagenet" else {"conv1.weight"})
        assert state["conv1.weight"].shape == (64, 3, kernel, kernel)


def test_cifar_stem_init_matches_torchvision_scale():
    """conv1 is initialised as torchvision initialises its convolutions (Kaiming normal, fan-out, ReLU)."""
    torch.manual_seed(0)
    weight = build_backbone("resnet18", "cifar")[0].conv1.weight
    expected_std = (2.0 / (64 * 3 * 3)) ** 0.5
    assert abs(weight.std().item() / expected_std - 1) < 0.1


def test_bad_stem_and_non_resnet_are_one_line_errors():
    with pytest.raises(ValueError, match="stem must be one of imagenet, cifar"):
        build_backbone("resnet18", "tiny")
    with pytest.raises(ValueError, match="cifar stem needs a ResNet-family network"):
        use_cifar_stem(torchvision.models.shufflenet_v2_x0_5())
    with pytest.raises(config_lib.ConfigError, match="model.stem must be one of imagenet, cifar"):
        cli.parse(config_lib.Config, ["--stem", "tiny"])


def test_moco_builds_both_encoders_with_the_configured_stem():
    cfg = cli.parse(config_lib.Config, ["--arch", "resnet18", "--stem", "cifar", "--queue-size", "32", "--dim", "16",
                                        "--mlp-hidden-dim", "32", "--split-bn-groups", "2"])
    torch.manual_seed(0)
    model = MoCo(cfg.model)
    for encoder in (model.encoder_q, model.encoder_k):
        assert encoder.backbone.conv1.kernel_size == (3, 3) and isinstance(encoder.backbone.maxpool, nn.Identity)
    views = torch.randn(2, 4, 3, 16, 16)
    out = model(views[0], views[1])
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.encoder_q.backbone.conv1.weight.grad is not None
    # The encoder builder itself takes the same stem argument.
    assert build_encoder("resnet18", "linear", 8, stem="cifar").backbone.conv1.kernel_size == (3, 3)
