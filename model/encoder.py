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


STEMS = ("imagenet", "cifar")


def use_cifar_stem(net: nn.Module) -> None:
    """Replace a torchvision ResNet's ImageNet stem by the CIFAR one, in place.

    The ImageNet stem (7x7 conv stride 2, then 3x3 max-pool stride 2) shrinks a 32 px image to 8 x 8 before the
    first residual stage. The CIFAR variant (ResNet paper sec. 4.2; the MoCo CIFAR demo, solo-learn) keeps full
    resolution: a 3x3 stride-1 conv and no max-pool, so layer1 sees 32 x 32. Every stage then sees 16x the pixels:
    the network costs about 16x the FLOPs at the same input size.
    """
    if not isinstance(getattr(net, "conv1", None), nn.Conv2d) or not hasattr(net, "maxpool"):
        raise ValueError(f"the cifar stem needs a ResNet-family network (conv1 + maxpool); {type(net).__name__} is not")
    net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's ResNet init
    net.maxpool = nn.Identity()


def build_backbone(arch: str, stem: str = "imagenet") -> tuple[nn.Module, int]:
    """A randomly initialised torchvision classification network with its final fc replaced by Identity.

    Args:
        arch: a torchvision model name with an ``fc`` classifier (resnet18/34/50/101/152, wide_resnet50_2,
            resnext50_32x4d, ...).
        stem: ``imagenet`` (torchvision's own 7x7 stride-2 conv + max-pool) or ``cifar`` (3x3 stride-1 conv, no
            max-pool; see :func:`use_cifar_stem`) for images of 32-64 px.

    Returns:
        (backbone mapping N x 3 x H x W -> N x feat_dim, feat_dim).
    """
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}; got {stem!r}")
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
    if stem == "cifar":
        use_cifar_stem(net)
    return net, fc.in_features


def build_encoder(arch: str, head: str = "mlp", dim: int = 128, hidden_dim: int = 2048,
                  stem: str = "imagenet") -> Encoder:
    """The MoCo query/key encoder: ``arch`` backbone (with ``stem``) plus a ``head`` projection to ``dim``."""
    backbone, feat_dim = build_backbone(arch, stem)
    return Encoder(backbone, MoCoProjectionHead(feat_dim, dim, head, hidden_dim), feat_dim)
