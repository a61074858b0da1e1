"""A plain MoCo written straight from the paper's Algorithm 1 (plus the released code's normalisation and
per-GPU BN of shuffled keys), one process, explicit Python loops: what the real module is checked against."""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F


class ReferenceMoCo:
    """Algorithm 1 of arXiv 1911.05722 with BN "GPUs" made explicit as groups of the batch.

    Args:
        f_q: the query encoder (images -> N x C); copied, and f_k starts as its copy (f_k.params = f_q.params).
        queue: K x C initial keys (copied). groups: BN groups ("GPUs"); keys are encoded per group of the
            shuffled batch, queries per group of the batch.
    """

    def __init__(self, f_q: torch.nn.Module, queue: torch.Tensor, temperature: float, groups: int = 1) -> None:
        self.f_q = copy.deepcopy(f_q)
        self.f_k = copy.deepcopy(f_q)
        self.queue = queue.clone()  # K x C ring, written one key at a time
        self.ptr = 0
        self.t = temperature
        self.groups = groups
        self.bufs: dict[int, torch.Tensor] = {}

    def _per_group(self, f: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([f(chunk) for chunk in x.chunk(self.groups)])

    def step(self, x_q: torch.Tensor, x_k: torch.Tensor, perm: np.ndarray | None, m: float, lr: float,
             wd: float, mu: float) -> dict[str, torch.Tensor]:
        q = F.normalize(self._per_group(self.f_q, x_q), dim=1)  # N x C
        with torch.no_grad():
            perm = np.arange(x_k.shape[0]) if perm is None else perm
            k_shuffled = F.normalize(self._per_group(self.f_k, x_k[torch.from_numpy(perm)]), dim=1)
            k = torch.empty_like(k_shuffled)
            for t, sample in enumerate(perm):  # undo the shuffle: slot t held sample perm[t]
                k[sample] = k_shuffled[t]
        n = q.shape[0]
        l_pos = torch.bmm(q.view(n, 1, -1), k.view(n, -1, 1)).view(n, 1)
        l_neg = torch.mm(q, self.queue.T)
        logits = torch.cat([l_pos, l_neg], dim=1) / self.t
        loss = F.cross_entropy(logits, torch.zeros(n, dtype=torch.long))
        self.f_q.zero_grad(set_to_none=True)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in self.f_q.named_parameters()}
        with torch.no_grad():
            for i, p in enumerate(self.f_q.parameters()):  # SGD with momentum and weight decay
                g = p.grad + wd * p
                self.bufs[i] = g.clone() if i not in self.bufs else self.bufs[i] * mu + g
                p -= lr * self.bufs[i]
            for pk, pq in zip(self.f_k.parameters(), self.f_q.parameters()):
                pk.copy_(m * pk + (1 - m) * pq)
            for key in k:  # enqueue the newest, dequeue the oldest
                self.queue[self.ptr] = key
                self.ptr = (self.ptr + 1) % self.queue.shape[0]
        return {"logits": logits.detach(), "loss": loss.detach(), "grads": grads}
