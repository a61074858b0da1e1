"""MoCo v1/v2: encoders, momentum update, key queue, shuffle-BN strategies, InfoNCE, optimiser and precision.

The interface train.py and the benchmarks use::

    from model import MoCo, build_optimizer, lr_at, momentum_at, autocast_dtype

    model = MoCo(cfg.model)                  # after setup_distributed(); encoder_q, encoder_k, queue (K x C) + ptr
    model.to(device)                         # optionally .to(memory_format=torch.channels_last)
    model.wrap_query_encoder(lambda m: DDP(m, device_ids=[local_rank]))  # key encoder and queue stay outside DDP
    dtype = autocast_dtype(cfg.optim.precision, device)   # None: fp32; GradScaler only for torch.float16
    opt = build_optimizer(cfg.optim, model, lr_at(0, total, cfg.optim, peak_lr))
    for step, (view_q, view_k) in enumerate(loader):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, cfg.optim, peak_lr)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(view_q, view_k, momentum=momentum_at(step, total, cfg.model))
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        # out.loss, out.acc1, out.acc5: 0-dim device tensors; out.logits: N x (1+K). Read them every log_every.

``model.state_dict()`` holds both encoders with heads, the queue (``queue.keys`` K x C, ``queue.ptr``) and the
shuffle generator state; ``load_state_dict`` restores them. The shuffle-BN strategy is ``cfg.model.shuffle_bn``
(see ``model.shuffle``).
"""

from model.encoder import Encoder, MoCoProjectionHead, build_backbone, build_encoder
from model.loss import contrastive_accuracy, info_nce_logits, info_nce_loss
from model.moco import MoCo, MoCoOutput
from model.momentum import momentum_at, momentum_update
from model.optim import LARS, build_optimizer, lr_at
from model.precision import autocast_dtype
from model.queue import KeyQueue
from model.shuffle import resolve_strategy

__all__ = [
    "LARS", "Encoder", "KeyQueue", "MoCo", "MoCoOutput", "MoCoProjectionHead", "autocast_dtype", "build_backbone",
    "build_encoder", "build_optimizer", "contrastive_accuracy", "info_nce_logits", "info_nce_loss", "lr_at",
    "momentum_at", "momentum_update", "resolve_strategy",
]
