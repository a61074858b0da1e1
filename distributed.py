"""Distributed set-up and collectives in one place, with single-process fallbacks.

``setup_distributed()`` reads the torchrun or Slurm environment, initialises the process group (NCCL on
GPU, gloo on CPU) and returns a frozen :class:`DistInfo`. The collectives below fall back to rank 0,
world size 1 and identity when no process group exists, so the model, loss and loader run in a plain
single-process test (the original MoCo hard-wires collectives and fails on one GPU; we do not).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = ""  # "" when no process group was initialised

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout read from the launcher's environment variables."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "none"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu[003-005,007],cpu1`` -> ``gpu003``."""
    head = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist
    match = re.match(r"^([^\[,]+)\[([^\]]+)\]", head)
    if match:
        prefix, ranges = match.groups()
        first = ranges.split(",")[0].split("-")[0]
        return prefix + first
    return head.split(",")[0]


def read_launch_env(env: dict[str, str] | None = None) -> LaunchEnv:
    """Read rank, local rank and world size from torchrun (RANK, ...) or Slurm (SLURM_PROCID, ...).

    torchrun wins when both are set (``srun torchrun ...`` launches one torchrun per node).
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(
            rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)), world_size=world,
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        world = int(env["SLURM_NTASKS"])
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world = int(tasks_per_node) if tasks_per_node.isdigit() else int(env.get("SLURM_GPUS_ON_NODE", world))
        # A stable port per job so concurrent jobs on one node do not collide.
        port = int(env.get("MASTER_PORT", 20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)), world_size=world,
            local_world_size=local_world, master_addr=env.get("MASTER_ADDR", first_slurm_host(nodelist)),
            master_port=port, launcher="slurm",
        )
    return LaunchEnv(0, 0, 1, 1, "127.0.0.1", 29500, "none")


def pick_device(preference: str, local_rank: int) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is available, else the CPU."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available on this machine")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup_distributed(device: str = "auto", timeout_s: float = 600.0, env: dict[str, str] | None = None) -> DistInfo:
    """Initialise the process group from the launcher environment (no-op for a single process).

    Args:
        device: "auto", "cuda" or "cpu".
        timeout_s: collective timeout; a dead rank makes the others fail after this long instead of hanging.
        env: environment to read (defaults to ``os.environ``).

    Returns:
        The frozen DistInfo for this process.
    """
    launch = read_launch_env(env)
    dev = pick_device(device, launch.local_rank)
    if launch.world_size == 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        if launch.launcher == "slurm":
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
        if dev.type == "cuda":
            # Fail fast with an error instead of hanging when a peer dies mid-collective.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch_dist.init_process_group(
            backend=backend, init_method=f"tcp://{launch.master_addr}:{launch.master_port}"
            if launch.launcher == "slurm" else "env://",
            rank=launch.rank, world_size=launch.world_size, timeout=datetime.timedelta(seconds=timeout_s),
        )
    return DistInfo(launch.rank, launch.local_rank, launch.world_size, launch.local_world_size, dev, backend)


def teardown_distributed() -> None:
    """Destroy the process group if one exists."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


# gloo reports a lost peer as a plain RuntimeError that starts with its source location, for example
# "[.../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:16002: Connection reset by peer" (peer died) or
# "[.../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv operation to complete" (peer
# stopped or hung for --dist-timeout-s). After such a timeout gloo closes every pair of the context, and the
# operations waiting on them fail with its bare "Application timeout caused pair closure" (seen in DDP's buffer
# broadcast when a peer was SIGKILLed mid-receive); the peer's side reads "Connection closed by peer".
_GLOO_ERROR = re.compile(r"^\[[^\]]*gloo[^\]]*\.cc:\d+\]\s*")
_GLOO_BARE = ("Application timeout caused pair closure", "Connection closed by peer")


def peer_failure(exc: BaseException) -> str | None:
    """The reason, when ``exc`` is a collective failing because another rank died or stopped responding; else None.

    NCCL and the rendezvous store raise ``torch.distributed.DistError`` subclasses (DistBackendError,
    DistNetworkError, DistStoreError); gloo raises a plain RuntimeError carrying its source location. Any other
    exception is not a peer failure (None) and must surface as itself.
    """
    message = str(exc).strip()
    if isinstance(exc, torch_dist.DistError):
        return message.splitlines()[0] if message else type(exc).__name__
    if type(exc) is RuntimeError and (_GLOO_ERROR.match(message) or message.startswith(_GLOO_BARE)):
        return _GLOO_ERROR.sub("", message.splitlines()[0]).split(". This is typically")[0]
    return None


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (for tests and single-node launches)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_torch_threads(requested: int = 0, reserved: int = 0, env: dict[str, str] | None = None) -> int:
    """Set torch's intra-op thread count for this process and return it.

    Args:
        requested: threads to use; 0: the cores this process may run on (``os.sched_getaffinity``, which honours
            Slurm's and taskset's CPU masks) shared by the ranks on this node (``LOCAL_WORLD_SIZE``), less
            ``reserved``, at least 1. torch's own default counts every core of the machine in every rank, so 8 ranks
            on a node, or a loader's threads next to torch's on a small CPU, oversubscribe the cores and OpenMP
            threads spin-wait for each other, several times slower.
        reserved: cores per rank kept for other busy threads of this rank (the loader's decode threads).
        env: environment to read (defaults to ``os.environ``).
    """
    if requested <= 0:
        env = os.environ if env is None else env
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        local_ranks = int(env.get("LOCAL_WORLD_SIZE") or 1)
        requested = max(1, cores // max(local_ranks, 1) - reserved)
    torch.set_num_threads(requested)
    return requested


# ----------------------------------------------------------------------------- collectives with fallbacks


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


# torch >= 2.14 renames all_gather_into_tensor; keep working on older releases (the GPU machine has 2.11).
_all_gather_single = getattr(torch_dist, "all_gather_single", None) or getattr(torch_dist, "all_gather_into_tensor", None)


@torch.no_grad()
def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (same shape on every rank) along dim 0 over ranks, in rank order. No gradient.

    Args:
        tensor: N x ... on this rank.

    Returns:
        (W*N) x ... ; the input itself without a process group.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    out = torch.empty((world_size() * tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    _all_gather_single(out, tensor.contiguous())
    return out


@torch.no_grad()
def all_to_all(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Exchange rows: send ``send_counts[j]`` consecutive rows to rank j, receive ``recv_counts[j]`` from rank j.

    Args:
        tensor: sum(send_counts) x ... rows, grouped by destination rank.

    Returns:
        sum(recv_counts) x ... rows, grouped by source rank. Identity without a process group.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    out = torch.empty((sum(recv_counts), *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    torch_dist.all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts)
    return out


def broadcast(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Broadcast ``tensor`` in place from ``src``; identity without a process group."""
    if is_initialized() and world_size() > 1:
        torch_dist.broadcast(tensor, src)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks (returns a new tensor); identity without a process group."""
    if not is_initialized() or world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks (returns a new tensor); identity without a process group."""
    if not is_initialized() or world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out


def all_gather_object(obj: object) -> list[object]:
    """Gather one picklable object per rank (for small host-side state such as loader positions)."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    torch_dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Broadcast one picklable object from ``src``."""
    if not is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src)
    return box[0]
