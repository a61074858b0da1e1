"""Run under torchrun by tests/model/test_distributed_moco.py: MoCo steps with gather and all_to_all shuffle-BN.

Args: PHOTO_DIR OUT_DIR. Every rank saves its logits, losses, queue and key weights per strategy to OUT_DIR.
"""

import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import distributed
from model import MoCo, build_optimizer
from tests.model.views import make_perms, make_views, tiny_config, tiny_encoder

GLOBAL_BATCH, STEPS, QUEUE, LR = 8, 3, 10, 0.5

photo_dir, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
info = distributed.setup_distributed("cpu", timeout_s=120)
r, w = info.rank, info.world_size
batch = GLOBAL_BATCH // w
views_q, views_k = make_views(photo_dir, STEPS, GLOBAL_BATCH, dtype=torch.float64)
perms = make_perms(STEPS, GLOBAL_BATCH)

for strategy in ("gather", "all_to_all"):
    cfg = tiny_config(queue_size=QUEUE, shuffle_bn=strategy)
    torch.manual_seed(0)
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg)).double()
    # all_to_all also runs channels_last (its exchange keeps the layout), gather the default layout
    layout = torch.channels_last if strategy == "all_to_all" else torch.contiguous_format
    model.to(memory_format=layout)
    model.wrap_query_encoder(lambda m: DDP(m))
    opt = build_optimizer(cfg.optim, model, LR)
    logits, losses = [], []
    for step in range(STEPS):
        rows = slice(r * batch, (r + 1) * batch)
        view_q, view_k = (v[step][rows].contiguous(memory_format=layout) for v in (views_q, views_k))
        out = model(view_q, view_k, momentum=0.9, perm=perms[step])
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        logits.append(out.logits.detach())
        losses.append(out.loss.detach())
    torch.save({"logits": logits, "losses": losses, "queue": model.queue.keys, "ptr": model.queue.ptr,
                "encoder_k": model.encoder_k.state_dict(), "encoder_q": model.encoder_q.state_dict()},
               out_dir / f"{strategy}_rank{r}.pt")
print(f"rank {r}: moco ok", flush=True)
distributed.teardown_distributed()
