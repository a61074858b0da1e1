"""MoCo against the paper's Algorithm 1 in fp64: logits, loss, query gradients, key weights and the queue."""

from __future__ import annotations

import pytest
import torch

from model import MoCo, build_encoder, build_optimizer, momentum_update
from tests.model.reference import ReferenceMoCo
from tests.model.views import make_perms, make_views, tiny_config, tiny_encoder

STEPS = 3
LR = 0.5  # large so that three steps move the weights visibly


def test_resnet18_matches_paper_pseudocode(photo_dir):
    """The torchvision path once, at float32 tolerance (the fp64 cases below use a small conv encoder)."""
    cfg = tiny_config(queue_size=10, shuffle_bn="split", split_bn_groups=2)
    torch.manual_seed(0)
    model = MoCo(cfg.model)
    plain_q = build_encoder(cfg.model.arch, cfg.model.head, cfg.model.dim, cfg.model.mlp_hidden_dim)
    plain_q.load_state_dict(model.encoder_q.state_dict())
    ref = ReferenceMoCo(plain_q, model.queue.keys, cfg.model.temperature, groups=2)
    views_q, views_k = make_views(photo_dir, 1, 8)  # 4 samples per BN group: fewer makes fp32 BN ill-conditioned
    for step, perm in enumerate(make_perms(1, 8)):
        out = model(views_q[step], views_k[step], momentum=0.9, perm=perm)
        expected = ref.step(views_q[step], views_k[step], perm, 0.9, 0.0, 0.0, 0.0)
        torch.testing.assert_close(out.logits, expected["logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.queue.keys, ref.queue, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy,queue_size,batch", [
    ("none", 16, 4),  # K a multiple of the batch
    ("none", 10, 4),  # K not a multiple: the third write wraps around mid-batch
    ("split", 6, 8),  # batch larger than K, two BN groups
    ("split", 13, 6),
    ("gather", 9, 4),  # one rank: a shuffle of the whole batch
    ("all_to_all", 11, 4),
])
def test_matches_paper_pseudocode(photo_dir, strategy, queue_size, batch):
    cfg = tiny_config(queue_size=queue_size, shuffle_bn=strategy, split_bn_groups=2)
    torch.manual_seed(0)
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg)).double()
    opt = build_optimizer(cfg.optim, model, LR)
    plain_q = tiny_encoder(cfg).double()
    plain_q.load_state_dict(model.encoder_q.state_dict())
    groups = cfg.model.split_bn_groups if strategy == "split" else 1
    ref = ReferenceMoCo(plain_q, model.queue.keys, cfg.model.temperature, groups)

    views_q, views_k = make_views(photo_dir, STEPS, batch, dtype=torch.float64)
    perms = make_perms(STEPS, batch)
    m = cfg.model.momentum
    for step in range(STEPS):
        perm = None if strategy == "none" else perms[step]
        out = model(views_q[step], views_k[step], momentum=m, perm=perm)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        expected = ref.step(views_q[step], views_k[step], perm, m, LR, cfg.optim.weight_decay, cfg.optim.sgd_momentum)
        torch.testing.assert_close(out.logits, expected["logits"], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(out.loss, expected["loss"], rtol=1e-9, atol=1e-9)
        for name, p in model.encoder_q.named_parameters():
            torch.testing.assert_close(p.grad, expected["grads"][name], rtol=1e-7, atol=1e-9, msg=name)
        opt.step()

    # The reference updates f_k after the SGD step; MoCo does it before the next key forward: apply it once more.
    momentum_update(list(model.encoder_k.parameters()), list(model.encoder_q.parameters()), m)
    for (name, pk), pr in zip(model.encoder_k.named_parameters(), ref.f_k.parameters()):
        torch.testing.assert_close(pk, pr, rtol=1e-7, atol=1e-9, msg=name)
    assert not torch.equal(model.encoder_k.head.layers[0].weight, model.encoder_q.head.layers[0].weight)
    torch.testing.assert_close(model.queue.keys, ref.queue, rtol=1e-9, atol=1e-9)
    assert model.queue.ptr.item() == ref.ptr == (STEPS * batch) % queue_size
