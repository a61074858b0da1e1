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
``cpu`` (``device_id=None``, CPU operators only), and ``pytorch`` (webdataset + torchvision.transforms.v2 +
DataLoader workers). A benchmark picks one explicitly with ``config.replace(cfg, data={"backend": "dali",
"dali_device": "cpu", "num_threads": 8})``. All read the recipes in :mod:`pipeline.recipes` and the shard
plan in :mod:`pipeline.assignment`.

Design choices, explained where they live: ColorJitter's random order is not replicated in DALI because
with the contrast centred on the mean luma the four jitter operations commute, so a fixed order gives the
same result up to clamping (:mod:`pipeline.dali_graph`); ranks with more samples are truncated to the
common batch count rather than short ranks padded with repeats (:mod:`pipeline.assignment`); a corrupt
sample is located by replaying the reader and excluded through a filtered copy of its index
(:mod:`pipeline.dali_loader`). DALI's shuffle buffer keeps reading across the end of a rank's shard list,
so a pass may draw a few samples of the (identical) next round of those shards before the last of this
one; the pass boundary is where the shards are re-dealt and the reader replaced (by one prepared ahead of the
boundary, so that a small corpus does not stall every few batches: :class:`pipeline.loader.TrainLoader`).

Decode once, crop twice vs ROI decode (``data.view_decode``). MoCo needs two crops of the same image. With
``once`` each JPEG is decoded fully a single time and both views are cropped from the decoded image; with
``roi`` each view calls ``decoders.image_random_crop``, which decodes only the crop window, but pays the
serial entropy (Huffman) decoding of the JPEG twice, once per view. With crop scales 0.2-1 the average
window is 60% of the image and the two windows overlap, so ROI saves little pixel work per view and, summed
over both views, decodes about 1.2 images' worth of pixels against 1.0. Measured with DALI CPU operators
(``python -m pipeline.decode_strategies SHARD_DIR``: the full v2 graph, 48 real photos of about 260 x 350 px
from the test corpus, batch 16, 2 threads, best of 5 alternating rounds, on a shared 2-core machine with a
load average near 7, so +-20% noise): 64 px views, once 545 vs roi 461 pairs/s; 224 px views, once 48.7 vs
roi 55.0 pairs/s. On the CPU neither wins beyond the noise, because decoding these small images is a
minor part of the cost next to resizing, colour and blur. We default to ``once`` for the GPU, where the
decode dominates: it keeps a single decode per image, and it keeps the A100/H100 hardware JPEG decoder in
use (older DALI releases documented that ROI decoding disables the hardware decoder; with 2.x's nvImageCodec
this is for the GPU benchmark to confirm through the ``data.view_decode`` switch).
"""

from pipeline.assignment import ShardPlan
from pipeline.loader import TrainLoader, build_train_loader, resolve_backend
from pipeline.recipes import MOCO_V1, MOCO_V2, RECIPES, Recipe

__all__ = ["MOCO_V1", "MOCO_V2", "RECIPES", "Recipe", "ShardPlan", "TrainLoader", "build_train_loader",
           "resolve_backend"]
