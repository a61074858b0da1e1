"""MoCo pre-training: config -> distributed -> data -> model -> optimiser -> resume -> loop.

Launch:
    python train.py --shards data/shards --run-dir runs/r50 --total-samples 256000000      # one device (GPU, else CPU)
    torchrun --nproc-per-node=8 train.py --config run.yaml                                  # one node, DDP
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \
        --max-restarts=3 train.py --config run.yaml                                         # many nodes, auto-restart
    sbatch scripts/train.sbatch                                                              # Slurm (srun, one task per GPU)

Stop it at any time with SIGTERM or SIGUSR1: every rank finishes its step, a checkpoint is written, exit 0 (under
Slurm, SIGUSR1 -- the time-limit warning -- also requeues the job). Start it again with the same command:
``--resume auto`` continues exactly where it stopped. A user mistake is one line ``error: ...`` and exit code 2
before any work starts; a fault during training (a diverged loss, a full disk, too many corrupt samples, a dead
peer) is one line ``error: ...`` and exit code 1, with every checkpoint written so far left loadable.
"""

from __future__ import annotations

import sys

import cli
from config import Config
from shards.manifest import ManifestError


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, then train. Mistakes in the user's input (a bad flag, missing shards, a bad
    checkpoint path) are one line ``error: ...`` and exit code 2, not tracebacks.

    The command line is parsed before torch, DALI and W&B load (seconds): ``--help`` and a mistyped flag answer at
    once. The training code below is then imported as the module ``train``.
    """

    def run() -> None:
        cfg = cli.parse(Config, argv, description=__doc__.split("\n\n")[0], prog="train.py")
        import train  # this file's code below main(): torch, DALI and W&B load now

        train.distributed.set_torch_threads(cfg.run.torch_threads, reserved=cfg.data.num_threads)
        train.train(cfg)

    return cli.guard(run, user_errors=(ManifestError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())


# ------------------------------------------------------------------ the training code (imported after parsing)
# ruff: noqa: E402 -- the imports below follow main(), which parses the command line before torch loads.

import contextlib
import math
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import config as config_lib
import distributed
from config import ConfigError
from eval.knn import build_knn_monitor
from model import MoCo, autocast_dtype, build_optimizer, lr_at, momentum_at
from pipeline import build_train_loader
from pipeline.assignment import ShardPlan
from shards.manifest import read_manifest
from training.bad_data import BadDataLedger
from training.checkpoint import Checkpointer, CheckpointWriteError, NonFiniteState
from training.metrics import MetricsWindow, TrainingFault, check_window
from training.preemption import PreemptionHandler, requeue_slurm_job
from training.resume import load_resume_state, resolve_artifact, restore
from training.telemetry import RunLogger

# ------------------------------------------------------------------ the step


def train_step(model: MoCo, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               view_q: torch.Tensor, view_k: torch.Tensor, momentum: float, amp_dtype: torch.dtype | None,
               grad_clip: float) -> dict[str, torch.Tensor]:
    """One optimisation step. Returns device tensors only: reading them is left to the logging step (no host sync)."""
    device_type = view_q.device.type
    with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(view_q, view_k, momentum=momentum)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return {"loss": out.loss.detach(), "acc1": out.acc1.detach(), "acc5": out.acc5.detach()}


def read_log_window(window: MetricsWindow, loader, bad_data: BadDataLedger) -> dict[str, float]:
    """The window's metrics reduced over ranks (the loop's only host sync), with ``bad_samples``: the damaged
    samples of the run, each counted once over ranks and passes (``training.bad_data``).

    The metrics' all-reduce also sums the damaged items the ranks hold that the ledger lacks; the same sum on every
    rank says whether all of them exchange the items' names (a second collective) or none, so a run on sound data
    pays nothing more.
    """
    unseen = bad_data.unseen(loader.dropped_shards, loader.bad_sample_locations)
    logged = window.read(unshared_bad_items=len(unseen))
    if logged.pop("unshared_bad_items"):
        bad_data.gather(unseen)
    return {**logged, "bad_samples": bad_data.count}


def set_schedule(optimizer: torch.optim.Optimizer, step: int, total_steps: int, cfg: Config,
                 peak_lr: float) -> tuple[float, float]:
    """Set this step's learning rate on the optimiser; return (lr, key-encoder momentum)."""
    lr = lr_at(step, total_steps, cfg.optim, peak_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr, momentum_at(step, total_steps, cfg.model)


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak GPU memory allocated so far (empty on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"gpu_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}


# ------------------------------------------------------------------ model and optimizer


def place_model(model: torch.nn.Module, cfg: Config, dist: distributed.DistInfo) -> torch.nn.Module:
    """Put a MoCo model (or any module with ``wrap_query_encoder``) on this rank's device as training runs it:
    channels_last when configured, DDP over the query encoder when W > 1."""
    if dist.device.type == "cuda":
        # Fixed input sizes: cuDNN times its convolution algorithms in the first steps and keeps the fastest, as
        # the original MoCo code does. GPU runs are not bit-reproducible across runs either way.
        torch.backends.cudnn.benchmark = True
    model = model.to(dist.device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        model.wrap_query_encoder(lambda m: DistributedDataParallel(m, device_ids=device_ids))
    return model


def build_optimization(cfg: Config, model: torch.nn.Module, device: torch.device, lr: float):
    """The optimiser, the autocast dtype (None: fp32) and the grad scaler (enabled for fp16 only) of a placed model."""
    optimizer = build_optimizer(cfg.optim, model, lr)
    amp_dtype = autocast_dtype(cfg.optim.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    return optimizer, amp_dtype, scaler


def total_steps_of(cfg: Config, global_batch: int) -> int:
    if cfg.run.total_steps > 0:
        return cfg.run.total_steps
    if cfg.run.total_samples > 0:
        return math.ceil(cfg.run.total_samples / global_batch)
    raise ConfigError("set run.total_steps or run.total_samples (training is a stream, not epochs)")


# ------------------------------------------------------------------ checks before any work


def check_machine(cfg: Config) -> None:
    """User mistakes about this machine and the run directory, found before any process group or loader starts."""
    if not torch.cuda.is_available():
        if cfg.run.device == "cuda":
            raise ConfigError("run.device=cuda but no CUDA GPU is visible on this machine; use --device auto or cpu")
        if cfg.data.dali_device == "gpu":
            raise ConfigError("data.dali_device=gpu but no CUDA GPU is visible on this machine; "
                              "use --dali-device auto or cpu")
    run_dir = Path(cfg.run.run_dir)
    for path in (run_dir, run_dir / "checkpoints"):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"run.run_dir: {path} is a file, not a directory; choose another --run-dir")


def check_batch_fits(cfg: Config, world_size: int, global_batch: int) -> None:
    """Every rank must be able to fill one local batch per pass from its share of the shards."""
    # The counts only: the loader built next checks that the files exist (a second listing of the store otherwise).
    sizes = read_manifest(cfg.data.shards, check_files=False).shards.samples
    fewest = min(ShardPlan(sizes, world_size, cfg.run.seed).rank_samples(0))
    local = global_batch // world_size
    if fewest < local:
        raise ConfigError(
            f"data.batch_size={global_batch} is more than the data can fill: {int(sizes.sum())} samples in {len(sizes)} "
            f"shards give the smallest of {world_size} rank(s) {fewest} per pass, fewer than its batch of {local}; "
            "use a smaller --batch-size or more data")


# ------------------------------------------------------------------ the run


# Faults that end a run every rank agrees on (reported once, by rank 0, exit code 1).
FAULTS = (TrainingFault, NonFiniteState, CheckpointWriteError)


def train(cfg: Config) -> dict:
    """Run (or resume) pre-training as configured; returns the run summary (rank 0's numbers).

    Raises:
        ConfigError, ManifestError: a user mistake, before any work (the entry point prints ``error: ...``, exit 2).
        SystemExit: a fault during training (``error: ...``, exit 1).
    """
    check_machine(cfg)
    dist = distributed.setup_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    try:
        return _train(cfg, dist)
    except FAULTS as exc:
        raise SystemExit(f"error: {exc}" if dist.is_main else 1) from None
    except Exception as exc:  # a collective failing because a peer died is one line; anything else surfaces as is
        reason = distributed.peer_failure(exc)
        if reason is None:
            raise
        raise SystemExit(f"error: rank {dist.rank}: a collective failed ({reason}): another rank died or stopped "
                         "responding. Relaunch to resume from the last checkpoint") from None
    finally:
        distributed.teardown_distributed()


def _train(cfg: Config, dist: distributed.DistInfo) -> dict:
    # ------------------------------------------------------------------ config
    config_lib.validate(cfg, world_size=dist.world_size)
    global_batch = config_lib.global_batch(cfg, dist.world_size)
    peak_lr = config_lib.learning_rate(cfg, dist.world_size)
    total_steps = total_steps_of(cfg, global_batch)
    check_batch_fits(cfg, dist.world_size, global_batch)
    run_dir = Path(cfg.run.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resume = resolve_artifact(cfg.run.resume, config_lib.to_dict(cfg), dist)  # wandb:NAME[:ALIAS] -> its file
    resume_path, resume_state = load_resume_state(resume, ckpt_dir, config_lib.to_dict(cfg), dist.is_main)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_lib.dump_yaml(cfg))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

    # ------------------------------------------------------------------ data
    loader = build_train_loader(cfg, dist)
    bad_data = BadDataLedger(loader.manifest.root)  # what max_bad_samples counts: damage seen by any rank, once

    # ------------------------------------------------------------------ model and optimizer
    model = place_model(MoCo(cfg.model), cfg, dist)
    optimizer, amp_dtype, scaler = build_optimization(cfg, model, dist.device, peak_lr)

    # ------------------------------------------------------------------ resume
    step, pairs_seen, run_id = 0, 0, None
    if resume_state is not None:
        point = restore(resume_path, resume_state, dist, model, optimizer, scaler, loader, bad_data)
        step, pairs_seen, run_id = point.step, point.pairs_seen, point.wandb_run_id
        del resume_state
    knn = build_knn_monitor(cfg, dist) if cfg.run.knn_every else None
    logger = RunLogger(run_dir, config_lib.to_dict(cfg), total_steps, enabled=dist.is_main,
                       wandb_mode=cfg.run.wandb_mode, wandb_project=cfg.run.wandb_project,
                       wandb_entity=cfg.run.wandb_entity, run_id=run_id)
    checkpointer = Checkpointer(ckpt_dir, cfg.run.keep_checkpoints, dist, config_lib.to_dict(cfg), model, optimizer,
                                scaler, loader, run_id=logger.run_id, start_step=step if resume_path else None,
                                on_saved=logger.log_checkpoint_artifact if cfg.run.wandb_log_checkpoints else None,
                                bad_data=bad_data)
    if dist.is_main:
        print(f"world size {dist.world_size}, device {dist.device}, global batch {global_batch}, "
              f"peak lr {peak_lr:.4g}, {total_steps} steps, loader {type(loader).__name__}", flush=True)

    # ------------------------------------------------------------------ loop
    window = MetricsWindow(dist.device, pairs_per_step=global_batch)
    batches = iter(loader)
    model.train()
    if knn is not None and step == 0:  # the random-init baseline every later point is compared with
        logger.log_eval(0, {"knn_top1": knn.evaluate(model.encoder_q.backbone)}, chance=knn.chance_top1)
    # Signal handlers are restored and loader workers released however the loop ends.
    with PreemptionHandler(cfg.run.checkpoint_every_minutes) as preemption, contextlib.closing(loader):
        while step < total_steps:
            with window.waiting_for_data():
                view_q, view_k = next(batches)
            lr, momentum = set_schedule(optimizer, step, total_steps, cfg, peak_lr)
            window.add(train_step(model, optimizer, scaler, view_q, view_k, momentum, amp_dtype, cfg.optim.grad_clip))
            step += 1
            pairs_seen += global_batch
            logger.advance(step)  # the progress bar moves every step; nothing is read from the device
            if step % cfg.run.log_every == 0 or step == total_steps:
                logged = read_log_window(window, loader, bad_data)  # the loop's only host sync
                logger.log(step, {**logged, "lr": lr, "momentum": momentum, "pairs_seen": pairs_seen,
                                  **gpu_memory(dist.device)})
                logger.record_step_time(logged["step_time_s"])
                check_window(step, logged, cfg.data.max_bad_samples, checkpointer.last_path, bad_data.examples())
            if knn is not None and step % cfg.run.knn_every == 0:
                with window.paused():  # evaluation is not training time: kept out of pairs/s and step time
                    logger.log_eval(step, {"knn_top1": knn.evaluate(model.encoder_q.backbone)}, chance=knn.chance_top1)
            if cfg.run.image_log_every and step % cfg.run.image_log_every == 0:
                with window.paused():
                    logger.log_images(step, view_q, view_k)
            stop, due = preemption.poll(step)
            if stop or due or (cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0):
                checkpointer.save(step, pairs_seen)
                preemption.checkpoint_written()
            if stop:
                if dist.is_main:
                    print(f"preempted by {preemption.signal_name}: checkpoint at step {step} written, exiting",
                          flush=True)
                break
        if checkpointer.last_step != step:
            checkpointer.save(step, pairs_seen)

    # ------------------------------------------------------------------ summary
    summary = {"steps": step, "pairs_seen": pairs_seen, "world_size": dist.world_size, "global_batch": global_batch,
               "device": str(dist.device), "preempted": preemption.stop_signal is not None,
               "stop_signal": preemption.signal_name or None, "bad_samples": bad_data.count,
               "bad_shards": bad_data.shards, "wandb_run_id": logger.run_id}  # the final checkpoint's gather counted all
    if logger.history:
        summary.update(final_loss=logger.history[-1]["loss"], first_loss=logger.history[0]["loss"],
                       mean_pairs_per_s=sum(h["pairs_per_s"] for h in logger.history) / len(logger.history),
                       mean_data_wait_share=sum(h["data_wait_share"] for h in logger.history) / len(logger.history))
    summary = logger.finish(summary)
    requeued = requeue_slurm_job(preemption.stop_signal) if dist.is_main else None  # the very last action
    if requeued:
        print(requeued, file=sys.stderr if requeued.startswith("warning") else sys.stdout, flush=True)
    return summary
