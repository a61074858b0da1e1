"""The MoCo module: query and key encoders, momentum update, shuffle-BN, InfoNCE logits and the key queue."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
from model.batchnorm import convert_split_bn, convert_sync_bn
from model.encoder import Encoder, build_encoder
from model.loss import contrastive_accuracy, info_nce_logits, info_nce_loss
from model.momentum import momentum_update
from model.precision import active_autocast_dtype
from model.queue import KeyQueue
from model.shuffle import build_shuffle, resolve_strategy


@dataclass
class MoCoOutput:
    """What one step returns; every field is a device tensor (reading one is the caller's host sync)."""

    loss: torch.Tensor  # 0-dim, the value to backward
    logits: torch.Tensor  # N x (1+K) float32, positive at index 0 (2N x (1+K) with the symmetric loss)
    acc1: torch.Tensor  # 0-dim, % of rows whose positive is the top logit
    acc5: torch.Tensor  # 0-dim, % of rows whose positive is in the top 5


class QueryForward(nn.Module):
    """Runs the query encoder on one or two views and normalises: the module that DDP wraps.

    Both views go through one call so that DDP sees one forward per backward (the symmetric loss encodes two
    views); each view is its own BN batch, as with two separate encoder calls.
    """

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, *views: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Args: views: each N x 3 x H x W. Returns: one N x C normalised query per view."""
        return tuple(F.normalize(self.encoder(v), dim=1) for v in views)


class MoCo(nn.Module):
    """MoCo v1/v2 (arXiv 1911.05722, 2003.04297) with a fused queue and selectable shuffle-BN.

    One call does the whole contrastive step: momentum update of the key encoder, query forward, key forward
    with shuffle-BN, logits against the queue, InfoNCE loss and accuracy, enqueue. No value is read back to the
    host: the queue pointer stays on the device and the permutation is drawn on the host.

    Construct it after ``setup_distributed`` (``auto`` shuffle-BN and the key gathers look at the world size).

    Key-encoder buffers follow the paper's code: the key encoder starts as a copy of the query encoder
    (parameters and buffers), only parameters are momentum-updated, and its BN running statistics are its own,
    updated by its forward on the shuffled key batches. They are never used for training (the key encoder
    always runs in train mode during pre-training); rank 0's copy is what checkpoints keep.

    Args:
        cfg: a ModelConfig.
        queue_dtype: dtype of the stored keys. None: float32 until the first training step under autocast,
            which switches the queue to the autocast dtype once, so ``q @ queue.T`` needs no cast copy.
        seed: seed of the shuffle permutation generator; must be the same on every rank.
        encoder: a prebuilt query encoder (images -> N x cfg.dim, e.g. an :class:`Encoder` with a small
            backbone in tests) used instead of building ``cfg.arch``; it is taken over, not copied.
    """

    def __init__(self, cfg, queue_dtype: torch.dtype | None = None, seed: int = 0,
                 encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.shuffle_bn = resolve_strategy(cfg.shuffle_bn, distributed.world_size())
        self.temperature = cfg.temperature
        self.symmetric = cfg.symmetric

        self.encoder_q = encoder or build_encoder(cfg.arch, cfg.head, cfg.dim, cfg.mlp_hidden_dim, cfg.stem)
        if self.shuffle_bn == "split":
            convert_split_bn(self.encoder_q, cfg.split_bn_groups)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        if self.shuffle_bn == "sync":
            self.encoder_k = convert_sync_bn(self.encoder_k)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.queue = KeyQueue(cfg.queue_size, cfg.dim, queue_dtype or torch.float32)
        self._adopt_queue_dtype = queue_dtype is None
        self.shuffler = build_shuffle(self.shuffle_bn, seed)

        # Callables kept out of the module tree so state_dict keys stay those of the plain encoders.
        query = QueryForward(self.encoder_q)
        object.__setattr__(self, "_query_fn", torch.compile(query) if cfg.compile else query)
        object.__setattr__(self, "_key_fn", torch.compile(self.encoder_k) if cfg.compile else self.encoder_k)
        self._refresh_param_lists()

    # ------------------------------------------------------------------------- set-up

    def _refresh_param_lists(self) -> None:
        object.__setattr__(self, "_params_q", list(self.encoder_q.parameters()))
        object.__setattr__(self, "_params_k", list(self.encoder_k.parameters()))

    def _apply(self, fn, *args, **kwargs):
        # .to() / .double() may replace parameter tensors; the momentum update's cached lists must follow.
        out = super()._apply(fn, *args, **kwargs)
        self._refresh_param_lists()
        return out

    def wrap_query_encoder(self, wrapper: Callable[[nn.Module], nn.Module]) -> None:
        """Route the query forward through ``wrapper`` (e.g. ``lambda m: DDP(m, device_ids=[i])``).

        Only the query encoder and its head receive gradients, so only they go under DDP; the key encoder and
        the queue are brought to rank 0's values here, once, and stay identical afterwards because every rank
        applies the same updates (DDP broadcasts the query encoder itself).
        """
        with torch.no_grad():
            for t in [*self.encoder_k.parameters(), *self.encoder_k.buffers(), *self.queue.buffers()]:
                distributed.broadcast(t, src=0)
        wrapped = wrapper(QueryForward(self.encoder_q))
        object.__setattr__(self, "_query_fn", torch.compile(wrapped) if self.cfg.compile else wrapped)

    def get_extra_state(self) -> dict:
        """The permutation generator's state, so a resumed run draws the same permutations."""
        return {"shuffle_rng": self.shuffler.rng.bit_generator.state}

    def set_extra_state(self, state: dict) -> None:
        self.shuffler.rng.bit_generator.state = state["shuffle_rng"]

    # ------------------------------------------------------------------------- the step

    def _encode_keys(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._key_fn(images), dim=1)  # B x C

    def _keys(self, view: torch.Tensor, perm) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self.shuffler.keys(self._encode_keys, view, perm)

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, momentum: float | None = None,
                perm: np.ndarray | tuple | None = None) -> MoCoOutput:
        """One contrastive step on this rank's pairs.

        In training mode: momentum-update the key encoder, compute keys with shuffle-BN, then enqueue the
        global batch of keys after the logits are taken. In eval mode: the same loss, no state changes.

        Args:
            view_q: N x 3 x H x W query views (this rank's share of the global batch).
            view_k: N x 3 x H x W key views of the same images.
            momentum: key-encoder momentum m for this step (see ``momentum_at``); None: cfg.momentum.
            perm: optional host permutation for the shuffle (tests, reproducibility); a pair of them with the
                symmetric loss. None: drawn from the shared generator.

        Returns:
            MoCoOutput with loss (summed over both directions when symmetric, as the paper's CIFAR demo),
            logits, acc1, acc5.
        """
        if self.shuffle_bn == "split" and view_q.shape[0] % self.cfg.split_bn_groups != 0:
            raise ValueError(f"split shuffle-BN: batch of {view_q.shape[0]} per rank is not divisible by "
                             f"split_bn_groups={self.cfg.split_bn_groups}")
        if self.training:
            self._match_queue_dtype(view_q.device.type)
            momentum_update(self._params_k, self._params_q, self.cfg.momentum if momentum is None else momentum)

        perms = perm if self.symmetric and perm is not None else (perm, None)
        if self.symmetric:
            q1, q2 = self._query_fn(view_q, view_k)  # N x C each
            k1, k1_all = self._keys(view_q, perms[0])
            k2, k2_all = self._keys(view_k, perms[1])
            negatives = self.queue.negatives()  # K x C
            logits = torch.cat([info_nce_logits(q1, k2, negatives, self.temperature),
                                info_nce_logits(q2, k1, negatives, self.temperature)])
            n = view_q.shape[0]
            loss = info_nce_loss(logits[:n]) + info_nce_loss(logits[n:])
            k_all = torch.cat([k1_all, k2_all])
        else:
            (q,) = self._query_fn(view_q)  # N x C
            k, k_all = self._keys(view_k, perms[0])  # N x C, (W*N) x C
            logits = info_nce_logits(q, k, self.queue.negatives(), self.temperature)  # N x (1+K)
            loss = info_nce_loss(logits)
        acc1, acc5 = contrastive_accuracy(logits.detach())
        if self.training:
            self.queue.enqueue(k_all)
        return MoCoOutput(loss=loss, logits=logits, acc1=acc1, acc5=acc5)

    def _match_queue_dtype(self, device_type: str) -> None:
        """Store the queue in the dtype the negative-logit GEMM runs in (decided once, from autocast)."""
        if not self._adopt_queue_dtype:
            return
        dtype = active_autocast_dtype(device_type) or self._params_q[0].dtype
        if self.queue.keys.dtype != dtype:
            self.queue.keys = self.queue.keys.to(dtype)
        self._adopt_queue_dtype = False
