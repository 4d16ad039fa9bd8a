"""The servers' checkpoints (a parameter-server run, param_server.py): saved in the canonical
form of paratrain/checkpoint/, so that they load into any layout and any layout's load into the
servers; and the point a run resumes from."""

from __future__ import annotations

import math
import os

import torch

from paratrain.checkpoint import (Entry, begin_save, boxes_state, flat_range_boxes, model_identity,
                                  planners, quiet, read_manifest, run_info, shifted_pieces, write_and_publish)
from paratrain.checkpoint.checkpointer import open_run
from paratrain.checkpoint.runs import run_identity
from paratrain.config import RunConfig


class ServerCheckpoints:
    """The servers' part of a checkpoint, in the canonical form of paratrain/checkpoint/ (each
    parameter and its two moments under the global name), so that it loads into any layout, and
    a checkpoint of any layout loads into the servers. Saved by the servers alone, at the steps
    of a synchronous run (with staleness the servers share no step); the workers hold nothing
    that outlives a step, and their batches follow from the step."""

    def __init__(self, server, layout: str):
        self.server, self.cfg, self.layout = server, server.cfg, layout
        self.first = server.index == 0  # creates the folder and publishes it
        self.run_id = RUN_IDS.get(self.cfg.checkpoint.dir)  # chosen by resume_point

    def entries(self) -> list:
        srv, out = self.server, []
        tensors = {"model": srv.shard, "optim/exp_avg": srv.moments["exp_avg"],
                   "optim/exp_avg_sq": srv.moments["exp_avg_sq"]}
        for name, off, shape in srv.slots:
            a, b = max(off, srv.lo), min(off + math.prod(shape), srv.hi)
            if a < b:  # this server holds elements [a, b) of the parameter
                boxes = flat_range_boxes(a - off, b - off, shape)
                for prefix, data in tensors.items():
                    pieces = shifted_pieces(boxes, (0,) * len(shape), data, srv.lo - off)
                    out.append(Entry(f"{prefix}/{name}", shape, pieces, owner=True))
        return out

    def meta(self, step: int) -> dict:
        # as the trainer writes it: the loader's next step, the optimizer's step count
        return {"loader": {"step": step + 1, "seed": self.cfg.train.seed}, "optim_step": float(step),
                "scaler": {"scale": 1.0, "good": 0}}

    def save(self, step: int) -> None:
        ck, group = self.cfg.checkpoint, self.server.group
        tmp = begin_save(ck.dir, step, group, self.first)
        state = {**boxes_state(self.entries(), saving=True), "meta": self.meta(step)}
        info = run_info(model_identity(self.cfg), self.cfg.to_dict(), step, self.layout, self.server.aliases,
                        self.run_id)
        with self.server.comm.flight.watch("checkpoint: save (DCP)", group, f"step {step}"):
            write_and_publish(state, tmp, group, self.first, ck.dir, step, info, ck.keep)  # returns once published

    def load(self, folder: str) -> None:
        import torch.distributed.checkpoint as dcp

        state = {**boxes_state(self.entries(), saving=False), "meta": self.meta(0)}
        with quiet(), self.server.comm.flight.watch("checkpoint: load (DCP)", self.server.group, folder):
            dcp.load(state, checkpoint_id=folder, process_group=self.server.group, planner=planners()[1])
        for v in self.server.views:
            self.server.optimizer.state[v]["step"] = torch.tensor(float(state["meta"]["optim_step"]))


RUN_IDS: dict[str, str] = {}  # checkpoint folder -> this run's id in it (one run per process)


def resume_point(cfg: RunConfig) -> tuple[str | None, int]:
    """The checkpoint to resume from (with --resume, or in a restart after a failure) and its
    step; rank 0 takes the folder for the run and chooses, skipping broken ones with a warning
    (checkpointer.open_run), and tells every rank."""
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if not cfg.checkpoint.dir:
        return None, 0
    run = run_identity(cfg.to_dict(), model_identity(cfg))
    RUN_IDS[cfg.checkpoint.dir], folder = open_run(cfg.checkpoint.dir, run, cfg.checkpoint.resume, not first_attempt)
    if folder is None:
        return None, 0  # nothing saved yet: start over
    return folder, int(read_manifest(folder)["step"])
