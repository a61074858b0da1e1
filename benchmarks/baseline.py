"""The original MoCo step structure (facebookresearch/moco ``builder.py``), re-implemented for benchmarking.

Same math and call signature as :class:`model.moco.MoCo`, with the original's costs kept on purpose so the
benchmark can time both in one run:

- momentum update as a Python loop over parameters (two kernels per parameter);
- shuffle-BN by all-gathering the images, a device ``randperm`` broadcast from rank 0, and unshuffling by
  all-gathering the keys; the keys are all-gathered a second time for the enqueue;
- the queue stored C x K in float32 (under autocast the GEMM casts a copy each step), cloned for the logits;
- ``int(ptr)`` read on the host every step (a device sync) and ``assert K % batch == 0``.

Collectives go through ``distributed`` so it also runs on one device (the original needs a process group).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

import distributed
from model.encoder import build_encoder
from model.loss import contrastive_accuracy
from model.moco import MoCoOutput, QueryForward


class BaselineMoCo(nn.Module):
    """The original structure; see the module docstring. Args: cfg: a ModelConfig (shuffle_bn is ignored)."""

    def __init__(self, cfg, queue_dtype: torch.dtype | None = None, seed: int = 0,
                 encoder: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.K, self.T = cfg.queue_size, cfg.temperature
        self.encoder_q = encoder or build_encoder(cfg.arch, cfg.head, cfg.dim, cfg.mlp_hidden_dim, cfg.stem)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(cfg.dim, cfg.queue_size), dim=0))  # C x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        object.__setattr__(self, "_query_fn", QueryForward(self.encoder_q))

    def wrap_query_encoder(self, wrapper) -> None:
        object.__setattr__(self, "_query_fn", wrapper(QueryForward(self.encoder_q)))

    @torch.no_grad()
    def _momentum_update_key_encoder(self, m: float) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * m + param_q.data * (1.0 - m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = distributed.all_gather(keys)  # the second gather of the same keys
        batch = keys.shape[0]
        ptr = int(self.queue_ptr)  # host read: waits for the whole step so far
        assert self.K % batch == 0  # the original's restriction
        self.queue[:, ptr:ptr + batch] = keys.T
        self.queue_ptr[0] = (ptr + batch) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = x.shape[0]
        x_gather = distributed.all_gather(x)
        idx_shuffle = distributed.broadcast(torch.randperm(x_gather.shape[0], device=x.device), src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        r = distributed.rank()
        return x_gather[idx_shuffle.view(-1, batch)[r]], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        x_gather = distributed.all_gather(x)
        return x_gather[idx_unshuffle.view(-1, batch)[distributed.rank()]]

    def forward(self, view_q: torch.Tensor, view_k: torch.Tensor, momentum: float | None = None,
                perm=None) -> MoCoOutput:
        (q,) = self._query_fn(view_q)  # N x C
        with torch.no_grad():
            self._momentum_update_key_encoder(self.cfg.momentum if momentum is None else momentum)
            im_k, idx_unshuffle = self._batch_shuffle(view_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)
            k = self._batch_unshuffle(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())
        logits = torch.cat([l_pos, l_neg], dim=1).to(torch.promote_types(q.dtype, torch.float32)) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        loss = F.cross_entropy(logits, labels)
        acc1, acc5 = contrastive_accuracy(logits.detach())
        self._dequeue_and_enqueue(k)
        return MoCoOutput(loss=loss, logits=logits, acc1=acc1, acc5=acc5)
