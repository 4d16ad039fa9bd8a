"""The Checkpointer: saves and loads one run's state, whatever engine and model it trains.

It is given what it saves (the engine, the optimizer, global names, and objects with
`state_dict()` / `load_state_dict()` such as the data position and the fp16 loss scaler) and
what a checkpoint must match (`identity`); it knows nothing of the Trainer. With `async_save`,
each rank copies what it writes to host memory (the only time training waits) and a background
thread runs DCP's save on a process group of its own while training continues; the folder is
published once every rank's write is complete.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.distributed as dist

from paratrain.checkpoint import runs
from paratrain.checkpoint.boxes import Entry, Piece, boxes_state, planners, quiet
from paratrain.checkpoint.entries import MOMENTS, checkpoint_entries, derived_aliases
from paratrain.checkpoint.store import (CheckpointError, begin_save, read_manifest, run_info, start_point,
                                        write_and_publish)
from paratrain.comm.flight import FlightRecorder

OPTIONAL_STATE = ("balance",)  # state a checkpoint may lack (one of a run that had no dp > 1): left as it is


def agreed_aliases(local: dict[str, str], group) -> dict[str, str]:
    """Every rank's aliases (a pipeline stage sees only its own tied names), on every rank."""
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, local, group=group)
    return {k: v for d in everyone for k, v in d.items()}


def open_run(root: str, run: dict, resume: bool, restart: bool, group=None) -> tuple[str, str | None]:
    """Every rank of `group`: (run id, checkpoint to load or None) for a run on `root`. Rank 0
    takes the folder's lock (if its launcher has not) and chooses (store.start_point); a refusal
    is a CheckpointError on every rank. It is a `restart` where any rank's is."""
    answer: list = [None]
    flags = torch.tensor([int(restart)])
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    restart = bool(flags.item())  # a restart if any rank's workers restart: a joining node's do not
    if dist.get_rank() == 0:
        try:
            runs.acquire(root)
            run_id, folder = start_point(root, run, resume, restart)
            runs.record_run(root, run_id)
            answer[0] = (run_id, folder, None)
        except (CheckpointError, runs.LockHeld, OSError) as e:
            answer[0] = (None, None, str(e))
    dist.broadcast_object_list(answer, src=0, group=group)
    run_id, folder, error = answer[0]
    if error:
        raise CheckpointError(error)
    return run_id, folder


def renamed(entries: list[Entry], aliases: dict[str, str]) -> list[Entry]:
    """Entries under the names a checkpoint keeps: a tensor this run calls by one of the
    checkpoint's aliases is read from the name the checkpoint kept it under."""
    out = []
    for e in entries:
        prefix, _, name = e.key.partition("/")
        if prefix == "optim":
            moment, _, name = name.partition("/")
            prefix = f"optim/{moment}"
        key = f"{prefix}/{aliases[name]}" if name in aliases else e.key
        out.append(Entry(key, e.shape, e.pieces, e.owner))
    return out


class Checkpointer:
    """Layout-agnostic checkpoints of one run under `root` (see the package docstring).

    `engine`: the DataParallel or ZeroDataParallel wrapper; `names`: id(parameter) -> global
    name (the vanilla model's); `buffer_names`: id(buffer) -> global name (default: where the
    buffer sits); `state`: objects saved in the meta under their key; `identity`: what a
    checkpoint must match; `aliases`: {tied name: kept name} (default: found in the modules);
    `on_load()`: called after a load (ZeRO's engine has published the loaded masters by then)."""

    def __init__(self, root: str, engine, optimizer: torch.optim.Optimizer, mesh, names: dict[int, str] | None, *,
                 state: dict[str, object] | None = None, identity: dict, layout: str, config: dict | None = None,
                 keep: int = 3, async_save: bool = False, aliases: dict[str, str] | None = None,
                 buffer_names: dict[int, str] | None = None, on_load: Callable[[], None] | None = None):
        self.root, self.engine, self.optimizer, self.mesh = root, engine, optimizer, mesh
        self.names, self.buffer_names, self.state = names, buffer_names, dict(state or {})
        self.identity, self.layout, self.config = identity, layout, config
        self.keep, self.async_save, self.on_load = keep, async_save, on_load
        self.run, self.run_id = runs.run_identity(config, identity), None  # the run id: open()
        self.flight = getattr(getattr(mesh, "comm", None), "flight", None) or FlightRecorder()
        self.background = FlightRecorder()  # the asynchronous writer's collectives
        self.fault: tuple[int, str] | None = None  # testing aid: (step, "save-kill" | "save-permanent" | ...)
        self.refreshed = 0.0
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo")  # checkpoint traffic apart from training's
        local = derived_aliases(engine, names) if aliases is None else dict(aliases)
        self.aliases = agreed_aliases(local, self.group)
        self.pending = None  # (future, step, t0, blocked_s) of an asynchronous save
        self.events: list[dict] = []  # per save: step, blocked_s, total_s
        self.writer = None

    def _entries(self) -> list[Entry]:
        return checkpoint_entries(self.engine, self.optimizer, self.mesh, self.names, self.buffer_names)

    def _meta(self) -> dict:
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        return {"optim_step": max(steps, default=0.0), **{k: obj.state_dict() for k, obj in self.state.items()}}

    def open(self, resume: bool = False, restart: bool = False) -> str | None:
        """Take the folder for this run (its lock, its run id); returns the checkpoint to load:
        with `resume`, the newest good one this run may continue; in a `restart`, its own newest;
        None for a fresh run (which refuses a folder holding checkpoints: CheckpointError)."""
        with self.flight.watch("checkpoint: choose where to start", self.group):
            self.run_id, folder = open_run(self.root, self.run, resume, restart, self.group)
        return folder

    def close(self) -> None:
        """Wait for a save in flight, then give the folder's lock back (the run is over): a
        process that holds it itself removes it; under a launcher, whose other workers may yet
        die and be restarted, it is marked finished (the launcher removes it as it ends)."""
        self.wait()
        if self.rank == 0 and self.run_id is not None:
            if runs.lock_owner() == os.getpid():
                runs.release(self.root)
            else:
                runs.record_run(self.root, self.run_id, finished=True)

    def _simulate_fault(self, step: int) -> None:
        """--simulate-failure RANK:STEP:save-...: fail here, once the other ranks have begun the save."""
        from paratrain.faults import strike

        if self.fault is not None and self.fault[0] == step:
            strike(self.fault[1])

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        self.wait()  # one save at a time
        if self.run_id is None:
            self.open()
        with self.flight.watch("checkpoint: begin save", self.group, f"step {step}"):
            tmp = begin_save(self.root, step, self.group, self.rank == 0)
        entries = self._entries()
        if self.async_save:  # stage: copy what this rank writes to host memory, then write behind
            entries = [Entry(e.key, e.shape, [Piece(p.offset, p.tensor.detach().to("cpu", copy=True))
                                              for p in e.pieces], True) for e in entries if e.owner]
        state = boxes_state(entries, saving=True)
        state["meta"] = self._meta()
        state[f"rng/{self.rank}"] = torch.get_rng_state()
        info = run_info(self.identity, self.config, step, self.layout, self.aliases, self.run_id)
        flight = self.background if self.async_save else self.flight

        def write() -> float:
            """Write and publish (SaveFailed on every rank if any cannot); returns when the save ended."""
            self._simulate_fault(step)
            with flight.watch("checkpoint: save (DCP)", self.group, f"step {step}"):
                write_and_publish(state, tmp, self.group, self.rank == 0, self.root, step, info, self.keep)
            return time.perf_counter()

        if self.async_save:
            from concurrent.futures import ThreadPoolExecutor

            self.writer = self.writer or ThreadPoolExecutor(1, thread_name_prefix="paratrain-ckpt")
            self.pending = (self.writer.submit(write), step, t0, time.perf_counter() - t0)
            return
        end = write()  # every rank returns once rank 0 has published
        self.events.append({"step": step, "blocked_s": time.perf_counter() - t0, "total_s": end - t0})

    def poll(self) -> None:
        """Between steps (local: no collective): mark the folder's lock alive now and then. A
        failed asynchronous save is raised by wait(), where every rank learns it together."""
        if self.rank == 0 and time.monotonic() - self.refreshed > runs.REFRESH_S:
            runs.refresh(self.root)
            self.refreshed = time.monotonic()

    def wait(self) -> None:
        """Wait for the asynchronous save in flight (before the next one, and at the end)."""
        if self.pending is None:
            return
        future, step, t0, blocked = self.pending
        self.pending = None
        w0 = time.perf_counter()
        with self.flight.watch("checkpoint: wait for the asynchronous save", self.group, f"step {step}"):
            end = future.result()  # every rank's write, and rank 0's publication, are done (or SaveFailed)
        self.events.append({"step": step, "blocked_s": blocked + time.perf_counter() - w0, "total_s": end - t0})

    def load(self, folder: str, group=None) -> int:
        """Load `folder` into this layout (every rank of `group`, default the world, reads the
        same folder); returns the step it was saved at."""
        import torch.distributed.checkpoint as dcp

        manifest = read_manifest(folder)
        state = boxes_state(renamed(self._entries(), manifest.get("aliases", {})), saving=False)
        state["meta"] = self._meta()
        same_layout = manifest["layout"] == self.layout and manifest["world_size"] == dist.get_world_size()
        rng = f"rng/{self.rank}"
        saved = dcp.FileSystemReader(folder).read_metadata().state_dict_metadata
        same_layout = same_layout and rng in saved
        for key in OPTIONAL_STATE:  # not in a checkpoint of a run without it: left as it is
            if not any(k.startswith(f"meta.{key}.") for k in saved):
                state["meta"].pop(key, None)
        if same_layout:
            state[rng] = torch.get_rng_state()
        group = group or self.group
        with quiet(), self.flight.watch("checkpoint: load (DCP)", group, os.path.basename(folder)):
            dcp.load(state, checkpoint_id=folder, process_group=group, planner=planners()[1])
        self._restore(state["meta"], folder)
        if same_layout:
            torch.set_rng_state(state[rng])
        if hasattr(self.engine, "publish"):  # ZeRO: the loaded master shards into what compute uses
            self.engine.publish()
        if self.on_load is not None:
            self.on_load()
        return manifest["step"]

    def _restore(self, meta: dict, folder: str) -> None:
        """The meta's objects into `state`, and the optimizer's step count into every moment's state."""
        missing = [k for k in self.state if k not in meta and k not in OPTIONAL_STATE]
        if missing:
            raise CheckpointError(f"{folder} holds no {missing[0]!r} state (it has {sorted(meta)})")
        for k, obj in self.state.items():
            if k in meta:
                obj.load_state_dict(meta[k])
        for s in self.optimizer.state.values():
            if all(m in s for m in MOMENTS) and torch.is_tensor(s.get("step")):
                s["step"] = torch.full_like(s["step"], float(meta["optim_step"]))
