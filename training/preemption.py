"""Preemption: SIGTERM / SIGUSR1 set a flag; ranks agree on it (and on time-based checkpoints) every few steps.

Slurm sends SIGUSR1 (with ``--signal=USR1@120``) or SIGTERM before killing a job; torchrun forwards SIGTERM to its
workers. The handler only sets a flag, so the step in flight finishes normally. Ranks may see the signal at
different steps, so a max-all-reduce of [stop, checkpoint-due] every ``every`` steps makes them stop at the
same step and write one consistent checkpoint. With NCCL the agreement runs over a separate gloo group so it
needs no GPU synchronisation.
"""

from __future__ import annotations

import signal
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
        self.signal_received: int | None = None
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
        local_stop = self.signal_received is not None
        due = self.interval_s > 0 and time.monotonic() - self.last_checkpoint_time >= self.interval_s
        flags = torch.tensor([float(local_stop), float(due)])
        if self._group is not None:
            torch_dist.all_reduce(flags, op=torch_dist.ReduceOp.MAX, group=self._group)
        return bool(flags[0]), bool(flags[1])

    def checkpoint_written(self) -> None:
        self.last_checkpoint_time = time.monotonic()

    def close(self) -> None:
        """Restore the previous signal handlers."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
