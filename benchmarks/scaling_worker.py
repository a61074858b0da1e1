"""One rank of the multi-GPU scaling measurement (launched by benchmarks/scaling.py under torchrun).

Every rank runs the real training step (``train.train_step``, DDP on the query encoder, ``auto`` shuffle-BN:
all_to_all with > 1 rank) on synthetic views of ``--batch-per-rank`` pairs; rank 0 times ``repeats`` x ``iters``
steps after warm-up and writes the global pairs/s to ``--out``.

    torchrun --nproc-per-node=8 -m benchmarks.scaling_worker --arch resnet50 --crop 224 --batch-per-rank 256 \\
        --out /tmp/scaling-8.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import config as config_lib
import distributed
from benchmarks.timing import measure


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batch-per-rank", type=int, default=256)
    parser.add_argument("--queue-size", type=int, default=65536)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--shuffle-bn", default="auto")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    import train
    from model import MoCo

    dist = distributed.setup_distributed("auto", 600.0)
    try:
        cfg = config_lib.replace(config_lib.Config(), data={
            "crop_size": args.crop, "batch_size_per_gpu": args.batch_per_rank, "channels_last": dist.device.type == "cuda",
        }, model={"arch": args.arch, "queue_size": args.queue_size, "shuffle_bn": args.shuffle_bn},
            optim={"precision": args.precision})
        torch.manual_seed(0)
        model = train.place_model(MoCo(cfg.model), cfg, dist)
        optimizer, amp, scaler = train.build_optimization(cfg, model, dist.device,
                                                          config_lib.learning_rate(cfg, dist.world_size))
        model.train()
        gen = torch.Generator().manual_seed(1 + dist.rank)
        shape = (args.batch_per_rank, 3, args.crop, args.crop)
        views = [torch.randn(shape, generator=gen).to(dist.device, amp or torch.float32) for _ in range(2)]
        if cfg.data.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]

        def step() -> object:
            return train.train_step(model, optimizer, scaler, views[0], views[1], cfg.model.momentum, amp, 0.0)

        tp = measure(step, items_per_call=args.batch_per_rank * dist.world_size, warmup=args.warmup,
                     iters=args.iters, repeats=args.repeats, device=dist.device)
        if dist.is_main:
            Path(args.out).write_text(json.dumps({
                "world_size": dist.world_size, "shuffle_bn": model.shuffle_bn, "device": str(dist.device),
                "pairs_per_s": tp.items_per_s.to_json(), "step_s": tp.seconds_per_call.to_json(),
            }))
    finally:
        distributed.teardown_distributed()


if __name__ == "__main__":
    main()
