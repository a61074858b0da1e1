"""Preemption: SIGTERM / SIGUSR1 set a flag; ranks agree on it (and on time-based checkpoints) every few steps.

Slurm sends SIGUSR1 (with ``--signal=USR1@180``) a few minutes before the time limit, and SIGTERM when it
preempts or cancels a job; torchrun forwards SIGTERM to its workers. The handler only records the signal, so
the step in flight finishes normally. Ranks may see a signal at different steps (or only one rank may get it),
so a max-all-reduce of [signal number, checkpoint-due] every ``every`` steps makes them stop at the same step,
write one consistent checkpoint and name the same signal. With NCCL the agreement runs over a separate gloo
group so it needs no GPU synchronisation.

After the checkpoint, a stop caused by SIGUSR1 under Slurm requeues the job (:func:`requeue_slurm_job`): the
time limit ends a job for good (``--requeue`` only covers node failure and preemption), so a 48-hour run
in 4-hour slots puts itself back in the queue and the next slot resumes from the checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import torch
import torch.distributed as torch_dist

import distributed


class PreemptionHandler:
    """Tracks stop requests and checkpoint timing, agreed across ranks.

    Args:
        checkpoint_every_minutes: also request a checkpoint after this much wall time (0: off).
        every: agree across ranks every this many steps (bounds the time from signal to exit).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, checkpoint_every_minutes: float = 0.0, every: int = 5):
        self.every = max(1, every)
        self.interval_s = checkpoint_every_minutes * 60.0
        self.last_checkpoint_time = time.monotonic()
        self.signal_received: int | None = None  # on this rank
        self.stop_signal: int | None = None  # agreed: the signal some rank received (the highest number if several)
        self._previous = {}
        self._group = None
        if distributed.is_initialized() and distributed.world_size() > 1:
            backend = torch_dist.get_backend()
            # A CPU-side group: agreeing on a flag must not synchronise the GPU stream.
            self._group = torch_dist.new_group(backend="gloo") if backend != "gloo" else torch_dist.group.WORLD
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signal_received = signum

    def poll(self, step: int) -> tuple[bool, bool]:
        """Return (stop, checkpoint_now) agreed by all ranks; only communicates every ``every`` steps."""
        if step % self.every != 0:
            return False, False
        due = self.interval_s > 0 and time.monotonic() - self.last_checkpoint_time >= self.interval_s
        flags = torch.tensor([float(self.signal_received or 0), float(due)])
        if self._group is not None:
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, group=self._group)
        if flags[0] > 0:
            self.stop_signal = int(flags[0])
        return self.stop_signal is not None, bool(flags[1])

    @property
    def signal_name(self) -> str:
        """The agreed stop signal's name (``SIGTERM``), or an empty string."""
        return signal.Signals(self.stop_signal).name if self.stop_signal else ""

    def checkpoint_written(self) -> None:
        self.last_checkpoint_time = time.monotonic()

    def close(self) -> None:
        """Restore the previous signal handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> PreemptionHandler:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def requeue_slurm_job(stop_signal: int | None, env: dict[str, str] | None = None) -> str | None:
    """Put this Slurm job back in the queue after a stop on SIGUSR1, Slurm's warning before the time limit.

    Call it on one rank, after the checkpoint is written (``scontrol requeue`` ends the job's processes). SIGTERM
    (``scancel``, preemption) never requeues: a cancelled job must stay cancelled, and Slurm requeues preempted
    jobs itself. A job submitted with ``--no-requeue`` (or on a cluster that forbids it) is refused by scontrol;
    that is reported, not raised.

    Returns:
        A line to print (what was done or why not), or None when not under Slurm or not stopped by SIGUSR1.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    if stop_signal != signal.SIGUSR1 or not job_id:
        return None
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"warning: could not requeue Slurm job {job_id} ({exc}); resubmit it to continue"
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        return (f"warning: scontrol requeue {job_id} failed ({reason[0] if reason else f'exit {proc.returncode}'}); "
                "resubmit the job to continue")
    return f"requeued Slurm job {job_id}: it resumes from this checkpoint when it starts again"
