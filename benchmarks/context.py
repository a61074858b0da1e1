"""What every suite receives: the run options, the device, the sizes for full or ``--quick`` runs, shared data."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.profiling import profiled


@dataclass(frozen=True)
class Sizes:
    """How big and how long each suite runs. ``full`` is what the README's GPU numbers use; ``quick`` fits 2 CPU cores."""

    # data
    corpus_images: int
    short_side: tuple[int, int]
    images_per_shard: int
    # model suite
    arch: str
    crop_size: int
    model_batch: int
    queue_sizes: tuple[int, ...]
    # pipeline suite
    pipeline_batches: tuple[int, ...]
    pipeline_threads: tuple[int, ...]
    pipeline_crop: int
    pipeline_warmup: int
    pipeline_window: int  # batches timed as one (loaders deliver in bursts)
    pipeline_windows: int  # timed windows per configuration
    boundary_budget_s: float  # pipeline: keep timing (up to this long) until a window crosses a pass boundary
    # e2e suite
    e2e_batch: int
    e2e_steps: int  # timed steps per repeat
    e2e_repeats: int
    # timing
    warmup: int
    iters: int
    repeats: int
    # shards suite
    ingest_images: int

    @classmethod
    def full(cls, cores: int) -> Sizes:
        """ResNet-50 at 224 px, batch 256; a corpus of 108 batches of 256 per pass (27,648 photos, 108 shards)."""
        # 1-2 workers at 224 px take minutes per configuration for the PyTorch loaders; start at 4.
        threads = tuple(sorted({t for t in (4, 8, cores) if t <= max(cores, 1)})) or (max(cores, 1),)
        return cls(corpus_images=27648, short_side=(360, 400), images_per_shard=256, arch="resnet50", crop_size=224,
                   model_batch=256, queue_sizes=(4096, 65536), pipeline_batches=(128, 256), pipeline_threads=threads,
                   pipeline_crop=224, pipeline_warmup=10, pipeline_window=10, pipeline_windows=4,
                   boundary_budget_s=10.0, e2e_batch=256, e2e_steps=20, e2e_repeats=3, warmup=10, iters=10, repeats=5,
                   ingest_images=512)

    @classmethod
    def quick(cls, cores: int) -> Sizes:
        """A smoke run on 2 CPU cores: ResNet-18 at 32 px; 192 photos, 24 batches of 8 per pass (12 of 16 in e2e)."""
        threads = tuple(sorted({1, max(min(cores, 2), 1)}))
        return cls(corpus_images=192, short_side=(360, 400), images_per_shard=16, arch="resnet18", crop_size=32,
                   model_batch=16, queue_sizes=(256,), pipeline_batches=(8,), pipeline_threads=threads,
                   pipeline_crop=64, pipeline_warmup=6, pipeline_window=4, pipeline_windows=5, boundary_budget_s=0.0,
                   e2e_batch=16, e2e_steps=4, e2e_repeats=3, warmup=1, iters=1, repeats=3, ingest_images=64)


@dataclass
class Context:
    """Options and shared state of one ``python -m benchmarks run`` invocation."""

    out_dir: Path
    quick: bool
    device: torch.device
    sizes: Sizes
    profile: bool = False
    machine: dict = field(default_factory=dict)
    shard_dir: Path | None = None  # built once (or given by --shards), shared by the pipeline and e2e suites
    corpus_dir: Path | None = None  # --corpus: a folder of real images to use instead of the embedded photos
    only: str = ""  # --only: regular expression; the model, pipeline and e2e suites measure only what it matches

    def selects(self, name: str) -> bool:
        """Whether ``--only`` (if given) lets the configuration called ``name`` be measured."""
        return not self.only or re.search(self.only, name) is not None

    @property
    def work_dir(self) -> Path:
        return self.out_dir / "_data"

    def profiler(self, name: str) -> contextlib.AbstractContextManager:
        """A torch.profiler region when ``--profile`` is on, else a no-op."""
        return profiled(name, self.out_dir / "profiles" if self.profile else None)
