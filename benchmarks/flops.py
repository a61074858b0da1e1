"""Model FLOPs and the hardware limit: FLOPs per image of an encoder, peak bf16 rates, model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak dense bf16 FLOP/s of the GPU. One MoCo pair costs the query encoder's forward
and backward (backward ~ 2x forward, so 3F) plus the key encoder's forward (F): 4F per pair, where F is the
encoder's forward FLOPs for one image counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and
matmuls, multiply-add = 2 FLOPs). The InfoNCE GEMM against the queue (2·K·dim per pair, 17 MFLOP for K=65536)
is < 0.5% of ResNet-50's ~8 GFLOP and is left out.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in FLOP/s. First match wins,
# so the more specific names come first.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H200", 989e12),
    ("H100", 989e12),  # SXM / HBM3
    ("A100", 312e12),
)

PASSES_PER_PAIR = 4  # query fwd (1) + query bwd (2) + key fwd (1), in units of one encoder forward


def peak_bf16_flops(gpu_name: str | None) -> float | None:
    """The GPU's peak dense bf16 rate, or None for a CPU or a GPU not in the table."""
    if not gpu_name:
        return None
    for key, peak in PEAK_BF16_FLOPS:
        if key.lower() in gpu_name.lower():
            return peak
    return None


def forward_flops_per_image(encoder: nn.Module, crop_size: int, batch: int = 2) -> float:
    """Forward FLOPs of ``encoder`` for one 3 x crop_size x crop_size image.

    Counted on a batch of ``batch`` zeros (BatchNorm in train mode needs more than one sample per channel)
    in eval mode under ``no_grad``, so running statistics are left untouched.

    Args:
        encoder: the real encoder (backbone + projection head), on any device.
        crop_size: input side in pixels.
        batch: images in the counted batch; the total is divided by it.
    """
    from torch.utils.flop_counter import FlopCounterMode

    param = next(encoder.parameters())
    x = torch.zeros(batch, 3, crop_size, crop_size, device=param.device, dtype=param.dtype)
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            encoder(x)
    finally:
        encoder.train(was_training)
    return counter.get_total_flops() / batch


def mfu(pairs_per_s: float, flops_per_image: float, peak_flops: float | None) -> float | None:
    """Share (0-1) of the peak rate that ``pairs_per_s`` uses; None when the peak is unknown (CPU)."""
    if not peak_flops:
        return None
    return pairs_per_s * PASSES_PER_PAIR * flops_per_image / peak_flops
