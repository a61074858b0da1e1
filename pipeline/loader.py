"""The one loader interface: ``build_train_loader(cfg, dist)`` -> an endless stream of (view_q, view_k).

The backends (``pipeline.dali_loader``, ``pipeline.torch_loader``) derive from ``pipeline.base.TrainLoader``;
this factory imports them, never the other way round.
"""

from __future__ import annotations

import importlib.util

from config import Config
from distributed import DistInfo
from pipeline.base import TrainLoader


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def resolve_backend(cfg: Config) -> str:
    """``auto`` -> ``dali`` when DALI is installed, else ``pytorch``."""
    if cfg.data.backend != "auto":
        return cfg.data.backend
    return "dali" if dali_available() else "pytorch"


def build_train_loader(cfg: Config, dist: DistInfo) -> TrainLoader:
    """Build the loader chosen by ``cfg.data.backend`` for this rank.

    Args:
        cfg: the run config (data.shards, backend, recipe, crop_size, batch_size, num_threads, ...).
        dist: this process's place in the job; views land on ``dist.device``.

    Returns:
        An endless iterator of ``(view_q, view_k)``, each N_local x 3 x S x S.

    Raises:
        shards.manifest.ManifestError: a missing manifest, shard or index file (named).
        ValueError: fewer shards than ranks, or fewer samples per rank than one batch.
    """
    backend = resolve_backend(cfg)
    if backend == "dali":
        if not dali_available():
            raise RuntimeError("data.backend=dali but nvidia-dali is not installed; install it or use --backend pytorch")
        from pipeline.dali_loader import DaliLoader

        return DaliLoader(cfg, dist)
    from pipeline.torch_loader import TorchLoader

    return TorchLoader(cfg, dist)
