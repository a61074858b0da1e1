"""Real gloo runs with 2 and 4 ranks: gather and all_to_all agree, and equal one process emulating the ranks."""

from pathlib import Path

import pytest
import torch

from model import MoCo, build_optimizer
from tests.conftest import run_torchrun
from tests.model.views import make_perms, make_views, tiny_config, tiny_encoder

WORKER = Path(__file__).with_name("dist_worker_moco.py")
GLOBAL_BATCH, STEPS, QUEUE, LR = 8, 3, 10, 0.5  # as in the worker; K=10 is not a multiple of the batch


def single_process_emulation(photo_dir, world: int):
    """One process, split shuffle-BN with one BN group per rank, the same permutations: what W ranks compute."""
    cfg = tiny_config(queue_size=QUEUE, shuffle_bn="split", split_bn_groups=world)
    torch.manual_seed(0)
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg)).double()
    opt = build_optimizer(cfg.optim, model, LR)
    views_q, views_k = make_views(photo_dir, STEPS, GLOBAL_BATCH, dtype=torch.float64)
    logits, losses = [], []
    for step, perm in enumerate(make_perms(STEPS, GLOBAL_BATCH)):
        out = model(views_q[step], views_k[step], momentum=0.9, perm=perm)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        logits.append(out.logits.detach())
        losses.append(out.loss.detach())
    return model, logits, losses


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_multi_rank_shuffle_bn(photo_dir, tmp_path, world):
    proc = run_torchrun(WORKER, nproc=world, args=[str(photo_dir), str(tmp_path)], timeout=240)
    assert proc.stdout.count("moco ok") == world
    runs = {s: [torch.load(tmp_path / f"{s}_rank{r}.pt") for r in range(world)] for s in ("gather", "all_to_all")}

    # the same permutation gives the same keys, hence identical logits and losses, whatever moves the images
    for a, b in zip(runs["gather"], runs["all_to_all"]):
        for la, lb in zip(a["logits"], b["logits"]):
            torch.testing.assert_close(la, lb, rtol=0, atol=1e-12)
        torch.testing.assert_close(a["queue"], b["queue"], rtol=0, atol=1e-12)
        torch.testing.assert_close(a["encoder_k"], b["encoder_k"], rtol=0, atol=1e-12)

    # every rank holds the same queue and pointer
    for results in runs.values():
        for other in results[1:]:
            assert torch.equal(other["queue"], results[0]["queue"]) and torch.equal(other["ptr"], results[0]["ptr"])

    # and W ranks equal one process with one BN group per rank on the concatenated batch
    model, logits, losses = single_process_emulation(photo_dir, world)
    for results in runs.values():
        for step in range(STEPS):
            torch.testing.assert_close(torch.cat([res["logits"][step] for res in results]), logits[step])
            torch.testing.assert_close(torch.stack([res["losses"][step] for res in results]).mean(), losses[step])
        torch.testing.assert_close(results[0]["queue"], model.queue.keys)
        assert results[0]["ptr"].item() == model.queue.ptr.item() == (STEPS * GLOBAL_BATCH) % QUEUE
        # weights too; BN running statistics differ by design (DDP keeps rank 0's, split BN averages groups)
        for name in ("encoder_q", "encoder_k"):
            expected = {n: t for n, t in getattr(model, name).state_dict().items() if "running" not in n and "num_batches" not in n}
            torch.testing.assert_close({n: results[0][name][n] for n in expected}, expected)
