"""GPU paths (DALI mixed decode + GPU augmentation, PyTorch backend onto CUDA); skipped without CUDA."""

import pytest
import torch

from distributed import DistInfo
from pipeline import build_train_loader
from tests.pipeline.helpers import make_cfg

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("view_decode", ["once", "roi"])
@pytest.mark.parametrize("dtype", ["auto", "float16", "float32"])
def test_dali_gpu_views(shard_dir, view_decode, dtype):
    cfg = make_cfg(shard_dir, "dali", dali_device="gpu", dtype=dtype, view_decode=view_decode)
    loader = build_train_loader(cfg, DistInfo(device=torch.device("cuda", 0)))
    want = {"auto": torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32,
            "float16": torch.float16, "float32": torch.float32}[dtype]
    for _ in range(loader.batches_per_pass + 1):
        q, k = next(loader)
        assert q.is_cuda and q.dtype == k.dtype == want and q.shape == (8, 3, 64, 64)
        assert q.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(q.float()).all() and (q.float() - k.float()).abs().mean() > 0.1
    state = loader.state_dict()
    expected = [next(loader) for _ in range(3)]
    loader.close()
    resumed = build_train_loader(cfg, DistInfo(device=torch.device("cuda", 0)))
    resumed.load_state_dict(state)
    for q1, _ in expected:
        q2, _ = next(resumed)
        assert torch.allclose(q1.float(), q2.float(), atol=0.05)  # nvJPEG + GPU kernels: allow last-bit noise
    resumed.close()


def test_pytorch_backend_onto_cuda(shard_dir):
    loader = build_train_loader(make_cfg(shard_dir, "pytorch"), DistInfo(device=torch.device("cuda", 0)))
    q, k = next(loader)
    assert q.is_cuda and q.shape == (8, 3, 64, 64) and q.is_contiguous(memory_format=torch.channels_last)
    loader.close()
