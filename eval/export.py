"""Take the query encoder's backbone out of a checkpoint: a plain torchvision state_dict or detectron2 weights.

Usage::

    python -m eval.export runs/r50/checkpoints/step-000500000.pt --format torchvision --out r50_moco.pth
    python -m eval.export CKPT --format detectron2 --out r50_moco.pkl     # then MODEL.WEIGHTS r50_moco.pkl

Accepted checkpoints: this project's (``{"model": MoCo.state_dict(), "config": {...}}``), the original MoCo
release (``{"state_dict": {"module.encoder_q.*": ...}, "arch": ...}``) and plain state dicts (for example an
earlier torchvision export). The torchvision file loads into ``torchvision.models.<arch>()`` with only ``fc``
missing; a backbone trained with ``--stem cifar`` (3x3 conv1, no max-pool) loads after
``model.encoder.use_cifar_stem(net)``, the command says so, and it has no detectron2 form (a one-line error).
The detectron2 file renames keys as the original MoCo converter does (``stem.conv1``, ``res2..res5``, ``shortcut``,
BN as ``convN.norm``) and sets ``matching_heuristics`` so detectron2 maps the rest by shape.
With detectron2, set ``MODEL.PIXEL_MEAN/STD`` to ImageNet RGB statistics (times 255) and ``INPUT.FORMAT: RGB``:
the backbone was trained on RGB images normalised that way, not on detectron2's default BGR/Caffe input.
"""

from __future__ import annotations

import sys

import cli


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m eval.export",
                                description="Export the query encoder's backbone from a MoCo checkpoint.")
    parser.add_argument("checkpoint", help="checkpoint file (this project's, the original MoCo's, or a state dict)")
    parser.add_argument("--format", choices=("torchvision", "detectron2"), default="torchvision",
                        help="torchvision: state_dict for torchvision.models.<arch>() (fc missing); "
                             "detectron2: .pkl for MODEL.WEIGHTS (default: torchvision)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="output file (.pth for torchvision, .pkl for detectron2)")
    parser.add_argument("--arch", default=None, metavar="NAME",
                        help="torchvision architecture (default: the one the checkpoint records)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, then export; mistakes (a bad flag, an unusable checkpoint) exit 2 in one line.

    The command line is parsed before torch loads (seconds): ``--help`` and a mistyped flag answer at once. The
    export code below is then imported as the module ``eval.export``.
    """

    def run() -> int:
        args = build_parser().parse_args(argv)
        from eval import export  # this file's code below main(): torch and torchvision load now

        return export.run_export(args)

    return cli.guard(run)  # CheckpointError is a cli.UserError


if __name__ == "__main__":
    sys.exit(main())


# ----------------------------------------------------------------------------- the export (imported after parsing)
# ruff: noqa: E402 -- the imports below follow main(), which parses the command line before torch loads.

import argparse
import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from model.encoder import build_backbone, use_cifar_stem

# Prefixes under which a backbone's torchvision keys (conv1.weight, layer1.0.bn1.weight, ...) are stored, tried in
# order. MoCo (model/moco.py) keeps the query encoder's torchvision trunk under "encoder_q.backbone." (model/encoder.py).
BACKBONE_PREFIXES = ("encoder_q.backbone.", "encoder_q.", "module.encoder_q.", "backbone.", "module.", "")


class CheckpointError(cli.UserError):
    """A checkpoint that cannot be read or does not hold the expected backbone; the message is one line."""


def load_failure_reason(exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, as one whole sentence (torch's own messages run to paragraphs).

    A pickled object that is not a tensor or plain container (``weights_only`` refuses it) names the offending
    global; a truncated or non-zip file says so; anything else gives the first sentence of torch's message.
    """
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if unsupported:
        return (f"it pickles {unsupported.group(1)}, which torch.load(weights_only=True) refuses to run; "
                "only tensors and plain containers are accepted")
    if "central directory" in text or "zip archive" in text or isinstance(exc, EOFError):
        return "the file is truncated or not a torch.save archive"
    if isinstance(exc, (KeyError, pickle.UnpicklingError)) or not text:
        return f"not a torch.save archive ({type(exc).__name__})"
    first = re.split(r"(?<=[.!?])\s", text.splitlines()[0], maxsplit=1)[0]
    return f"{type(exc).__name__}: {first if len(first) <= 200 else first[:197] + '...'}"


def load_checkpoint(source: str | os.PathLike | dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint (path or already-loaded dict) into ``(state_dict, config)``.

    Returns:
        The model state dict (this project's ``"model"``, the original MoCo's ``"state_dict"``, or the dict
        itself when it maps names to tensors) and the nested run config (``{}`` when the checkpoint has none).

    Raises:
        CheckpointError: missing, unreadable or corrupt file, or a dict without a model state.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, ...)
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({load_failure_reason(exc)})") from None
    else:
        path, obj = "<state dict>", source
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    for key in ("model", "state_dict"):
        if isinstance(obj.get(key), dict):
            state = obj[key]
            break
    else:
        state = obj
    # Non-tensor entries are allowed (a module's "_extra_state", e.g. MoCo's shuffle generator state).
    if not any(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no model state found (expected 'model' or 'state_dict' of tensors)")
    if not config and isinstance(obj.get("arch"), str):  # the original MoCo checkpoint records only the arch
        config = {"model": {"arch": obj["arch"]}}
    return state, config


def checkpoint_arch(config: dict[str, Any]) -> str | None:
    """The encoder architecture recorded in a checkpoint's config, if any."""
    return (config.get("model") or {}).get("arch")


def backbone_state_dict(state: dict[str, torch.Tensor], arch: str) -> OrderedDict[str, torch.Tensor]:
    """The query encoder's trunk as a state dict of ``torchvision.models.<arch>()`` without ``fc``.

    Args:
        state: a model state dict (MoCo, original MoCo, or plain torchvision).
        arch: torchvision model name (``resnet50``).

    Raises:
        CheckpointError: unknown architecture, no backbone under any known prefix, or names/shapes that do
            not match ``arch`` (a checkpoint of another architecture).
    """
    # Wrappers add name segments: torch.compile "_orig_mod.", DDP around an encoder "module.".
    state = {k.replace("_orig_mod.", "").replace("encoder_q.module.", "encoder_q."): v for k, v in state.items()}
    for prefix in BACKBONE_PREFIXES:
        if prefix + "conv1.weight" in state:
            break
    else:
        raise CheckpointError(f"no backbone found in the checkpoint (no *conv1.weight under {', '.join(BACKBONE_PREFIXES[:-1])})")
    trunk = OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix) and isinstance(v, torch.Tensor))
    reference = torchvision_state_template(arch, stem_of(trunk))
    missing = [k for k in reference if k not in trunk]
    if missing:
        raise CheckpointError(f"checkpoint does not match {arch}: {len(missing)} backbone tensors missing (e.g. {prefix}{missing[0]})")
    for k, ref in reference.items():
        if trunk[k].shape != ref.shape:
            raise CheckpointError(f"checkpoint does not match {arch}: {prefix}{k} has shape {tuple(trunk[k].shape)}, "
                                  f"{arch} expects {tuple(ref.shape)}")
    # Trunk-like tensors that arch lacks mean a deeper network (resnet101 holds every resnet50 tensor, same shapes).
    extra = [k for k in trunk if k not in reference and re.match(r"(conv|bn|layer)\d", k)]
    if extra:
        raise CheckpointError(f"checkpoint does not match {arch}: unexpected tensor {prefix}{extra[0]}")
    return OrderedDict((k, trunk[k].detach().clone().contiguous()) for k in reference)


def stem_of(weights: dict[str, torch.Tensor]) -> str:
    """``cifar`` when the trunk's ``conv1`` is the 3x3 CIFAR stem (model/encoder.py), else ``imagenet`` (7x7)."""
    conv1 = weights.get("conv1.weight")
    return "cifar" if conv1 is not None and conv1.dim() == 4 and tuple(conv1.shape[-2:]) == (3, 3) else "imagenet"


def torchvision_state_template(arch: str, stem: str = "imagenet") -> OrderedDict[str, torch.Tensor]:
    """Names and shapes (on the meta device: no memory) of ``torchvision.models.<arch>()`` without ``fc``.

    With ``stem="cifar"``, of the same network after :func:`model.encoder.use_cifar_stem` (conv1 is 3x3).
    """
    import torchvision  # here, not at the top: its import costs seconds that --help should not wait for

    try:
        builder = torchvision.models.get_model_builder(arch)
    except ValueError:
        raise CheckpointError(f"unknown torchvision architecture {arch!r}") from None
    with torch.device("meta"):
        model = builder()
        if stem == "cifar":
            use_cifar_stem(model)
    return OrderedDict((k, v) for k, v in model.state_dict().items() if not k.startswith("fc."))


def load_backbone(source: str | os.PathLike | dict, arch: str | None = None) -> torch.nn.Module:
    """A torchvision model with the checkpoint's query-encoder weights and ``fc = Identity`` (pooled features out).

    Args:
        source: checkpoint path or loaded checkpoint / state dict.
        arch: torchvision architecture; default: the one recorded in the checkpoint.
    """
    state, config = load_checkpoint(source)
    arch = arch or checkpoint_arch(config)
    if not arch:
        raise CheckpointError("the checkpoint records no architecture; pass --arch")
    weights = backbone_state_dict(state, arch)
    model, _ = build_backbone(arch, stem_of(weights))
    model.load_state_dict(weights, strict=True)
    return model


def to_detectron2(weights: dict[str, torch.Tensor], author: str = "moco-dali") -> dict[str, Any]:
    """Rename a torchvision ResNet state dict to detectron2's ResNet names (numpy arrays, pickle-ready).

    ``conv1/bn1`` -> ``stem.conv1`` / ``stem.conv1.norm``; ``layerN`` -> ``res{N+1}``; ``bnK`` -> ``convK.norm``;
    ``downsample.0/1`` -> ``shortcut`` / ``shortcut.norm``. BN's ``num_batches_tracked`` counters are dropped
    (detectron2's frozen BN has none).
    """
    if "layer4.0.conv1.weight" not in weights:
        raise CheckpointError("detectron2 export needs a ResNet backbone (layer1..layer4)")
    if stem_of(weights) == "cifar":
        raise CheckpointError("detectron2 export needs the imagenet stem; this backbone has the cifar stem "
                              "(3x3 conv1, no max-pool), which detectron2's ResNet cannot express")
    out: dict[str, Any] = {}
    for name, value in weights.items():
        if name.endswith("num_batches_tracked") or name.startswith("fc."):
            continue
        new = name if name.startswith("layer") else "stem." + name
        new = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", new)
        new = re.sub(r"(^|\.)bn(\d)", r"\1conv\2.norm", new)
        new = new.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
        out[new] = value.detach().cpu().numpy()
    return {"model": out, "__author__": author, "matching_heuristics": True}


# Blocks per stage (res2..res5) and block kind -> detectron2's MODEL.RESNETS.DEPTH.
RESNET_DEPTHS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
                 ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}


def detectron2_resnet_settings(d2_weights: dict[str, Any]) -> dict[str, Any]:
    """The ``MODEL.RESNETS`` values a detectron2 config needs for these weights (names as :func:`to_detectron2` writes).

    detectron2 defaults to ResNet-50 (``DEPTH 50``, ``RES2_OUT_CHANNELS 256``, ``STRIDE_IN_1X1 True``, the MSRA
    layout). A ResNet-18/34 needs ``RES2_OUT_CHANNELS 64`` (detectron2 asserts it for R18/R34) and torchvision's
    bottleneck puts the stride in the 3x3 conv, hence ``STRIDE_IN_1X1 False`` (as MoCo's detectron2 configs set).
    """
    blocks = tuple(len({k.split(".")[1] for k in d2_weights if k.startswith(f"res{s}.")}) for s in (2, 3, 4, 5))
    bottleneck = "res2.0.conv3.weight" in d2_weights
    settings: dict[str, Any] = {"DEPTH": RESNET_DEPTHS.get((blocks, bottleneck), f"unknown ({blocks} blocks)")}
    if bottleneck:
        settings.update(RES2_OUT_CHANNELS=d2_weights["res2.0.conv3.weight"].shape[0], STRIDE_IN_1X1=False)
    else:
        settings.update(RES2_OUT_CHANNELS=d2_weights["res2.0.conv2.weight"].shape[0])
    if bottleneck:  # ResNeXt (grouped 3x3 conv) and wide ResNets change the bottleneck width from 1 x 64
        width, per_group = d2_weights["res2.0.conv1.weight"].shape[0], d2_weights["res2.0.conv2.weight"].shape[1]
        if width != 64:
            settings.update(NUM_GROUPS=width // per_group, WIDTH_PER_GROUP=per_group)
    return settings


def export(source: str | os.PathLike | dict, fmt: str, out: str | os.PathLike, arch: str | None = None) -> Path:
    """Write the backbone of ``source`` to ``out`` as ``torchvision`` (torch.save) or ``detectron2`` (pickle)."""
    state, config = load_checkpoint(source)
    arch = arch or checkpoint_arch(config)
    if not arch:
        raise CheckpointError("the checkpoint records no architecture; pass --arch")
    weights = backbone_state_dict(state, arch)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if fmt == "torchvision":
        torch.save(weights, tmp)
    elif fmt == "detectron2":
        with open(tmp, "wb") as fh:
            pickle.dump(to_detectron2(weights), fh)
    else:
        raise CheckpointError(f"unknown export format {fmt!r} (torchvision or detectron2)")
    os.replace(tmp, out)
    return out


def run_export(args: argparse.Namespace) -> int:
    """The command: export, print where the weights went and what a reader of them must set."""
    path = export(args.checkpoint, args.format, args.out, args.arch)
    print(f"wrote {args.format} weights to {path}")
    if args.format == "detectron2":
        with open(path, "rb") as fh:
            settings = detectron2_resnet_settings(pickle.load(fh)["model"])
        print("detectron2 config: " + ", ".join(f"MODEL.RESNETS.{k} {v}" for k, v in settings.items())
              + " (detectron2's defaults are ResNet-50's: DEPTH 50, RES2_OUT_CHANNELS 256; R18/R34 need 64)")
    if args.format == "torchvision" and stem_of(torch.load(path, map_location="cpu", weights_only=True)) == "cifar":
        print("note: cifar stem (3x3 conv1, no max-pool): load into torchvision.models.<arch>() after "
              "model.encoder.use_cifar_stem(net), or with eval.export.load_backbone(path)")
    return 0
