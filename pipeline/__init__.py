"""Shards -> two augmented views per image (MoCo query and key), behind one interface for every backend.

Interface (train.py and the benchmarks use only this)::

    from pipeline import build_train_loader, RECIPES
    loader = build_train_loader(cfg, dist)  # backend from cfg.data.backend (+ data.dali_device, data.num_threads)
    loader.local_batch_size                 # global_batch(cfg, world) // world
    loader.batches_per_pass                 # the same on every rank, the same every pass
    for view_q, view_k in loader:           # endless; N_local x 3 x S x S on dist.device in the training dtype
        ...                                 # (data.dtype; auto: bf16/fp16 per optim.precision on CUDA, fp32 on CPU),
                                            # channels_last when data.channels_last
    state = loader.state_dict()             # plain types + tensors: torch.load(weights_only=True) reads it
    loader.load_state_dict(state)           # the resumed stream is bit-identical to the uninterrupted one
    loader.bad_samples                      # corrupt samples skipped so far; loader.bad_sample_locations lists
                                            # them as "<tar>:<offset>:<member>"
    loader.close()

Backends: ``dali`` with ``data.dali_device=gpu`` (nvJPEG / hardware decoder, augmentation on the GPU) or
``cpu`` (``device_id=None``, CPU operators only), and ``pytorch`` (tar reading at the index offsets +
torchvision.transforms.v2 + DataLoader workers). A benchmark picks one explicitly with
``config.replace(cfg, data={"backend": "dali", "dali_device": "cpu", "num_threads": 8})``. All read the recipes
in :mod:`pipeline.recipes` and the shard plan in :mod:`pipeline.assignment`.

Design choices, explained where they live: ColorJitter's random order is not replicated in DALI because
with the contrast centred on the mean luma the four jitter operations commute, so a fixed order gives the
same result up to clamping (:mod:`pipeline.dali_graph`); ranks with more samples are truncated to the
common batch count rather than short ranks padded with repeats (:mod:`pipeline.assignment`); a corrupt
sample is located by replaying the reader and excluded through a filtered copy of its index
(:mod:`pipeline.dali_loader`); a damaged shard (truncated, 0 bytes, unusable index) is found by a cheap check
(:mod:`shards.check`) when the reader of a window holding it is prepared, before that reader opens it, and its
lost samples or the whole shard are left out, counted and named (:mod:`pipeline.shard_check`). DALI's shuffle
buffer keeps reading across the end of a rank's shard list, so a pass may draw a few samples of the (identical)
next round of those shards before the last of this one; the pass boundary is where the shards are re-dealt and
the reader replaced (by one prepared ahead of the boundary, so that a small corpus does not stall every few
batches: :class:`pipeline.base.TrainLoader`).

``data.view_decode``: ``once`` (default) decodes each JPEG once and crops both views from it; ``roi`` decodes
only each view's crop window, paying the entropy decoding twice. ``benchmarks/decode_strategies.py`` measures both
and explains the default.
"""

from pipeline.assignment import ShardPlan
from pipeline.base import TrainLoader
from pipeline.loader import build_train_loader, resolve_backend
from pipeline.recipes import MOCO_V1, MOCO_V2, RECIPES, Recipe

__all__ = ["MOCO_V1", "MOCO_V2", "RECIPES", "Recipe", "ShardPlan", "TrainLoader", "build_train_loader",
           "resolve_backend"]
