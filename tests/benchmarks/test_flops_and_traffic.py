"""FLOP counting and MFU against a plain per-layer reference; the shuffle-BN bytes table."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import config as config_lib
from benchmarks.flops import forward_flops_per_image, mfu, peak_bf16_flops
from benchmarks.traffic import traffic_bytes
from model.encoder import build_encoder


def reference_flops(model: nn.Module, size: int) -> float:
    """2 x multiply-adds of every Conv2d and Linear, from their output shapes (hooks), for one image."""
    total = 0.0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2 * k * output.numel()
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("arch, head, size", [("resnet18", "mlp", 32), ("resnet18", "linear", 64)])
def test_encoder_flops_match_layer_reference(arch, head, size):
    encoder = build_encoder(arch, head, 128, 2048)
    counted = forward_flops_per_image(encoder, size)
    assert encoder.training  # the count does not leave the encoder in eval mode
    assert counted == pytest.approx(reference_flops(encoder, size), rel=1e-6)


def test_peak_table_and_mfu():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Tesla T4") is None and peak_bf16_flops(None) is None
    # ResNet-50 (8.18 GFLOP fwd) at 5,300 pairs/s on an H100: 4 passes per pair
    assert mfu(5300, 8.18e9, 989e12) == pytest.approx(5300 * 4 * 8.18e9 / 989e12)
    assert mfu(5300, 8.18e9, None) is None


def test_bytes_table_orders_strategies_as_the_formulas_say():
    from benchmarks.model_step import _bytes_table

    cfg = config_lib.replace(config_lib.Config(), data={"crop_size": 224}, model={"arch": "resnet50"})
    table = _bytes_table(cfg, per_rank=32)["mib"]
    for w in (2, 8, 64):
        key = f"W={w}"
        # all_to_all receives 1/W of gather's images; the original gathers the keys twice
        assert table["all_to_all"][key] < table["gather"][key] < table["baseline"][key]
        assert table["none"][key] == table["split"][key] < table["all_to_all"][key]
    image_mib = 3 * 224 * 224 * 2 / 2**20
    keys_mib = 63 * 32 * 128 * 4 / 2**20
    assert table["gather"]["W=64"] == pytest.approx(63 * 32 * image_mib + keys_mib + 64 * 32 * 8 / 2**20)
    assert table["all_to_all"]["W=64"] == pytest.approx(63 / 64 * 32 * image_mib + keys_mib)


def test_traffic_bytes_all_to_all_moves_one_wth_of_gather_images():
    img, key = 3 * 224 * 224 * 2, 128 * 4
    for world in (2, 8, 64):
        gather = traffic_bytes("gather", world, 32, img, key)
        a2a = traffic_bytes("all_to_all", world, 32, img, key)
        assert a2a["images"] * world == pytest.approx(gather["images"])
        assert a2a["keys"] == gather["keys"] == (world - 1) * 32 * key
        assert traffic_bytes("baseline", world, 32, img, key)["keys"] == 2 * gather["keys"]
        assert traffic_bytes("split", world, 32, img, key)["images"] == 0
    assert traffic_bytes("gather", 1, 32, img, key)["images"] == 0
