"""Distributed helpers: environment parsing (torchrun, Slurm), fallbacks, and a real 2-rank gloo group."""

from pathlib import Path

import torch

import distributed
from tests.conftest import run_torchrun


def test_torchrun_environment():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "node7", "MASTER_PORT": "1234"}
    launch = distributed.read_launch_env(env)
    assert (launch.rank, launch.local_rank, launch.world_size, launch.local_world_size) == (3, 1, 4, 2)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("node7", 1234, "torchrun")


def test_slurm_environment():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "SLURM_JOB_NODELIST": "gpu[003-004,009]", "SLURM_JOB_ID": "4242"}
    launch = distributed.read_launch_env(env)
    assert (launch.rank, launch.local_rank, launch.world_size, launch.local_world_size) == (5, 1, 8, 4)
    assert launch.master_addr == "gpu003" and launch.launcher == "slurm"
    assert launch.master_port == 20000 + 4242


def test_slurm_node_list_forms():
    assert distributed.first_slurm_host("node12") == "node12"
    assert distributed.first_slurm_host("a1,b2") == "a1"
    assert distributed.first_slurm_host("gpu[07,09-10],cpu1") == "gpu07"


def test_single_process_fallbacks():
    info = distributed.setup_distributed("cpu", env={})
    assert info == distributed.DistInfo(device=torch.device("cpu")) and info.is_main
    x = torch.randn(3, 2)
    assert distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.all_gather(x) is x and distributed.all_to_all(x, [3], [3]) is x and distributed.all_reduce_mean(x) is x
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]


WORKER = Path(__file__).with_name("dist_worker_collectives.py")


def test_two_rank_gloo_collectives():
    proc = run_torchrun(WORKER, nproc=2, timeout=180)
    assert proc.stdout.count("collectives ok") == 2


def test_torch_threads_default_shares_the_usable_cores_among_local_ranks_and_the_loader():
    import os

    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        assert distributed.set_torch_threads(0, env={}) == torch.get_num_threads() == cores
        assert distributed.set_torch_threads(0, env={"LOCAL_WORLD_SIZE": "2"}) == max(1, cores // 2)
        assert distributed.set_torch_threads(0, reserved=cores, env={}) == 1  # never below one thread
        assert distributed.set_torch_threads(0, reserved=1, env={}) == max(1, cores - 1)
        assert distributed.set_torch_threads(3, reserved=8, env={"LOCAL_WORLD_SIZE": "64"}) == 3  # an explicit count wins
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_peer_failures_are_recognised_narrowly():
    """What gloo and NCCL raise when another rank died or stopped (messages as they come from torch 2.14) is a peer
    failure with a readable reason; any other error is not, so it surfaces as itself."""
    gloo = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:16002: "
            "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in the application.")
    cases = {
        RuntimeError(gloo): "Read error [127.0.0.1]:16002: Connection reset by peer",
        RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for "
                     "recv operation to complete"): "Timed out waiting 5000ms for recv operation to complete",
        RuntimeError("Application timeout caused pair closure"): "Application timeout caused pair closure",
        torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1.\nmore"):
            "NCCL communicator was aborted on rank 1.",
    }
    for exc, reason in cases.items():
        assert distributed.peer_failure(exc) == reason
    for exc in (RuntimeError("CUDA out of memory"), ValueError("Application timeout caused pair closure"),
                RuntimeError("[model.cc:3] unrelated")):
        assert distributed.peer_failure(exc) is None
