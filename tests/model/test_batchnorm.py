"""SplitBatchNorm2d against per-chunk BatchNorm2d: outputs, gradients, running statistics, layouts, errors."""

import copy

import pytest
import torch
import torch.nn as nn

from model.batchnorm import SplitBatchNorm2d, convert_split_bn


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_batchnorm_per_chunk(groups, channels_last):
    torch.manual_seed(groups)
    plain = nn.BatchNorm2d(5).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 1.5)
        plain.bias.uniform_(-1, 1)
    split = convert_split_bn(copy.deepcopy(plain), groups)
    assert isinstance(split, SplitBatchNorm2d) and split.groups == groups
    x = torch.randn(8, 5, 3, 3, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = split(xs)
    copies = [copy.deepcopy(plain) for _ in range(groups)]
    ref = torch.cat([bn(chunk) for bn, chunk in zip(copies, xr.chunk(groups))])
    torch.testing.assert_close(out, ref)
    weights = torch.randn_like(ref)
    (out * weights).sum().backward()
    (ref * weights).sum().backward()
    torch.testing.assert_close(xs.grad, xr.grad)
    torch.testing.assert_close(split.weight.grad, sum(bn.weight.grad for bn in copies))
    # running statistics: the mean over groups of each group's ordinary update
    torch.testing.assert_close(split.running_mean, torch.stack([bn.running_mean for bn in copies]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([bn.running_var for bn in copies]).mean(0))
    assert split.num_batches_tracked.item() == 1
    split.eval()
    plain.load_state_dict(split.state_dict())
    plain.eval()
    torch.testing.assert_close(split(x), plain(x))


def test_indivisible_batch_is_a_clear_error():
    split = SplitBatchNorm2d(3, groups=4)
    with pytest.raises(ValueError, match="not divisible by split_bn_groups=4"):
        split(torch.randn(6, 3, 2, 2))


def test_convert_keeps_state_dict_keys():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    keys = list(net.state_dict())
    convert_split_bn(net, 2)
    assert list(net.state_dict()) == keys
    assert sum(isinstance(m, SplitBatchNorm2d) for m in net.modules()) == 2
