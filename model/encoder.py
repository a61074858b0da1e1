"""Encoders: a torchvision backbone by name plus the MoCo projection head (v1 linear, v2 MLP)."""

from __future__ import annotations

import torch
import torch.nn as nn


class MoCoProjectionHead(nn.Module):
    """The projection from backbone features to the contrastive embedding.

    v1 (``linear``): feat -> dim, the backbone's own fc replaced (MoCo sec. 3.3).
    v2 (``mlp``): feat -> hidden -> ReLU -> dim (MoCo v2 sec. 2; 2048 -> 2048 -> 128 for ResNet-50).
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "mlp", hidden_dim: int = 2048) -> None:
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))
        else:
            raise ValueError(f"head must be 'linear' or 'mlp'; got {kind!r}")

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Args: feats: N x in_dim. Returns: N x out_dim (not normalised)."""
        return self.layers(feats)


class Encoder(nn.Module):
    """Backbone (classifier removed) followed by the projection head: images N x 3 x H x W -> N x dim."""

    def __init__(self, backbone: nn.Module, head: MoCoProjectionHead, feat_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feat_dim = feat_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def build_backbone(arch: str) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision classification network with its final fc replaced by Identity.

    Args:
        arch: a torchvision model name with an ``fc`` classifier (resnet18/34/50/101/152, wide_resnet50_2,
            resnext50_32x4d, ...).

    Returns:
        (backbone mapping N x 3 x H x W -> N x feat_dim, feat_dim).
    """
    import torchvision  # here, not at the top: worker processes that bring their own encoder skip its import time

    try:
        net = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        names = ", ".join(n for n in torchvision.models.list_models(torchvision.models) if "res" in n)
        raise ValueError(f"unknown arch {arch!r}; torchvision ResNet-family names: {names}") from None
    fc = getattr(net, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise ValueError(f"arch {arch!r} has no final 'fc' Linear layer; use a ResNet-family network")
    net.fc = nn.Identity()
    return net, fc.in_features


def build_encoder(arch: str, head: str = "mlp", dim: int = 128, hidden_dim: int = 2048) -> Encoder:
    """The MoCo query/key encoder: ``arch`` backbone plus a ``head`` projection to ``dim``."""
    backbone, feat_dim = build_backbone(arch)
    return Encoder(backbone, MoCoProjectionHead(feat_dim, dim, head, hidden_dim), feat_dim)
