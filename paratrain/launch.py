"""Start the workers: locally through torch's elastic launcher, or join a torchrun group.

`launch(cfg)` starts dp*tp*pp local processes with `torch.distributed.launcher.elastic_launch`
(c10d rendezvous on a free local port), so restarts after a failure and the per-rank error
records come from the engine. Under `torchrun` (RANK and WORLD_SIZE in the environment) the
current process is already one rank and `run_worker` joins the group instead. gloo on CPU, NCCL
on CUDA. Each local worker gets an equal share of the cores, so workers do not oversubscribe.
"""

from __future__ import annotations

import logging
import os
import re
import uuid

import torch
import torch.distributed as dist

from paratrain.config import RunConfig
from paratrain.group import (cpu_count, init_process_group, leave_at_exit, leave_process_group,  # noqa: F401
                             threads_per_worker, under_torchrun)
from paratrain.mesh import Mesh
from paratrain.train import Trainer


def run_worker(cfg_dict: dict) -> dict:
    """The body of one rank: process group, mesh, trainer. Returns rank 0's results."""
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
            result = Trainer.from_config(cfg, mesh, device).fit()
    except BaseException:
        dist.destroy_process_group()  # no gc.collect here: on failure it left a semaphore leak warning
        raise
    leave_process_group()  # under torchrun the process lives on to its interpreter's teardown
    return result


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
