"""The training step: no host sync, mixed precision, symmetric loss, resume state, eval mode, the baseline."""

from __future__ import annotations

import contextlib

import pytest
import torch

from benchmarks.baseline import BaselineMoCo
from model import MoCo, autocast_dtype, build_optimizer
from tests.model.views import make_perms, make_views, tiny_config, tiny_encoder

SYNCING = ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__", "__index__")


@contextlib.contextmanager
def forbid_host_reads():
    """Make every tensor method that reads a value back to the host raise, and count the attempts."""
    calls: list[str] = []
    saved = {name: getattr(torch.Tensor, name) for name in SYNCING}

    def trap(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host read in the step: Tensor.{name}")
        return method

    for name in SYNCING:
        setattr(torch.Tensor, name, trap(name))
    try:
        yield calls
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("strategy", ["split", "gather", "all_to_all", "none", "sync"])
def test_no_host_sync_in_the_step(photo_dir, strategy):
    cfg = tiny_config(queue_size=10, shuffle_bn=strategy, split_bn_groups=2, symmetric=strategy == "gather")
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg))
    opt = build_optimizer(cfg.optim, model, 0.1)
    views_q, views_k = make_views(photo_dir, 2, 4)
    for step in range(2):
        with forbid_host_reads() as calls:
            out = model(views_q[step], views_k[step], momentum=0.99)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert calls == []
    assert model.queue.ptr.item() == (2 * 4 * (2 if cfg.model.symmetric else 1)) % 10
    assert out.acc1.dim() == out.acc5.dim() == 0 and 0 <= out.acc1.item() <= out.acc5.item() <= 100


@pytest.mark.parametrize("strategy", ["split", "gather", "all_to_all"])
def test_shuffled_keys_stay_channels_last(strategy):
    cfg = tiny_config(queue_size=10, shuffle_bn=strategy, split_bn_groups=2)
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg)).to(memory_format=torch.channels_last)
    seen = []
    model.encoder_k.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = [torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    model(x[0], x[1])
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()


def test_the_trap_catches_a_baseline_sync(photo_dir):
    model = BaselineMoCo(tiny_config(queue_size=8).model, encoder=tiny_encoder(tiny_config()))
    views_q, views_k = make_views(photo_dir, 1, 4)
    with pytest.raises(AssertionError, match="host read"), forbid_host_reads():
        model(views_q[0], views_k[0])  # int(ptr)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("strategy", ["split", "all_to_all", "gather"])
def test_no_cuda_sync_in_the_step(strategy):
    cfg = tiny_config(queue_size=100, shuffle_bn=strategy, split_bn_groups=2)
    model = MoCo(cfg.model).cuda().to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optim, model, 0.1)
    x = [torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last) for _ in range(2)]
    dtype = autocast_dtype("auto", "cuda")
    for step in range(3):
        if step == 2:  # after warm-up (the first steps allocate and may pick algorithms)
            torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                out = model(x[0], x[1], momentum=0.99)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item() and model.queue.keys.dtype == (dtype or torch.float32)


def test_bf16_autocast_loss_close_to_fp32(photo_dir):
    cfg = tiny_config(queue_size=64, shuffle_bn="split", split_bn_groups=2, dim=32, mlp_hidden_dim=64)
    torch.manual_seed(0)
    fp32 = MoCo(cfg.model, encoder=tiny_encoder(cfg))
    bf16 = MoCo(cfg.model, encoder=tiny_encoder(cfg))
    bf16.load_state_dict(fp32.state_dict())
    views_q, views_k = make_views(photo_dir, 1, 16)
    perm = make_perms(1, 16)[0]
    ref = fp32(views_q[0], views_k[0], perm=perm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = bf16(views_q[0], views_k[0], perm=perm)
    assert bf16.queue.keys.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    assert abs(out.loss.item() - ref.loss.item()) < 0.03 * ref.loss.item()
    cosine = (bf16.queue.keys.float() * fp32.queue.keys).sum(1)  # unit keys: bf16 keeps their direction
    assert cosine.min() > 0.99, cosine
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in bf16.encoder_q.parameters())


def test_symmetric_loss_is_both_directions(photo_dir):
    cfg = tiny_config(queue_size=12, shuffle_bn="none", symmetric=True)
    torch.manual_seed(0)
    sym = MoCo(cfg.model, encoder=tiny_encoder(cfg)).double()
    one = MoCo(tiny_config(queue_size=12, shuffle_bn="none").model, encoder=tiny_encoder(cfg)).double()
    one.load_state_dict(sym.state_dict())
    views_q, views_k = make_views(photo_dir, 1, 4, dtype=torch.float64)
    out = sym(views_q[0], views_k[0])
    one.eval()  # eval: no momentum update, no enqueue, but BN must see the batch like in training
    one.encoder_q.train()
    one.encoder_k.train()
    a, b = one(views_q[0], views_k[0]), one(views_k[0], views_q[0])
    torch.testing.assert_close(out.loss, a.loss + b.loss)
    torch.testing.assert_close(out.logits, torch.cat([a.logits, b.logits]))
    assert sym.queue.ptr.item() == 8 and one.queue.ptr.item() == 0


def test_state_dict_resumes_exactly(photo_dir):
    cfg = tiny_config(queue_size=10, shuffle_bn="split", split_bn_groups=2)
    views_q, views_k = make_views(photo_dir, 4, 4)
    torch.manual_seed(0)
    a = MoCo(cfg.model, encoder=tiny_encoder(cfg))
    for step in range(2):
        a(views_q[step], views_k[step])
    keys = set(a.state_dict())
    assert {"queue.keys", "queue.ptr", "_extra_state"} <= keys
    assert any(k.startswith("encoder_q.head.") for k in keys) and any(k.startswith("encoder_k.head.") for k in keys)
    b = MoCo(cfg.model, encoder=tiny_encoder(cfg), seed=123)
    b.load_state_dict(a.state_dict())
    for step in range(2, 4):  # same permutations drawn after the resume, so identical steps
        out_a, out_b = a(views_q[step], views_k[step]), b(views_q[step], views_k[step])
        torch.testing.assert_close(out_a.logits, out_b.logits, rtol=0, atol=0)
    assert torch.equal(a.queue.keys, b.queue.keys) and torch.equal(a.queue.ptr, b.queue.ptr)


def test_eval_mode_changes_no_state(photo_dir):
    cfg = tiny_config(queue_size=10, shuffle_bn="none")
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    views_q, views_k = make_views(photo_dir, 1, 4)
    with torch.no_grad():
        model(views_q[0], views_k[0], momentum=0.5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_split_batch_not_divisible_is_a_clear_error(photo_dir):
    cfg = tiny_config(queue_size=10, shuffle_bn="split", split_bn_groups=3)
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg))
    views_q, views_k = make_views(photo_dir, 1, 4)
    with pytest.raises(ValueError, match="batch of 4 per rank is not divisible by split_bn_groups=3"):
        model(views_q[0], views_k[0])


def test_baseline_matches_and_keeps_the_original_restriction(photo_dir):
    cfg = tiny_config(queue_size=8, shuffle_bn="none")
    torch.manual_seed(0)
    model = MoCo(cfg.model, encoder=tiny_encoder(cfg)).double()
    base = BaselineMoCo(cfg.model, encoder=tiny_encoder(cfg)).double()
    base.encoder_q.load_state_dict(model.encoder_q.state_dict())
    base.encoder_k.load_state_dict(model.encoder_k.state_dict())
    base.queue.copy_(model.queue.keys.T)
    views_q, views_k = make_views(photo_dir, 3, 4, dtype=torch.float64)
    for step in range(3):  # one process: the baseline's shuffle cannot change full-batch BN statistics
        out, ref = model(views_q[step], views_k[step], momentum=0.9), base(views_q[step], views_k[step], momentum=0.9)
        torch.testing.assert_close(out.logits, ref.logits)
        (out.loss + ref.loss).backward()
    torch.testing.assert_close(model.queue.keys, base.queue.T)
    odd = BaselineMoCo(tiny_config(queue_size=10).model, encoder=tiny_encoder(cfg))
    with pytest.raises(AssertionError):
        odd(views_q[0].float(), views_k[0].float())
