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
import signal
import sys
import uuid
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

from paratrain.checkpoint import latest_good, model_identity, read_manifest
from paratrain.comm.flight import HANG_EXIT
from paratrain.config import RunConfig
from paratrain.group import (cpu_count, init_process_group, leave_at_exit, leave_process_group,  # noqa: F401
                             threads_per_worker, under_torchrun)
from paratrain.mesh import Mesh
from paratrain.stops import (Preempted, RunStopped, StopSignals, end_quietly_on_signals, leave_if_unread,
                             signal_name)
from paratrain.train import Trainer


SHUTDOWN_S = 120  # how long the launcher waits for signalled workers to save before it SIGKILLs them


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
    if cfg.train.sync == "ps":
        end_quietly_on_signals()
    else:
        StopSignals().install()  # SIGTERM / SIGINT: every rank finishes its step and saves it (fit.py)
    init_process_group("gloo" if cfg.train.sync == "ps" else backend)
    try:
        if cfg.train.sync == "ps":
            from paratrain.parallel.param_server import run_ps

            result = run_ps(cfg, device)
        else:
            mesh = Mesh.build(cfg.layout.dp, cfg.layout.tp, cfg.layout.pp, device_type=device.type)
            result = Trainer.from_config(cfg, mesh, device).fit()
    except RunStopped as e:  # every rank stops alike: no failure, no restart
        result = e.record()
        if isinstance(e, Preempted):
            leave_if_unread()
    except BaseException:
        dist.destroy_process_group()  # no gc.collect here: on failure it left a semaphore leak warning
        raise
    leave_process_group()  # under torchrun the process lives on to its interpreter's teardown
    return result


class WorkerFailed(RuntimeError):
    """One or more ranks failed; `lines` holds one line per failed rank (one in all after a hang,
    whose summary the watchdog printed), `status` the exit status: HANG_EXIT after a hang, else 1."""

    def __init__(self, lines: list[str], status: int = 1):
        super().__init__("\n".join(lines))
        self.lines, self.status = lines, status


def failed(failures: dict) -> WorkerFailed:
    """The WorkerFailed of the engine's failures ({global rank: ProcessFailure})."""
    hung = sorted(rank for rank, f in failures.items() if f.exitcode == HANG_EXIT)
    if hung:
        return WorkerFailed([_describe(hung[0], failures[hung[0]])], status=HANG_EXIT)
    return WorkerFailed([_describe(rank, f) for rank, f in sorted(failures.items())])


def _describe(rank: int, failure) -> str:
    """One line for a failed rank: the exception and where it was raised, or the signal."""
    msg = failure.message
    if isinstance(msg, dict):  # written by the engine's error handler in the worker
        text = msg.get("message", "")
        stack = msg.get("extraInfo", {}).get("py_callstack", "")
        frames = re.findall(r'File "([^"]+)", line (\d+)', stack)
        where = f" (at {os.path.basename(frames[-1][0])}:{frames[-1][1]})" if frames else ""
        return f"rank {rank} failed: {text}{where}"
    code = failure.exitcode
    if code == HANG_EXIT:
        return f"rank {rank} failed with exit code {code}: a collective hung (--collective-timeout)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"rank {rank} died (exit code {code}, {name})"
    return f"rank {rank} failed with exit code {code}"


@contextmanager
def restart_lines(cfg: RunConfig) -> Iterator[None]:
    """While the engine's launcher runs: its agent prints one line on stderr for each worker death
    it restarts the workers after (the engine's own logging of it is silenced)."""
    import torch.distributed.launcher.api as launcher

    base = launcher.LocalElasticAgent
    launcher.LocalElasticAgent = reporting_agent(base, "from the last checkpoint" if cfg.checkpoint.dir
                                                 else "from step 1 (no --checkpoint-dir)")
    try:
        yield
    finally:
        launcher.LocalElasticAgent = base


def reporting_agent(base: type, resumes: str) -> type:
    """`base` (the engine's local agent) saying, at each restart, which rank died and how."""

    class ReportingAgent(base):
        failures: dict = {}

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            if result.is_failed():
                self.failures = result.failures
            return result

        def _restart_workers(self, worker_group) -> None:
            total = worker_group.spec.max_restarts
            restart = total - getattr(self, "_remaining_restarts", total - 1)
            for i, (rank, failure) in enumerate(sorted(self.failures.items())):
                more = i + 1 < len(self.failures)
                then = "" if more else f"; restarting every worker {resumes} (restart {restart} of {total})"
                print(f"paratrain: {_describe(rank, failure)} at attempt {restart - 1}{then}",
                      file=sys.stderr, flush=True)
            self.failures = {}
            super()._restart_workers(worker_group)

        def _stop_workers(self, worker_group) -> None:
            self._shutdown(signal.SIGKILL, 5)  # a failed attempt: its survivors hold nothing to save

        def _shutdown(self, death_sig=None, timeout: int = 30) -> None:
            # a signal to this process (preemption) gives the workers time to save; the engine's
            # own end (after the last failure) does not wait for survivors that ignore SIGTERM
            super()._shutdown(death_sig or signal.SIGKILL, timeout if death_sig else 5)

    return ReportingAgent


def launch(cfg: RunConfig) -> dict:
    """Run `cfg` on dp*tp*pp (+ servers) local processes and return rank 0's results.

    Raises WorkerFailed (one line per failed rank) if the workers fail after all restarts, and
    Preempted if this process gets SIGTERM / SIGINT (the engine then passes the signal on to the
    workers, which finish their step and save it, and waits for them up to SHUTDOWN_S).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    nproc = cfg.world_size
    # The engine logs each restart and failure at length; the user gets our one line per rank.
    for name in ("torch.distributed.elastic", "torch.multiprocessing"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in list(logging.root.manager.loggerDict):  # modules that set a level of their own
        if name.startswith("torch.distributed.elastic."):
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
        shutdown_timeout=SHUTDOWN_S,
    )
    try:
        with restart_lines(cfg):  # the engine restarts silently: one line per worker death
            results = elastic_launch(config, run_worker)(cfg.to_dict())
    except ChildFailedError as e:
        raise failed(e.failures) from None
    except SignalException as e:
        raise preempted_on_disk(cfg, e.sigval) from None
    except KeyboardInterrupt:  # before the engine handles the signals
        raise preempted_on_disk(cfg, signal.SIGINT) from None
    return results[0]


def preempted_on_disk(cfg, signum: int) -> Preempted:
    """The launcher's line when it was signalled itself (the workers' own message cannot come
    back through it then): what the checkpoint folder holds now."""
    name, root = signal_name(signum), cfg.checkpoint.dir
    if not root:
        return Preempted(f"preempted ({name}); nothing was saved (no --checkpoint-dir)", 0, signum)
    try:
        folder = latest_good(root, model_identity(cfg))[0]
        step = int(read_manifest(folder)["step"]) if folder else 0
    except Exception:  # noqa: BLE001 - the line must come whatever the folder holds
        folder, step = None, 0
    if folder is None:
        return Preempted(f"preempted ({name}) before any checkpoint was saved in {root}", 0, signum)
    return Preempted(f"preempted ({name}): the newest checkpoint is {folder} (step {step}); "
                     f"the same command with --resume continues from there", step, signum)
