"""The demo's data path and verdict: held-out digits never reach the training shards; the final line states the gain."""

from __future__ import annotations

from pathlib import Path

import pytest

import demo
from eval.labelled_data import LabelledImages, eval_transform
from shards.manifest import read_manifest


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return demo.build_demo_data(tmp_path_factory.mktemp("demo-data"))


def test_training_shards_are_the_unlabelled_train_split_only(demo_data):
    shard_dir, bank, queries = demo_data
    manifest = read_manifest(shard_dir)
    assert not manifest.classes  # pre-training sees no labels
    samples = manifest.total_samples
    train, val = (LabelledImages(p, eval_transform(demo.CANVAS)) for p in (bank, queries))
    assert (len(train), len(val), train.classes) == (1297, 500, val.classes)
    assert samples == len(train)  # every training digit, and none of the 500 held out (disjoint by construction)
    held_out = {Path(s.path).stem for s in val.samples}
    assert held_out.isdisjoint(Path(s.path).stem for s in train.samples)


def test_final_line_reports_init_and_trained_knn_with_chance(demo_data, tmp_path):
    cfg = demo.demo_config(*demo_data, tmp_path, steps=300, seed=0)
    assert (cfg.run.knn_every, cfg.run.knn_train, cfg.data.recipe) == (300, str(demo_data[1]), "v1")
    summary = {"first_loss": 4.1, "final_loss": 3.2, "eval": {"knn_top1": {
        "first_step": 0, "first": 30.0, "last_step": 300, "last": 41.5, "gain": 11.5, "chance": 10.0}}}
    line = demo.final_line(summary, cfg, tmp_path)
    assert line.startswith("kNN top-1 on 500 held-out digits: 30.0% at random init -> 41.5% after 300 steps "
                           "(+11.5 points, a gain over random init; chance 10%); loss 4.10 -> 3.20 (chance ln(K+1) = "
                           "4.17)")
    # 2 standard errors of a 30 % top-1 over 500 queries: 4.1 points.
    summary["eval"]["knn_top1"].update(last=32.0, gain=2.0)
    assert "(+2.0 points, no clear gain: within the +-4.1-point noise" in demo.final_line(summary, cfg, tmp_path)
    summary["eval"]["knn_top1"].update(last=25.0, gain=-5.0)
    assert "(-5.0 points, below random init" in demo.final_line(summary, cfg, tmp_path)
