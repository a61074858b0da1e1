"""Weighted kNN against a plain reference, on separable features, and the monitor end to end on real digits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import config as config_lib
from distributed import DistInfo
from eval.knn import KnnMonitor, build_knn_monitor, knn_predict
from eval.labelled_data import LabelledImages, LabelledSetError, eval_transform
from tests.conftest import run_torchrun

HERE = Path(__file__).resolve().parent


def reference_knn_scores(query, bank, labels, num_classes, k, t):
    """InstDisc sec. 3.4 written out: per query, the k most similar bank rows vote exp(sim / t) for their class."""
    scores = torch.zeros(query.shape[0], num_classes)
    for i, q in enumerate(query):
        sims = [(float(q @ b), int(c)) for b, c in zip(bank, labels)]
        sims.sort(key=lambda sc: -sc[0])
        for sim, c in sims[:k]:
            scores[i, c] += math.exp(sim / t)
    return scores


@pytest.mark.parametrize("n,b,d,c,k", [(50, 7, 16, 3, 5), (120, 10, 32, 10, 200), (30, 4, 8, 2, 1)])
def test_knn_predict_matches_reference(n, b, d, c, k):
    g = torch.Generator().manual_seed(n)
    bank = F.normalize(torch.randn(n, d, generator=g), dim=1)
    query = F.normalize(torch.randn(b, d, generator=g), dim=1)
    labels = torch.randint(0, c, (n,), generator=g)
    got = knn_predict(query, bank, labels, c, k=k, t=0.1)
    torch.testing.assert_close(got, reference_knn_scores(query, bank, labels, c, k, 0.1), rtol=1e-4, atol=1e-6)


def test_knn_on_separable_features_is_exact():
    """Features = class centre + small noise: every query's neighbours share its class, so top-1 is 100%."""
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(10, 64, generator=g), dim=1)
    bank_labels = torch.arange(10).repeat_interleave(30)
    query_labels = torch.arange(10).repeat_interleave(7)
    bank = F.normalize(centres[bank_labels] + 0.05 * torch.randn(300, 64, generator=g), dim=1)
    query = F.normalize(centres[query_labels] + 0.05 * torch.randn(70, 64, generator=g), dim=1)
    pred = knn_predict(query, bank, bank_labels, 10, k=20, t=0.1).argmax(1)
    assert torch.equal(pred, query_labels)
    # Shuffling the bank's labels destroys the signal: accuracy falls to about chance.
    shuffled = bank_labels[torch.randperm(300, generator=g)]
    assert (knn_predict(query, bank, shuffled, 10, k=20, t=0.1).argmax(1) == query_labels).float().mean() < 0.4


def test_weights_favour_close_neighbours():
    """One very close neighbour of class 1 outvotes two distant ones of class 0 (a plain majority would not)."""
    bank = F.normalize(torch.tensor([[1.0, 0.02], [0.2, 1.0], [0.3, 1.0]]), dim=1)
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(query, bank, torch.tensor([1, 0, 0]), 2, k=3, t=0.1)
    assert scores.argmax(1).item() == 1
    assert knn_predict(query, bank, torch.tensor([1, 0, 0]), 2, k=3, t=100.0).argmax(1).item() == 0  # ~uniform votes


def small_backbone(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()
    return net


def test_monitor_end_to_end_on_digits(digits_folders, digits_shards):
    """Reference set as an image folder, queries as labelled shards: runs, sees every image, restores train mode."""
    transform = eval_transform(32)
    reference = LabelledImages(digits_folders["train"], transform)
    queries = LabelledImages(digits_shards, transform)
    assert (len(reference), len(queries), reference.classes) == (300, 100, [f"digit{c}" for c in range(10)])
    backbone = small_backbone().train()
    monitor = KnnMonitor(reference, queries, k=20, t=0.1, batch_size=64)
    top1 = monitor.evaluate(backbone)
    assert backbone.training  # mode restored
    assert monitor.last.num_queries == 100 and monitor.last.num_reference == 300 and monitor.last.bad_samples == 0
    # Even random ResNet features of digits carry class information (pixels are informative); far above 10% chance.
    assert monitor.chance_top1 == 10.0  # 10 queries per class: a constant guess gets 10 %
    assert 30.0 < top1 <= 100.0
    # The monitor's number is the plain kNN computed by hand from the same features.
    with torch.no_grad():
        backbone.eval()
        feats = [F.normalize(backbone(torch.stack([ds[i][0] for i in range(len(ds))])), dim=1)
                 for ds in (reference, queries)]
    pred = knn_predict(feats[1], feats[0], reference.targets, 10, k=20, t=0.1).argmax(1)
    assert top1 == 100.0 * (pred == queries.targets).sum().item() / len(queries)


def test_build_knn_monitor_from_config(digits_folders, digits_shards):
    cfg = config_lib.replace(config_lib.Config(), data={"crop_size": 32, "batch_size": 50},
                             run={"knn_every": 10, "knn_train": str(digits_folders["train"]),
                                  "knn_val": str(digits_shards), "knn_k": 10})
    monitor = build_knn_monitor(cfg, DistInfo())
    assert (monitor.k, monitor.t, monitor.batch_size) == (10, 0.1, 50)
    assert 0.0 <= monitor.evaluate(small_backbone()) <= 100.0


def test_bad_labelled_sets_fail_in_one_line(tmp_path, shard_dir, digits_folders):
    transform = eval_transform(32)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    cases = {
        tmp_path / "missing": "not found",
        tmp_path / "empty": "empty",
        shard_dir: "has no classes",  # unlabelled shards (the pre-training corpus)
    }
    for path, message in cases.items():
        with pytest.raises(LabelledSetError, match=message) as info:
            LabelledImages(path, transform)
        assert "\n" not in str(info.value)
    a = LabelledImages(digits_folders["train"], transform)
    (tmp_path / "other" / "x").mkdir(parents=True)
    (tmp_path / "other" / "x" / "a.png").write_bytes(next(digits_folders["train"].rglob("*.png")).read_bytes())
    with pytest.raises(ValueError, match="disagree on classes"):
        KnnMonitor(a, LabelledImages(tmp_path / "other", transform))


def test_corrupt_image_is_a_counted_skip(tmp_path, digits_folders):
    root = tmp_path / "set"
    for folder in digits_folders["val"].iterdir():
        (root / folder.name).mkdir(parents=True)
        for f in sorted(folder.iterdir())[:3]:
            (root / folder.name / f.name).write_bytes(f.read_bytes())
    (root / "digit3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    transform = eval_transform(32)
    monitor = KnnMonitor(LabelledImages(root, transform), LabelledImages(root, transform), k=5, batch_size=8)
    assert monitor.evaluate(small_backbone()) > 0
    assert monitor.last.bad_samples == 2 and monitor.last.num_queries == 30  # counted in both sets


@pytest.mark.slow
def test_monitor_under_torchrun_matches_single_process(tmp_path, digits_folders, digits_shards):
    """Two gloo ranks (reference 300 and queries 100 split unevenly is fine) give exactly the one-process number."""
    out = tmp_path / "knn.json"
    run_torchrun(HERE / "dist_worker_knn.py", 2, [str(digits_folders["train"]), str(digits_shards), str(out)])
    result = json.loads(out.read_text())
    transform = eval_transform(32)
    monitor = KnnMonitor(LabelledImages(digits_folders["train"], transform), LabelledImages(digits_shards, transform),
                         k=20, t=0.1, batch_size=32)
    expected = monitor.evaluate(small_backbone())
    assert result["ranks"] == [expected, expected]
    assert result["num_reference"] == 300 and result["num_queries"] == 100
