"""Scaling suite: pairs/s of the real training step on 1, 2, 4, ... GPUs of this machine, and the efficiency
``pairs/s(G) / (G x pairs/s(1))``. Needs more than one GPU; elsewhere every row is a counted skip.

Each point is a separate ``torchrun`` job of benchmarks/scaling_worker.py (DDP, all_to_all shuffle-BN, synthetic
views, ``per-rank batch`` fixed: weak scaling, as the global batch grows with the GPUs in real training).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.context import Context
from benchmarks.report import Column, SuiteResult
from benchmarks.timing import Stats
from distributed import free_port

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [
    Column("pairs_per_s", "pairs/s", "{:,.1f}"),
    Column("efficiency", "efficiency vs 1 GPU", "{:.1%}"),
    Column("step_ms", "step ms", "{:,.1f}"),
]


def gpu_counts(available: int) -> list[int]:
    """1, 2, 4, ... up to ``available``, plus ``available`` itself."""
    counts, g = [], 1
    while g < available:
        counts.append(g)
        g *= 2
    return [*counts, available] if available >= 1 else []


def run_point(nproc: int, args: list[str], out: Path, timeout: float = 1800) -> dict:
    """Run the worker on ``nproc`` ranks; return rank 0's JSON."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "benchmarks.scaling_worker", *args, "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"scaling worker on {nproc} ranks failed: {tail}")
    return json.loads(out.read_text())


def run(ctx: Context) -> SuiteResult:
    s = ctx.sizes
    gpus = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    worker_args = ["--arch", s.arch, "--crop", str(s.crop_size), "--batch-per-rank", str(s.model_batch),
                   "--queue-size", str(s.queue_sizes[-1]), "--warmup", str(s.warmup), "--iters", str(s.iters),
                   "--repeats", str(s.repeats)]
    result = SuiteResult("scaling", config={"gpus": gpus, "worker_args": worker_args, "weak_scaling": True},
                         columns=COLUMNS, plot_metric="pairs_per_s")
    if gpus < 2:
        result.skip("multi-GPU scaling", f"needs more than one GPU; this machine has {gpus}")
        return result
    base = None
    for g in gpu_counts(gpus):
        point = run_point(g, worker_args, ctx.work_dir / f"scaling-{g}.json")
        rate = Stats(**point["pairs_per_s"])
        base = base or rate.median
        result.add(f"{g} GPU{'s' if g > 1 else ''}", "scaling", {"gpus": g, "shuffle_bn": point["shuffle_bn"]},
                   pairs_per_s=rate, efficiency=rate.median / (g * base),
                   step_ms=Stats(**point["step_s"]).scaled(1e3))
    return result
