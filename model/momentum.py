"""The momentum (EMA) update of the key encoder and its optional cosine schedule."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def momentum_update(key_params: list[torch.Tensor], query_params: list[torch.Tensor], momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q for every pair, in a few fused multi-tensor kernels (MoCo eq. 2).

    ``lerp(k, q, 1 - m) = k + (1 - m) (q - k)`` is the same update as the paper's, one read of each list and one
    write instead of the original Python loop of two kernels per parameter.

    Args:
        key_params: the key encoder's parameters (updated in place).
        query_params: the query encoder's parameters, same order, shapes and dtypes.
        momentum: m in [0, 1]; a Python float, so no device value is read.
    """
    if key_params:
        torch._foreach_lerp_(key_params, query_params, 1.0 - momentum)


def momentum_at(step: int, total_steps: int, cfg) -> float:
    """The key-encoder momentum at ``step``.

    ``constant``: cfg.momentum throughout (the paper). ``cosine``: rises from cfg.momentum to 1 over training,
    ``1 - (1 - m0) (cos(pi t / T) + 1) / 2`` (BYOL's schedule).

    Args:
        step: current optimiser step, 0-based.
        total_steps: steps in the whole run (> 0 for the cosine schedule).
        cfg: a ModelConfig (uses momentum, momentum_schedule).
    """
    m0 = cfg.momentum
    if cfg.momentum_schedule == "constant":
        return m0
    if cfg.momentum_schedule == "cosine":
        if total_steps <= 0:
            raise ValueError("momentum_schedule=cosine needs total_steps > 0")
        progress = min(max(step / total_steps, 0.0), 1.0)
        return 1.0 - (1.0 - m0) * (math.cos(math.pi * progress) + 1.0) / 2.0
    raise ValueError(f"unknown momentum_schedule {cfg.momentum_schedule!r}")
