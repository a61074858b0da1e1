"""``--compile``: the compiled step computes the eager step, in two graphs with no graph break or recompile.

On the CPU, torch.compile runs with the ``aot_eager`` backend: Dynamo's graph capture (graph breaks, guards,
recompiles) and AOTAutograd (the backward graph and the in-place buffer writes of the BN layers) are what our code
can get wrong, and they take seconds; inductor's C++ code generation would add ~45 s per cold CI run and proves
nothing about the Triton kernels a GPU uses. On a GPU the same test runs with the default backend (inductor).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

import config
from model import MoCo, build_optimizer
from tests.model.views import make_perms, make_views, tiny_config, tiny_encoder

DEVICES = [
    pytest.param("cpu", "aot_eager", id="cpu-aot_eager"),
    pytest.param("cuda", "inductor", id="cuda-inductor", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


@pytest.mark.parametrize(("device", "backend"), DEVICES)
@pytest.mark.parametrize("strategy", ["split", "gather"])
def test_compiled_step_matches_eager(photo_dir, monkeypatch, device, backend, strategy):
    """Split shuffle-BN (the one-device default) is the case with buffer writes inside the compiled graph:
    SplitBatchNorm2d updates per-group running statistics and ``num_batches_tracked`` in place."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=backend))
    cfg = tiny_config(queue_size=10, shuffle_bn=strategy, split_bn_groups=2)
    torch.manual_seed(0)
    encoder = tiny_encoder(cfg)
    eager = MoCo(cfg.model, encoder=copy.deepcopy(encoder)).to(device)
    compiled = MoCo(config.replace(cfg, model={"compile": True}).model, encoder=copy.deepcopy(encoder)).to(device)
    compiled.load_state_dict(eager.state_dict())
    runs = [(m, build_optimizer(cfg.optim, m, 0.1)) for m in (eager, compiled)]
    views_q, views_k = (v.to(device) for v in make_views(photo_dir, 3, 4))
    perms = make_perms(3, 4)

    torch._dynamo.reset()
    counters.clear()
    for step in range(3):
        losses = []
        for model, optimizer in runs:  # the momentum changes every step: a Python float, no recompile
            out = model(views_q[step], views_k[step], momentum=0.9 + 0.03 * step, perm=perms[step])
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(out.loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)

    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 2  # query forward (+ its backward) and key forward, once each
    want = eager.state_dict()
    for name, value in compiled.state_dict().items():
        if isinstance(value, torch.Tensor):  # both encoders, BN running statistics, queue and pointer
            torch.testing.assert_close(value, want[name], rtol=1e-3, atol=1e-4, msg=name)
    assert compiled.encoder_q.backbone[1].num_batches_tracked.item() == 3
