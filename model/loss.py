"""InfoNCE over one positive and the queue's negatives, and the contrastive accuracy monitor."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.precision import active_autocast_dtype


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits with the positive at index 0 (MoCo Alg. 1).

    Args:
        q: N x C normalised queries.
        k: N x C normalised positive keys (no gradient).
        negatives: K x C normalised negative keys.
        temperature: T.

    Returns:
        N x (1+K) logits / T in at least float32 (the N x K GEMM runs in the autocast dtype when autocast is on).
    """
    l_pos = (q * k.to(q.dtype)).sum(dim=1, keepdim=True)  # N x 1
    if active_autocast_dtype(q.device.type) is None:
        negatives = negatives.to(q.dtype)  # no-op unless the queue is stored in another dtype
    l_neg = q @ negatives.T  # N x K, one GEMM (bf16/fp16 under autocast)
    out_dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 logits under autocast, fp64 in fp64 tests
    return torch.cat([l_pos.to(out_dtype), l_neg.to(out_dtype)], dim=1) / temperature


def info_nce_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive at index 0. Args: logits: N x (1+K). Returns: 0-dim mean loss."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def contrastive_accuracy(logits: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Percentage of rows whose positive (index 0) ranks in the top k, as 0-dim device tensors (no host sync).

    Args:
        logits: N x (1+K).
        topk: the k values; each is clamped to 1+K.
    """
    maxk = min(max(topk), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # N x maxk
    hit = top == 0
    return [hit[:, :min(k, maxk)].any(dim=1).float().mean() * 100.0 for k in topk]
