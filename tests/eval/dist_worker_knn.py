"""torchrun worker: the kNN monitor on N gloo ranks; rank 0 writes every rank's top-1 to a JSON file.

Usage: torchrun --nproc-per-node=2 tests/eval/dist_worker_knn.py REFERENCE QUERIES OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torchvision

import distributed
from eval.knn import KnnMonitor
from eval.labelled_data import LabelledImages, eval_transform


def main(reference: str, queries: str, out: str) -> None:
    dist = distributed.setup_distributed("cpu", timeout_s=120)
    torch.manual_seed(0)  # the same random backbone as the single-process test builds
    backbone = torchvision.models.resnet18()
    backbone.fc = torch.nn.Identity()
    transform = eval_transform(32)
    monitor = KnnMonitor(LabelledImages(reference, transform), LabelledImages(queries, transform), k=20, t=0.1,
                         batch_size=32)
    top1 = monitor.evaluate(backbone)
    ranks = distributed.all_gather_object(top1)
    if dist.is_main:
        with open(out, "w") as fh:
            json.dump({"ranks": ranks, "num_reference": monitor.last.num_reference,
                       "num_queries": monitor.last.num_queries}, fh)
    distributed.teardown_distributed()


if __name__ == "__main__":
    main(*sys.argv[1:4])
