"""Start the workers: locally through torch's elastic launcher, or join a torchrun group.

`launch(cfg)` starts dp*tp*pp local processes with `torch.distributed.launcher.elastic_launch`
(c10d rendezvous on a free local port), so restarts after a failure and the per-rank error
records come from the engine. Under `torchrun` (RANK and WORLD_SIZE in the environment) the
current process is already one rank and `run_worker` joins the group instead. gloo on CPU, NCCL
on CUDA. Each local worker gets an equal share of the cores, so workers do not oversubscribe.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import re
import uuid

import torch
import torch.distributed as dist

from paratrain.config import RunConfig


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_worker(local_world_size: int) -> int:
    return max(1, cpu_count() // max(1, local_world_size))


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def run_worker(cfg_dict: dict) -> dict:
    """The body of one rank: process group, mesh, trainer. Returns rank 0's results."""
    from paratrain.mesh import Mesh
    from paratrain.train import Trainer

    cfg = RunConfig.from_dict(cfg_dict)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    torch.set_num_threads(threads_per_worker(local_world))
    if cfg.train.device == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    # parameter servers talk over gloo (any-source receives) and live on the CPU; workers
    # may still compute on their GPU
    init_process_group("gloo" if cfg.train.sync == "ps" else backend)
    try:
        if cfg.train.sync == "ps":
            from paratrain.parallel.param_server import run_ps

            result = run_ps(cfg, device)
        else:
            mesh = Mesh.build(cfg.layout.dp, cfg.layout.tp, cfg.layout.pp, device_type=device.type)
            result = Trainer(cfg, mesh, device).fit()
    except BaseException:
        dist.destroy_process_group()  # no gc.collect here: on failure it left a semaphore leak warning
        raise
    leave_process_group()  # under torchrun the process lives on to its interpreter's teardown
    return result


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


class WorkerFailed(RuntimeError):
    """One or more ranks failed; `lines` holds one line per failed rank."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def _describe(rank: int, failure) -> str:
    """One line for a failed rank: the exception and where it was raised, or the signal."""
    msg = failure.message
    if isinstance(msg, dict):  # written by the engine's error handler in the worker
        text = msg.get("message", "")
        stack = msg.get("extraInfo", {}).get("py_callstack", "")
        frames = re.findall(r'File "([^"]+)", line (\d+)', stack)
        where = f" (at {os.path.basename(frames[-1][0])}:{frames[-1][1]})" if frames else ""
        return f"rank {rank} failed: {text}{where}"
    return f"rank {rank} failed with exit code {failure.exitcode}: {msg}"


def launch(cfg: RunConfig) -> dict:
    """Run `cfg` on dp*tp*pp (+ servers) local processes and return rank 0's results.

    Raises WorkerFailed (one line per failed rank) if the workers fail after all restarts.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = cfg.world_size
    # The engine logs each restart and failure at length; the user gets our one line per rank.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ["OMP_NUM_THREADS"] = str(threads_per_worker(nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"paratrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=cfg.train.max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        results = elastic_launch(config, run_worker)(cfg.to_dict())
    except ChildFailedError as e:
        raise WorkerFailed([_describe(rank, f) for rank, f in sorted(e.failures.items())]) from None
    return results[0]
