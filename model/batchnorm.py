"""Batch-norm variants for shuffle-BN: per-group statistics on one device (SplitBatchNorm) and SyncBatchNorm."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from ``groups`` contiguous chunks of the batch.

    On one device this emulates ``groups`` GPUs, each normalising its own share of the batch, which is what
    shuffle-BN needs to stop the model from "cheating" through batch statistics (MoCo sec. 3.3; the paper's
    CIFAR demo does the same with its SplitBatchNorm). Chunk ``g`` is rows ``[g*N/G, (g+1)*N/G)``, exactly the
    rows rank ``g`` would hold in a ``G``-rank run, so split on one device reproduces a multi-rank run.

    Parameters and buffers are those of ``nn.BatchNorm2d`` (same state_dict keys). Running statistics are
    updated with the mean over groups of the per-group updates; evaluation uses them like plain BN.
    Each chunk goes through the native batch-norm kernel (any dtype, channels_last), so the cost is G small
    kernels per layer instead of one, plus one copy forward (cat) and one backward; ``torch.compile`` fuses them.
    """

    def __init__(self, num_features: int, groups: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if groups < 1:
            raise ValueError(f"SplitBatchNorm2d: groups must be >= 1; got {groups}")
        if self.momentum is None:
            raise ValueError("SplitBatchNorm2d needs an exponential momentum (cumulative averaging would need a host sync)")
        self.groups = groups

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Args: x: N x C x H x W with N divisible by groups. Returns: N x C x H x W."""
        if not self.training or self.groups == 1:
            return super().forward(x)
        n = x.shape[0]
        if n % self.groups != 0:
            raise ValueError(f"split shuffle-BN: batch of {n} is not divisible by split_bn_groups={self.groups}")
        chunk = n // self.groups
        track = self.track_running_stats and self.running_mean is not None
        if track:
            self.num_batches_tracked.add_(1)
            # One copy of the running stats per group so every group gets the ordinary BN update; the mean
            # over groups is then the new running estimate (as the paper's SplitBatchNorm does).
            means = self.running_mean.repeat(self.groups).view(self.groups, -1)
            vars_ = self.running_var.repeat(self.groups).view(self.groups, -1)
        # x.split, not x[g*chunk:(g+1)*chunk]: the backward of a slice writes a full-size zero tensor per group
        # (G x the layer's activations per BN layer, 2.5x the whole step on an H200); split's backward is one cat.
        outs = [
            F.batch_norm(part, means[g] if track else None, vars_[g] if track else None,
                         self.weight, self.bias, True, self.momentum, self.eps)
            for g, part in enumerate(x.split(chunk, 0))
        ]
        if track:
            self.running_mean.copy_(means.mean(0))
            self.running_var.copy_(vars_.mean(0))
        return torch.cat(outs, 0)


def convert_split_bn(module: nn.Module, groups: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm2d` with the same state.

    Returns:
        The converted module (the input itself when it is not a BatchNorm2d; children are replaced in place).
    """
    if type(module) is nn.BatchNorm2d:
        split = SplitBatchNorm2d(module.num_features, groups, eps=module.eps, momentum=module.momentum,
                                 affine=module.affine, track_running_stats=module.track_running_stats)
        like = next(iter(module.state_dict().values()), None)
        if like is not None:
            split.to(device=like.device, dtype=like.dtype)
        split.load_state_dict(module.state_dict())
        split.train(module.training)
        return split
    for name, child in module.named_children():
        setattr(module, name, convert_split_bn(child, groups))
    return module


def convert_sync_bn(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm by ``nn.SyncBatchNorm`` (key encoder of the ``sync`` strategy)."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
