"""The one typed configuration: frozen dataclasses grouped by concern, CLI flags and YAML generated from them.

Every field is a flag (``--batch-size 256``); field names are unique across groups so flags stay short.
An optional ``--config FILE.yaml`` (nested by group: ``data: {batch_size: 256}``) sets defaults and flags
override it. Invalid input raises :class:`ConfigError` with a one-line message naming the field; entry
points turn it into ``error: ...`` and exit code 2, never a traceback.

Example::

    cfg = parse_config(["--config", "run.yaml", "--batch-size", "512"])
    print(dump_yaml(cfg))
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake; its message is one line that names the field."""


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field whose help text is shown by ``--help`` (give the recommended value and why)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become view pairs."""

    shards: str = _f("", "Shard manifest (manifest.json) or the directory holding it, as written by `python -m shards build`.")
    backend: Literal["auto", "dali", "pytorch"] = _f(
        "auto", "Loader backend. auto: DALI when importable (GPU decode on GPU machines, CPU operators otherwise), else PyTorch.")
    recipe: Literal["v1", "v2"] = _f("v2", "Augmentation recipe: v2 (aug+, blur; recommended, +6 pts linear eval) or v1.")
    crop_size: int = _f(224, "Output crop size in pixels. 224 as in the papers; 64-96 for CPU smoke runs.")
    batch_size: int = _f(256, "GLOBAL batch size (pairs per step over all ranks). 256 as in the paper; must divide by world size.")
    batch_size_per_gpu: int = _f(0, "If > 0, overrides batch_size as batch_size_per_gpu x world_size.")
    num_threads: int = _f(4, "DALI CPU threads (or PyTorch DataLoader workers) per rank. ~ cores per GPU minus 1.")
    prefetch: int = _f(2, "Batches prefetched ahead of the training step. 2 hides jitter; more costs memory.")
    shuffle_buffer: int = _f(2048, "Samples in the reader's shuffle buffer (per rank). Larger mixes shards better.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _f(
        "auto", "Dtype of the views handed to the model. auto: the training precision's dtype on GPU, float32 on CPU.")
    channels_last: bool = _f(True, "Views in channels_last memory format (faster convolutions on tensor cores).")
    hw_decoder_load: float = _f(0.65, "Share of JPEG decoding sent to the hardware decoder (A100/H100). 0.65 per NVIDIA's advice.")
    dali_device: Literal["auto", "gpu", "cpu"] = _f(
        "auto", "Where DALI decodes and augments. auto: the GPU when training on CUDA, else CPU operators only.")
    view_decode: Literal["once", "roi"] = _f(
        "once", "DALI views: decode once and crop twice (recommended, see pipeline/__init__.py) or ROI-decode per view.")
    max_bad_batches: int = _f(1000, "Abort after this many batches lost to corrupt data (a sign the shards are broken).")


@dataclass(frozen=True)
class ModelConfig:
    """The MoCo model: encoder, head, queue, momentum, shuffle-BN."""

    arch: str = _f("resnet50", "torchvision encoder: resnet18/34/50/101/152, wide_resnet50_2, resnext50_32x4d, ...")
    stem: Literal["imagenet", "cifar"] = _f(
        "imagenet", "ResNet stem: imagenet (7x7 stride-2 conv + max-pool; recommended from ~96 px) or cifar (3x3 "
        "stride-1 conv, no max-pool: keeps 32-64 px images at full resolution, as the MoCo CIFAR demo; ~16x the FLOPs "
        "at the same size). A cifar-stem backbone does not load into torchvision's own ResNet: model/export.py says so.")
    head: Literal["mlp", "linear"] = _f("mlp", "Projection head: mlp (MoCo v2, recommended) or linear (MoCo v1).")
    dim: int = _f(128, "Embedding dimension of q and k. 128 as in the papers.")
    mlp_hidden_dim: int = _f(2048, "Hidden width of the MLP head. 2048 (= ResNet-50 feature width) as in MoCo v2.")
    queue_size: int = _f(65536, "Number of negative keys K in the queue. 65536 as in the paper; any value works.")
    momentum: float = _f(0.999, "Key encoder momentum m. 0.999 as in the paper (0.99 for short runs / small data).")
    momentum_schedule: Literal["constant", "cosine"] = _f("constant", "cosine raises m to 1 over training (BYOL-style).")
    temperature: float = _f(0.2, "InfoNCE temperature T. 0.2 for v2, 0.07 for v1.")
    shuffle_bn: Literal["auto", "gather", "all_to_all", "split", "sync", "none"] = _f(
        "auto", "Shuffle-BN strategy. auto: all_to_all with >1 rank (paper semantics, 1/W traffic), split on 1 rank.")
    split_bn_groups: int = _f(8, "Groups for split shuffle-BN on one device (emulates 8 GPUs, as in the paper's CIFAR demo).")
    symmetric: bool = _f(False, "Symmetric loss: both views as query (MoCo v3 style). Doubles compute, better sample use.")
    compile: bool = _f(False, "torch.compile the encoders (GPU; ~10-30% faster after warm-up).")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser, schedule and precision."""

    optimizer: Literal["sgd", "lars"] = _f("sgd", "sgd (paper) or lars (batches >= 4096).")
    base_lr: float = _f(0.03, "LR per 256 pairs; lr = base_lr x batch/256. 0.03 as in the paper.")
    lr: float = _f(0.0, "If > 0, absolute LR that overrides base_lr scaling.")
    sgd_momentum: float = _f(0.9, "SGD momentum. 0.9 as in the paper.")
    weight_decay: float = _f(1e-4, "Weight decay. 1e-4 as in the paper.")
    schedule: Literal["cosine", "step", "constant"] = _f("cosine", "LR schedule per step: cosine (v2) or step (x0.1 at milestones).")
    milestones: list[float] = _f([0.6, 0.8], "Step schedule milestones as fractions of training (paper: epochs 120/160 of 200).")
    warmup_steps: int = _f(0, "Linear LR warm-up steps. 0 for batch 256; ~5 epochs' worth for large batches.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = _f(
        "auto", "Autocast dtype. auto: bf16 on GPUs that support it, fp32 on CPU. fp16 adds a GradScaler.")
    grad_clip: float = _f(0.0, "Clip the gradient norm to this value when > 0 (0: off, as in the paper).")


@dataclass(frozen=True)
class RunConfig:
    """Length, checkpointing, logging and the run directory."""

    run_dir: str = _f("runs/default", "Directory for config.yaml, checkpoints, W&B files and summaries.")
    total_steps: int = _f(0, "Train for this many optimiser steps (takes precedence over total_samples when > 0).")
    total_samples: int = _f(0, "Train until this many pairs were seen (e.g. 200 epochs x 1.28M for ImageNet).")
    seed: int = _f(0, "Global seed: model init, shard order and augmentation randomness derive from it.")
    device: Literal["auto", "cuda", "cpu"] = _f("auto", "Training device. auto: CUDA when available.")
    log_every: int = _f(20, "Reduce and print metrics every N steps (host sync happens only then).")
    checkpoint_every_steps: int = _f(1000, "Write a checkpoint every N steps (0: off).")
    checkpoint_every_minutes: float = _f(15.0, "Also write a checkpoint every N minutes (0: off). Bounds lost work on preemption.")
    keep_checkpoints: int = _f(3, "Keep the newest K checkpoints.")
    resume: str = _f("auto", "auto: newest valid checkpoint in run_dir; none: start fresh; or a checkpoint path.")
    dist_timeout_s: float = _f(600.0, "Collective timeout: a dead rank makes the others fail after this many seconds.")
    wandb_mode: Literal["online", "offline", "disabled"] = _f("offline", "W&B mode. offline needs no network or account.")
    wandb_project: str = _f("moco", "W&B project name.")
    wandb_entity: str = _f("", "W&B entity (team); empty: your default.")
    wandb_log_checkpoints: bool = _f(False, "Upload checkpoints as W&B artifacts.")
    image_log_every: int = _f(500, "Log a grid of example view pairs every N steps (0: off).")
    knn_every: int = _f(0, "Run the kNN monitor every N steps (0: off). Needs knn_train/knn_val.")
    knn_train: str = _f("", "Labelled reference set for the kNN monitor (shard manifest with .cls, or image folder).")
    knn_val: str = _f("", "Labelled query set for the kNN monitor.")
    knn_k: int = _f(200, "Neighbours for the kNN monitor. 200 as in the MoCo CIFAR demo.")
    knn_t: float = _f(0.1, "Temperature of the weighted kNN vote.")


@dataclass(frozen=True)
class Config:
    """The whole resolved configuration of a run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


GROUPS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "run": RunConfig}


# ----------------------------------------------------------------------------- type coercion


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to ``tp`` or raise a one-line ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list; got {value!r}")
        return [_coerce(v, item_tp, name) for v in value]
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: union types are not supported in config")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be a boolean (true/false); got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string; got {value!r}")
    raise ConfigError(f"{name}: unsupported field type {tp}")


# ----------------------------------------------------------------------------- building and validating


def _flag_index() -> dict[str, tuple[str, str]]:
    """Map each field name to (group, field); field names are unique across groups."""
    index: dict[str, tuple[str, str]] = {}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            if f.name in index:
                raise AssertionError(f"config field {f.name} appears in two groups")
            index[f.name] = (group, f.name)
    return index


def build_dataclass(cls: type, raw: dict[str, Any], source: str, prefix: str = "") -> Any:
    """One config dataclass from a flat mapping: unknown keys and wrong types are one-line ConfigErrors."""
    hints = _field_types(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'")
    return cls(**{k: _coerce(v, hints[k], f"{prefix}{k}") for k, v in raw.items()})


def from_dict(values: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from a nested dict ``{group: {field: value}}``.

    Raises:
        ConfigError: unknown group or key, wrong type, or an invalid value.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: top level must be a mapping of groups ({', '.join(GROUPS)})")
    groups = {}
    for group, cls in GROUPS.items():
        raw = values.get(group) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: '{group}' must be a mapping of fields")
        groups[group] = build_dataclass(cls, raw, source, prefix=f"{group}.")
    for group in values:
        if group not in GROUPS:
            raise ConfigError(f"{source}: unknown group '{group}' (expected one of {', '.join(GROUPS)})")
    cfg = Config(**groups)
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The nested plain-dict form of a Config (what YAML, the checkpoint and W&B store)."""
    return dataclasses.asdict(cfg)


def replace(cfg: Config, **group_updates: dict[str, Any]) -> Config:
    """Return a validated copy with some fields changed: ``replace(cfg, data={"batch_size": 64})``."""
    values = to_dict(cfg)
    for group, updates in group_updates.items():
        if group not in GROUPS:
            raise ConfigError(f"unknown group '{group}'")
        values[group].update(updates)
    return from_dict(values)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Check values that types alone cannot; with ``world_size`` also the batch split across ranks."""
    d, m, o, r = cfg.data, cfg.model, cfg.optim, cfg.run
    positive = {
        "data.crop_size": d.crop_size, "data.batch_size": d.batch_size, "data.num_threads": d.num_threads,
        "data.prefetch": d.prefetch, "model.dim": m.dim, "model.mlp_hidden_dim": m.mlp_hidden_dim,
        "model.queue_size": m.queue_size, "model.temperature": m.temperature, "model.split_bn_groups": m.split_bn_groups,
        "optim.base_lr": o.base_lr, "run.log_every": r.log_every, "run.keep_checkpoints": r.keep_checkpoints,
        "run.dist_timeout_s": r.dist_timeout_s, "run.knn_k": r.knn_k, "run.knn_t": r.knn_t,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{name} must be > 0; got {value}")
    non_negative = {
        "data.batch_size_per_gpu": d.batch_size_per_gpu, "data.shuffle_buffer": d.shuffle_buffer,
        "optim.lr": o.lr, "optim.weight_decay": o.weight_decay, "optim.warmup_steps": o.warmup_steps,
        "optim.grad_clip": o.grad_clip, "run.total_steps": r.total_steps, "run.total_samples": r.total_samples,
        "run.checkpoint_every_steps": r.checkpoint_every_steps, "run.checkpoint_every_minutes": r.checkpoint_every_minutes,
        "run.image_log_every": r.image_log_every, "run.knn_every": r.knn_every, "data.max_bad_batches": d.max_bad_batches,
    }
    for name, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{name} must be >= 0; got {value}")
    if not 0.0 <= m.momentum < 1.0:
        raise ConfigError(f"model.momentum must be in [0, 1); got {m.momentum}")
    if not 0.0 <= o.sgd_momentum < 1.0:
        raise ConfigError(f"optim.sgd_momentum must be in [0, 1); got {o.sgd_momentum}")
    if not 0.0 <= d.hw_decoder_load <= 1.0:
        raise ConfigError(f"data.hw_decoder_load must be in [0, 1]; got {d.hw_decoder_load}")
    if any(not 0.0 < x < 1.0 for x in o.milestones) or list(o.milestones) != sorted(o.milestones):
        raise ConfigError(f"optim.milestones must be increasing fractions in (0, 1); got {o.milestones}")
    if r.resume not in ("auto", "none") and not r.resume:
        raise ConfigError("run.resume must be auto, none or a checkpoint path")
    if r.knn_every and not (r.knn_train and r.knn_val):
        raise ConfigError("run.knn_every > 0 needs run.knn_train and run.knn_val")
    if world_size is not None:
        global_batch(cfg, world_size)


def global_batch(cfg: Config, world_size: int) -> int:
    """The global batch for ``world_size`` ranks, checking that every rank gets the same share."""
    if cfg.data.batch_size_per_gpu > 0:
        return cfg.data.batch_size_per_gpu * world_size
    if cfg.data.batch_size % world_size != 0:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size} or set data.batch_size_per_gpu"
        )
    return cfg.data.batch_size


def learning_rate(cfg: Config, world_size: int) -> float:
    """The absolute learning rate: optim.lr if set, else base_lr scaled linearly by global batch / 256."""
    if cfg.optim.lr > 0:
        return cfg.optim.lr
    return cfg.optim.base_lr * global_batch(cfg, world_size) / 256


# ----------------------------------------------------------------------------- YAML and the command line


def load_yaml(path: str | Path) -> Config:
    """Read a config YAML file (nested by group) into a validated Config."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: invalid YAML ({first})") from None
    return from_dict(values, source=str(path))


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML text (round-trips through :func:`from_dict`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


class _OneLineErrorParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)


def build_parser(description: str = "MoCo pre-training") -> argparse.ArgumentParser:
    """An argparse parser with one flag per config field (``--batch-size``), defaults left unset."""
    parser = _OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with defaults (nested by group); flags override it.")
    parser.add_argument("--print-config", action="store_true", help="Print the resolved config as YAML and exit.")
    for group, cls in GROUPS.items():
        add_dataclass_flags(parser, cls, group)
    return parser


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, title: str) -> None:
    """Add one ``--field-name`` flag per field of the dataclass ``cls``, defaults left unset (None)."""
    arg_group = parser.add_argument_group(title, cls.__doc__)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        arg_group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar=f.name.upper(),
            help=f"{f.metadata.get('help', '')} [default: {default}]".replace("%", "%%"),
        )


def parse_dataclass(cls: type, argv: list[str] | None = None, description: str = "", title: str = "options") -> Any:
    """Build any frozen config dataclass (not only :class:`Config`) from flags generated from its fields.

    ``--config FILE.yaml`` (a flat mapping of field names) sets defaults, flags override it. Values are
    coerced like :func:`parse_config`; the dataclass's own ``__post_init__`` may raise ConfigError.

    Raises:
        ConfigError: unknown flag or key, wrong type, invalid value (one line, names the field).
    """
    parser = _OneLineErrorParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML file with defaults (flat mapping); flags override it.")
    add_dataclass_flags(parser, cls, title)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        try:
            values = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{args.config}: cannot read config ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{args.config}: top level must be a mapping of fields")
    build_dataclass(cls, values, str(args.config))  # reject unknown keys in the file before flags mix in
    for f in dataclasses.fields(cls):
        if getattr(args, f.name) is not None:
            values[f.name] = getattr(args, f.name)
    return build_dataclass(cls, values, "command line")


def parse_config(argv: list[str] | None = None, description: str = "MoCo pre-training") -> Config:
    """Resolve defaults <- YAML file <- command-line flags into a validated Config.

    Raises:
        ConfigError: unknown flag or key, wrong type, invalid value (one line, names the field).
    """
    parser = build_parser(description)
    args = parser.parse_args(argv)
    values = to_dict(load_yaml(args.config)) if args.config else to_dict(Config())
    index = _flag_index()
    for name, (group, key) in index.items():
        raw = getattr(args, name)
        if raw is not None:
            values[group][key] = _coerce(raw, _field_types(GROUPS[group])[key], f"{group}.{key}")
    cfg = from_dict(values, source="command line")
    if args.print_config:
        print(dump_yaml(cfg), end="")
        raise SystemExit(0)
    return cfg


def main_guard(fn: typing.Callable[[], Any], user_errors: tuple[type[BaseException], ...] = ()) -> Any:
    """Run an entry point, turning ConfigError (and ``user_errors``) into ``error: ...`` on stderr and exit code 2."""
    try:
        return fn()
    except (ConfigError, *user_errors) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
