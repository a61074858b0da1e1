"""MoCo pre-training: config -> distributed -> data -> model -> optimiser -> resume -> loop.

Launch:
    python train.py --shards data/shards --run-dir runs/r50 --total-samples 256000000      # one device (GPU, else CPU)
    torchrun --nproc-per-node=8 train.py --config run.yaml                                  # one node, DDP
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 \
        --max-restarts=3 train.py --config run.yaml                                         # many nodes, auto-restart
    sbatch scripts/train.sbatch                                                              # Slurm (srun, one task per GPU)

Stop it at any time with SIGTERM or SIGUSR1: every rank finishes its step, a checkpoint is written, exit 0.
Start it again with the same command: ``--resume auto`` continues exactly where it stopped.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

import config as config_lib
import distributed
from config import Config
from eval.knn import build_knn_monitor
from model import MoCo, autocast_dtype, build_optimizer, lr_at, momentum_at
from pipeline import build_train_loader
from shards.manifest import ManifestError
from training.checkpoint import capture_rng_state, find_resume_checkpoint, restore_rng_state, save_checkpoint
from training.preemption import PreemptionHandler
from training.telemetry import RunLogger


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


def build_model_and_optimizer(cfg: Config, dist: distributed.DistInfo, lr: float, model_cls: type = MoCo):
    """The MoCo model on its device (DDP over the query encoder when W > 1), optimiser, autocast dtype, grad scaler.

    Benchmarks call this too, with ``model_cls=BaselineMoCo`` for the original structure.
    """
    if dist.device.type == "cuda":
        # Fixed input sizes: cuDNN times its convolution algorithms in the first steps and keeps the fastest, as
        # the original MoCo code does. GPU runs are not bit-reproducible across runs either way.
        torch.backends.cudnn.benchmark = True
    model = model_cls(cfg.model).to(dist.device)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        model.wrap_query_encoder(lambda m: DistributedDataParallel(m, device_ids=device_ids))
    optimizer = build_optimizer(cfg.optim, model, lr)
    amp_dtype = autocast_dtype(cfg.optim.precision, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    return model, optimizer, amp_dtype, scaler


def total_steps_of(cfg: Config, global_batch: int) -> int:
    if cfg.run.total_steps > 0:
        return cfg.run.total_steps
    if cfg.run.total_samples > 0:
        return math.ceil(cfg.run.total_samples / global_batch)
    raise config_lib.ConfigError("set run.total_steps or run.total_samples (training is a stream, not epochs)")


def train(cfg: Config) -> dict:
    """Run (or resume) pre-training as configured; returns the run summary (rank 0's numbers)."""
    # ------------------------------------------------------------------ distributed
    dist = distributed.setup_distributed(cfg.run.device, cfg.run.dist_timeout_s)
    try:
        return _train(cfg, dist)
    except torch.distributed.DistBackendError as exc:
        raise SystemExit(f"rank {dist.rank}: a collective failed ({str(exc).splitlines()[0]}); "
                         "another rank probably died. Restart to resume from the last checkpoint.") from None
    finally:
        distributed.teardown_distributed()


def _train(cfg: Config, dist: distributed.DistInfo) -> dict:
    config_lib.validate(cfg, world_size=dist.world_size)
    global_batch = config_lib.global_batch(cfg, dist.world_size)
    peak_lr = config_lib.learning_rate(cfg, dist.world_size)
    total_steps = total_steps_of(cfg, global_batch)
    run_dir = Path(cfg.run.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_lib.dump_yaml(cfg))
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank

    # ------------------------------------------------------------------ data
    loader = build_train_loader(cfg, dist)

    # ------------------------------------------------------------------ model and optimizer
    model, optimizer, amp_dtype, scaler = build_model_and_optimizer(cfg, dist, peak_lr)

    # ------------------------------------------------------------------ resume
    step, pairs_seen, run_id = 0, 0, None
    ckpt_path, state = find_resume_checkpoint(cfg.run.resume, ckpt_dir)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, pairs_seen, run_id = state["step"], state["pairs_seen"], state.get("wandb_run_id")
        if len(state["loader"]) == dist.world_size:
            loader.load_state_dict(state["loader"][dist.rank])
            restore_rng_state(state["rng"][dist.rank], dist.device)
        else:
            print(f"warning: checkpoint was written by {len(state['loader'])} ranks, this run has {dist.world_size}: "
                  "data order restarts (not an exact resume)", file=sys.stderr)
        if dist.is_main:
            print(f"resumed from {ckpt_path} at step {step} ({pairs_seen} pairs seen)", flush=True)
        del state

    knn = build_knn_monitor(cfg, dist) if cfg.run.knn_every else None
    logger = RunLogger(run_dir, config_lib.to_dict(cfg), total_steps, enabled=dist.is_main,
                       wandb_mode=cfg.run.wandb_mode, wandb_project=cfg.run.wandb_project,
                       wandb_entity=cfg.run.wandb_entity, run_id=run_id)
    if dist.is_main:
        print(f"world size {dist.world_size}, device {dist.device}, global batch {global_batch}, "
              f"peak lr {peak_lr:.4g}, {total_steps} steps, loader {type(loader).__name__}", flush=True)

    def write_checkpoint() -> None:
        # Every rank contributes its loader position and RNG state; rank 0 writes one file.
        loader_states = distributed.all_gather_object(loader.state_dict())
        rng_states = distributed.all_gather_object(capture_rng_state(dist.device))
        if dist.is_main:
            path = save_checkpoint({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "pairs_seen": pairs_seen, "loader": loader_states, "rng": rng_states,
                "config": config_lib.to_dict(cfg), "wandb_run_id": logger.run_id, "world_size": dist.world_size,
            }, ckpt_dir, step, cfg.run.keep_checkpoints)
            if cfg.run.wandb_log_checkpoints:
                logger.log_checkpoint_artifact(path, step)
        preemption.checkpoint_written()

    # ------------------------------------------------------------------ loop
    preemption = PreemptionHandler(cfg.run.checkpoint_every_minutes)
    sums = {k: torch.zeros((), device=dist.device) for k in ("loss", "acc1", "acc5")}
    window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
    last_saved_step = step
    batches = iter(loader)
    model.train()
    while step < total_steps:
        t0 = time.perf_counter()
        view_q, view_k = next(batches)
        data_wait = time.perf_counter() - t0
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total_steps, cfg.optim, peak_lr)
        momentum = momentum_at(step, total_steps, cfg.model)
        metrics = train_step(model, optimizer, scaler, view_q, view_k, momentum, amp_dtype, cfg.optim.grad_clip)
        step += 1
        pairs_seen += global_batch
        for k in sums:
            sums[k] += metrics[k]
        window_steps += 1
        window_wait += data_wait

        if step % cfg.run.log_every == 0 or step == total_steps:
            # The only place the host waits for the device: averages over the window, reduced over ranks.
            means = distributed.all_reduce_mean(torch.stack([sums[k] for k in sums]) / window_steps).tolist()
            if dist.device.type == "cuda":
                torch.cuda.synchronize(dist.device)
            elapsed = time.perf_counter() - window_start
            logged = dict(zip(sums, means))
            logged.update(lr=optimizer.param_groups[0]["lr"], momentum=momentum, pairs_seen=pairs_seen,
                          pairs_per_s=window_steps * global_batch / elapsed, step_time_s=elapsed / window_steps,
                          data_wait_share=window_wait / elapsed, bad_samples=loader.bad_samples)
            if dist.device.type == "cuda":
                logged["gpu_mem_gb"] = torch.cuda.max_memory_allocated(dist.device) / 2**30
            logger.log(step, logged)
            logger.record_step_time(elapsed / window_steps)
            sums = {k: torch.zeros_like(v) for k, v in sums.items()}
            window_steps, window_wait, window_start = 0, 0.0, time.perf_counter()
        if knn is not None and step % cfg.run.knn_every == 0:
            logger.log_eval(step, {"knn_top1": knn.evaluate(model.encoder_q.backbone)})
        if cfg.run.image_log_every and step % cfg.run.image_log_every == 0:
            logger.log_images(step, view_q, view_k)
        if loader.bad_samples > cfg.data.max_bad_batches:
            raise RuntimeError(f"{loader.bad_samples} corrupt samples skipped (> data.max_bad_batches): "
                               f"the shards look broken, e.g. {loader.bad_sample_locations[:3]}")

        stop, due = preemption.poll(step)
        periodic = cfg.run.checkpoint_every_steps and step % cfg.run.checkpoint_every_steps == 0
        if stop or due or periodic:
            write_checkpoint()
            last_saved_step = step
        if stop:
            if dist.is_main:
                print(f"preempted (signal {preemption.signal_received}): checkpoint at step {step} written, exiting",
                      flush=True)
            break

    if step != last_saved_step:
        write_checkpoint()
    preemption.close()
    loader.close()
    summary = {"steps": step, "pairs_seen": pairs_seen, "world_size": dist.world_size,
               "global_batch": global_batch, "device": str(dist.device), "preempted": preemption.signal_received is not None,
               "bad_samples": loader.bad_samples, "wandb_run_id": logger.run_id}
    if logger.history:
        summary.update(final_loss=logger.history[-1]["loss"], first_loss=logger.history[0]["loss"],
                       mean_pairs_per_s=sum(h["pairs_per_s"] for h in logger.history) / len(logger.history),
                       mean_data_wait_share=sum(h["data_wait_share"] for h in logger.history) / len(logger.history))
    return logger.finish(summary)


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, then train. Mistakes in the user's input (a bad flag, missing shards, a bad
    checkpoint path) are one line ``error: ...`` and exit code 2, not tracebacks."""
    import cli

    def run() -> None:
        cfg = cli.parse(Config, argv, description=__doc__.split("\n\n")[0], prog="train.py")
        distributed.set_torch_threads(cfg.run.torch_threads, reserved=cfg.data.num_threads)
        train(cfg)

    return cli.guard(run, user_errors=(ManifestError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
