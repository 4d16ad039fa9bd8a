"""Joining the process group: from torchrun's (or our elastic launcher's) environment, or as a
group of one in a plain process, and leaving it cleanly at exit."""

from __future__ import annotations

import atexit
import datetime
import gc
import os

import torch
import torch.distributed as dist

from paratrain.mesh import Mesh


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(local_world_size: int) -> int:
    return max(1, cpu_count() // max(1, local_world_size))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def leave_process_group() -> None:
    """Collect garbage, then destroy the default group (if any).

    Reference cycles left by a training step (autograd graphs around collectives) can hold gloo
    state; collected at interpreter exit, after the group is gone, they abort the process
    ("terminate called without an active exception", exit status -6) in one run of four to six
    under torch 2.13, with torch's own DistributedDataParallel too. Collected first, they do not.
    """
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def leave_at_exit() -> None:
    """For processes that join a group themselves (the Python API): leave it at exit, cleanly."""
    atexit.register(leave_process_group)


def init_process_group(backend: str, timeout: datetime.timedelta = datetime.timedelta(minutes=10)) -> None:
    """Join the default group from the launcher's environment (torchrun or our elastic launch).

    Under the elastic agent every restart reuses the agent's TCPStore, where the previous
    attempt's keys (such as the gloo peers' addresses) are still present: a restarted worker
    could read a dead peer's address and fail to connect. Each attempt therefore gets its own
    key prefix.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"paratrain/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def init(dp: int | None = None, tp: int = 1, pp: int = 1, backend: str | None = None) -> Mesh:
    """Join the process group (from torchrun's environment; in a plain process, a group of one;
    unless already initialised) and lay the ranks out as pp x dp x tp; dp defaults to
    world / (tp * pp)."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if under_torchrun():
            init_process_group(backend or ("nccl" if cuda else "gloo"))
        else:  # one process: its own in-memory store, no launcher needed
            dist.init_process_group(backend or ("nccl" if cuda else "gloo"), store=dist.HashStore(), rank=0,
                                    world_size=1)
        leave_at_exit()  # a script's end need not destroy the group (torchrun's examples do not)
    world = dist.get_world_size()
    dp = dp or world // (tp * pp)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return Mesh.build(dp, tp, pp, device_type=device)
