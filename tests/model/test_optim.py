"""Optimiser, LR and momentum schedules, momentum update and precision choice against plain formulas."""

import math

import pytest
import torch
import torch.nn as nn

import config
from model import LARS, MoCo, autocast_dtype, build_optimizer, lr_at, momentum_at, momentum_update
from tests.model.views import tiny_config, tiny_encoder


def optim_cfg(**kw):
    return config.replace(config.Config(), optim=kw).optim


def test_cosine_schedule_with_warmup():
    cfg = optim_cfg(schedule="cosine", warmup_steps=10)
    assert lr_at(0, 110, cfg, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 110, cfg, 1.0) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg, 1.0) == pytest.approx(0.5)
    assert lr_at(85, 110, cfg, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.75)))
    assert lr_at(110, 110, cfg, 1.0) == pytest.approx(0.0)


def test_step_and_constant_schedules():
    cfg = optim_cfg(schedule="step", milestones=[0.6, 0.8])
    assert [lr_at(s, 200, cfg, 0.03) for s in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
    assert lr_at(5, 0, optim_cfg(schedule="constant"), 0.5) == 0.5
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(5, 0, cfg, 0.5)


def test_momentum_schedules():
    m = tiny_config(momentum=0.99).model
    assert momentum_at(50, 100, m) == 0.99
    cos = tiny_config(momentum=0.99, momentum_schedule="cosine").model
    assert momentum_at(0, 100, cos) == pytest.approx(0.99)
    assert momentum_at(50, 100, cos) == pytest.approx(0.995)
    assert momentum_at(100, 100, cos) == pytest.approx(1.0)


def test_momentum_update_equals_the_paper_formula():
    torch.manual_seed(0)
    k = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 2, 3, 3, dtype=torch.float64)]
    q = [torch.randn_like(t) for t in k]
    expected = [0.9 * a + 0.1 * b for a, b in zip(k, q)]
    momentum_update(k, q, 0.9)
    for a, b in zip(k, expected):
        torch.testing.assert_close(a, b)


def test_sgd_covers_only_the_query_encoder():
    cfg = tiny_config()
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg))
    opt = build_optimizer(cfg.optim, model, 0.1)
    assert isinstance(opt, torch.optim.SGD)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert params == {id(p) for p in model.encoder_q.parameters()}
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 1e-4
    assert isinstance(build_optimizer(optim_cfg(optimizer="lars"), model, 0.1), LARS)


def test_lars_step_against_a_plain_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ref = [p.detach().clone() for p in net.parameters()]
    opt = LARS(net.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    bufs = [None] * len(ref)
    for _ in range(2):
        net.zero_grad()
        net(torch.randn(8, 4)).pow(2).sum().backward()
        grads = [p.grad.clone() for p in net.parameters()]
        opt.step()
        for i, (w, g) in enumerate(zip(ref, grads)):
            if w.ndim > 1:
                g = g + 0.01 * w
                g = g * (0.02 * w.norm() / g.norm())
            bufs[i] = g if bufs[i] is None else 0.9 * bufs[i] + g
            ref[i] = w - 0.5 * bufs[i]
        for w, p in zip(ref, net.parameters()):
            torch.testing.assert_close(p.detach(), w)


def test_autocast_dtype():
    assert autocast_dtype("fp32", "cuda") is None
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("fp16", "cuda") is torch.float16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("int8", "cpu")
