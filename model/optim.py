"""Optimiser and learning-rate schedule: SGD (the paper) or LARS, fused where available; warmup, cosine, step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def lr_at(step: int, total_steps: int, cfg, peak_lr: float) -> float:
    """The learning rate at optimiser step ``step`` (0-based).

    Linear warm-up over ``cfg.warmup_steps`` to ``peak_lr``, then ``cosine`` (MoCo v2: half a cosine to 0 over
    the remaining steps), ``step`` (x0.1 at each milestone fraction of total_steps; the paper's epochs 120 and
    160 of 200) or ``constant``.

    Args:
        step: current step. total_steps: steps in the run (> 0 for cosine and step).
        cfg: an OptimConfig. peak_lr: the absolute LR (``config.learning_rate``).
    """
    warmup = cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return peak_lr * (step + 1) / warmup
    if cfg.schedule == "constant":
        return peak_lr
    if total_steps <= 0:
        raise ValueError(f"schedule={cfg.schedule} needs total_steps > 0")
    if cfg.schedule == "cosine":
        progress = min(max((step - warmup) / max(total_steps - warmup, 1), 0.0), 1.0)
        return peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return peak_lr * 0.1 ** sum(step >= m * total_steps for m in cfg.milestones)
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), for batches of 4096 and more.

    Per tensor with ndim > 1: ``g <- g + wd * w``, ``g <- g * eta * |w| / |g|`` (1 when either norm is 0),
    ``buf <- mu * buf + g``, ``w <- w - lr * buf``. Biases and BN parameters (ndim 1) skip weight decay and the
    trust ratio, as is usual for LARS (MoCo v3 does the same). Norms use multi-tensor kernels; nothing is read
    on the host.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            adapt = [i for i, p in enumerate(params) if p.ndim > 1]
            if adapt:
                ps, gs = [params[i] for i in adapt], [grads[i] for i in adapt]
                if group["weight_decay"]:
                    gs = torch._foreach_add(gs, ps, alpha=group["weight_decay"])
                w_norm = torch.stack(torch._foreach_norm(ps))
                g_norm = torch.stack(torch._foreach_norm(gs))
                ok = (w_norm > 0) & (g_norm > 0)
                trust = torch.where(ok, group["trust_coefficient"] * w_norm / g_norm.clamp_min(1e-30),
                                    torch.ones_like(w_norm))
                gs = [g * t for g, t in zip(gs, trust.unbind())]
                for i, g in zip(adapt, gs):
                    grads[i] = g
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                bufs.append(state["momentum_buffer"])
            torch._foreach_add_(params, bufs, alpha=-group["lr"])
        return loss


def _apex_optimizer(name: str):
    """apex's fused optimizer class when apex (NVIDIA's, with its CUDA extensions) is importable, else None."""
    try:
        from apex import optimizers as apex_optimizers
        from apex.multi_tensor_apply import multi_tensor_applier
    except ImportError:  # also the unrelated PyPI package called apex
        return None
    if not getattr(multi_tensor_applier, "available", False):
        return None
    return getattr(apex_optimizers, name, None)


def build_optimizer(cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters of ``model`` (the query encoder and head).

    ``sgd``: momentum 0.9 and weight decay on every parameter, as in the paper; apex FusedSGD when importable
    and the parameters are on CUDA, else ``torch.optim.SGD`` with ``fused=True`` on CUDA, ``foreach`` on CPU.
    ``lars``: apex FusedLARS when available, else :class:`LARS`.

    Args:
        cfg: an OptimConfig. model: a MoCo (key-encoder parameters have requires_grad=False and are skipped).
        lr: the initial learning rate (``lr_at(0, ...)``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: the model has no trainable parameters")
    on_cuda = params[0].device.type == "cuda"
    if cfg.optimizer == "sgd":
        apex_sgd = _apex_optimizer("FusedSGD") if on_cuda else None
        if apex_sgd is not None:
            return apex_sgd(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        kwargs = {"fused": True} if on_cuda else {"foreach": True}
        try:
            return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay, **kwargs)
        except (TypeError, RuntimeError):  # fused SGD missing in this torch build
            return torch.optim.SGD(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay,
                                   foreach=True)
    if cfg.optimizer == "lars":
        apex_lars = _apex_optimizer("FusedLARS") if on_cuda else None
        if apex_lars is not None:
            return apex_lars(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
        return LARS(params, lr=lr, momentum=cfg.sgd_momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer must be sgd or lars; got {cfg.optimizer!r}")
