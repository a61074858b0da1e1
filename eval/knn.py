"""Weighted kNN monitor: backbone features of a labelled reference set vote for the labels of a query set.

The classifier of Wu et al. 2018 (InstDisc, sec. 3.4), used by the MoCo CIFAR demo and solo-learn to watch
feature quality during pre-training: features are L2-normalised, each query takes its ``k`` most cosine-similar
reference features, and neighbour ``i`` votes for its class with weight ``exp(s_i / T)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import distributed
from eval.labelled_data import LabelledImages, build_eval_loader, eval_transform


def knn_predict(query: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                k: int = 200, t: float = 0.1) -> torch.Tensor:
    """Class scores of a weighted kNN vote.

    Args:
        query: B x D L2-normalised query features.
        bank: N x D L2-normalised reference features (same device).
        bank_labels: N class indices (int64).
        num_classes: C.
        k: neighbours per query (clipped to N).
        t: temperature of the vote weights ``exp(sim / t)``.

    Returns:
        B x C vote scores; ``argmax(1)`` is the prediction.
    """
    sim = query @ bank.T.to(query.dtype)  # B x N cosine similarities
    top_sim, top_idx = sim.topk(min(k, bank.shape[0]), dim=1)  # B x k
    weights = (top_sim.float() / t).exp()  # B x k
    scores = torch.zeros(query.shape[0], num_classes, device=query.device)
    return scores.scatter_add_(1, bank_labels[top_idx], weights)  # B x C


def pooled_features(backbone: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``backbone(images)`` as B x D, average-pooling a B x D x h x w feature map if the backbone returns one."""
    out = backbone(images)
    if out.dim() == 4:
        out = F.adaptive_avg_pool2d(out, 1)
    return out.flatten(1)


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate per-rank tensors whose row counts may differ by rank (pad to the largest, gather, trim)."""
    if distributed.world_size() == 1:
        return local
    counts = distributed.all_gather(torch.tensor([local.shape[0]], device=local.device)).tolist()
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = distributed.all_gather(padded).view(len(counts), max(counts), *local.shape[1:])
    return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])


@dataclass
class KnnResult:
    """Outcome of one kNN evaluation (identical on every rank)."""

    top1: float  # percent of the query set
    num_queries: int
    num_reference: int
    bad_samples: int  # undecodable images skipped (both sets)


class KnnMonitor:
    """Embeds a labelled reference and query set with a backbone and reports weighted-kNN top-1.

    Under torch.distributed each rank embeds its share of both sets; reference features are all-gathered
    (the bank lives on the device of every rank) and correct counts are summed, so every rank returns the
    same exact number. Without a process group it is a plain single-process evaluation.

    Args:
        reference: labelled set the bank is built from (training split).
        queries: labelled set that is classified (validation split); same classes as ``reference``.
        k: neighbours (200 in the MoCo CIFAR demo).
        t: vote temperature (0.1).
        device: where features and the bank live.
        batch_size: images per forward pass on each rank.
        workers: DataLoader worker processes per rank (0: decode in the calling process).
        channels_last: feed images in channels_last memory format (as the training views are).
    """

    def __init__(self, reference: LabelledImages, queries: LabelledImages, k: int = 200, t: float = 0.1,
                 device: torch.device | str = "cpu", batch_size: int = 256, workers: int = 0,
                 channels_last: bool = False):
        if reference.classes != queries.classes:
            raise ValueError(f"kNN sets disagree on classes: {reference.path} has {reference.num_classes}, "
                             f"{queries.path} has {queries.num_classes} (or different names)")
        self.reference, self.queries = reference, queries
        self.k, self.t = k, t
        self.device = torch.device(device)
        self.batch_size, self.workers = batch_size, workers
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.last: KnnResult | None = None

    @property
    def chance_top1(self) -> float:
        """Top-1 (percent) of always guessing the query set's most frequent class: the level a kNN result must beat."""
        counts = torch.bincount(self.queries.targets, minlength=self.queries.num_classes)
        return 100.0 * counts.max().item() / max(len(self.queries), 1)

    @torch.no_grad()
    def embed(self, backbone: torch.nn.Module, dataset: LabelledImages) -> tuple[torch.Tensor, torch.Tensor, int]:
        """This rank's share of ``dataset`` as L2-normalised features.

        Returns:
            features n x D (float32 on CPU; float16 on CUDA to halve the bank), labels n, undecodable count.
        """
        loader = build_eval_loader(dataset, self.batch_size, self.workers, distributed.rank(), distributed.world_size())
        feats, labels, bad = [], [], 0
        amp = self.device.type == "cuda"
        for images, targets, n_bad in loader:
            bad += n_bad
            if images.numel() == 0:
                continue
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
                out = pooled_features(backbone, images)
            feats.append(F.normalize(out.float(), dim=1).to(torch.float16 if amp else torch.float32))
            labels.append(targets.to(self.device))
        if not feats:  # this rank got only undecodable images, or no share at all
            dim = pooled_features(backbone, torch.zeros(1, 3, 32, 32, device=self.device)).shape[1]
            return torch.zeros(0, dim, device=self.device), torch.zeros(0, dtype=torch.long, device=self.device), bad
        return torch.cat(feats), torch.cat(labels), bad

    @torch.no_grad()
    def evaluate(self, backbone: torch.nn.Module) -> float:
        """Top-1 weighted-kNN accuracy in percent (0-100) of ``backbone``'s features; every rank must call it.

        The backbone runs in eval mode (BN running statistics, as at deployment) and its mode is restored after.
        """
        was_training = backbone.training
        backbone.eval()
        try:
            bank, bank_labels, bad_ref = self.embed(backbone, self.reference)
            bank, bank_labels = _gather_rows(bank), _gather_rows(bank_labels)
            queries, query_labels, bad_query = self.embed(backbone, self.queries)
        finally:
            backbone.train(was_training)
        if bank.shape[0] == 0:
            raise RuntimeError(f"kNN monitor: no decodable image in the reference set {self.reference.path}")
        correct = torch.zeros((), device=self.device)
        # Chunk the queries so the B x N similarity matrix stays small even with a large bank.
        for start in range(0, queries.shape[0], self.batch_size):
            q = queries[start:start + self.batch_size]
            pred = knn_predict(q, bank, bank_labels, self.reference.num_classes, self.k, self.t).argmax(1)
            correct += (pred == query_labels[start:start + self.batch_size]).sum()
        stats = torch.stack([correct.float(), torch.tensor(float(queries.shape[0]), device=self.device),
                             torch.tensor(float(bad_ref + bad_query), device=self.device)])
        correct_all, total, bad = distributed.all_reduce_sum(stats).tolist()
        top1 = 100.0 * correct_all / total if total else math.nan
        self.last = KnnResult(top1, int(total), bank.shape[0], int(bad))
        return top1


def build_knn_monitor(cfg, dist: distributed.DistInfo) -> KnnMonitor:
    """The kNN monitor a training run configures with ``run.knn_train`` / ``run.knn_val`` / ``run.knn_k`` / ``run.knn_t``.

    Images are resized to ``crop_size / 0.875`` and center-cropped to ``data.crop_size`` (the pre-training
    resolution), ImageNet-normalised. Each rank embeds ``global batch / world size`` images per forward pass.

    Args:
        cfg: the run's :class:`config.Config`.
        dist: this process's :class:`distributed.DistInfo`.

    Raises:
        LabelledSetError: a missing, empty or unlabelled set (one line naming it).
    """
    import config as config_lib

    transform = eval_transform(cfg.data.crop_size)
    reference = LabelledImages(cfg.run.knn_train, transform)
    queries = LabelledImages(cfg.run.knn_val, transform)
    per_rank = config_lib.global_batch(cfg, dist.world_size) // dist.world_size
    return KnnMonitor(reference, queries, k=cfg.run.knn_k, t=cfg.run.knn_t, device=dist.device, batch_size=per_rank,
                      workers=min(cfg.data.num_threads, 8) if dist.device.type == "cuda" else 0,
                      channels_last=cfg.data.channels_last and dist.device.type == "cuda")
