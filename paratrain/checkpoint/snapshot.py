"""In-memory snapshots: the training state every N steps in each node's memory, so that a restart
loses the steps since the last snapshot, not since the last disk checkpoint (Horovod Elastic's
`state.commit()`; Gemini, Wang et al., SOSP 2023, checkpoints to CPU memory for fast recovery).

Each node writes what its ranks hold, a checkpoint in the disk format (DCP, manifest, atomic
publication: store.py), to a folder in its memory that outlives the workers but belongs to the
node: `ROOT/<run id>/<host>-<agent pid>/step_N` (ROOT /dev/shm by default; the agent is the
process that restarts the workers). A box two ranks of the node hold is written once. A node's
snapshot is complete when its ranks together hold every tensor whole: the model replicated over
dp across nodes (dp alone, or tp and pp inside a node); it then serves any layout. With ZeRO, or
tp or pp across nodes, a node holds only its ranks' shards: that serves a restart of the same
ranks in the same layout (a worker that crashed), but when a node is lost the only copy of its
shards went with it, so the restart falls back to the disk checkpoint and says so. A start
restores the newest step whose snapshot every rank can use, where it is newer than the disk
checkpoint; a node that joins has none, and the disk checkpoint serves.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time

import torch
import torch.distributed as dist

from paratrain.checkpoint import runs
from paratrain.checkpoint.boxes import Entry, boxes_state, planners
from paratrain.checkpoint.store import (
    PREFIX,
    CheckpointError,
    begin_save,
    checkpoints,
    run_info,
    run_of,
    verify,
    write_and_publish,
)

DEFAULT_ROOT = "/dev/shm/paratrain-snapshots"
KEEP = 2  # snapshots kept per node


def node_name() -> str:
    """This node's folder name: host and the pid of the process that outlives the workers."""
    return f"{socket.gethostname()}-{runs.lock_owner()}"


def missing_on_node(entries: list[Entry], group) -> str | None:
    """The first tensor of the state (over the world) that the ranks of `group` do not hold
    whole between them, or None: their snapshot restores the whole state."""
    mine = {e.key: (math.prod(e.shape), {(tuple(p.offset), tuple(p.tensor.shape)) for p in e.pieces}) for e in entries}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sorted(mine))
    node: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(node, mine, group=group)
    for key in sorted({k for keys in everyone for k in keys}):
        held = [d[key] for d in node if key in d]
        boxes = set().union(*(b for _, b in held)) if held else set()
        if not held or sum(math.prod(size) for _, size in boxes) != held[0][0]:
            return key
    return None


def partial_planner(cache_as: str):
    """Our save planner (plans cached between snapshots), without DCP's check that the saved
    chunks tile every tensor: a node may hold only its shards. Snapshots.usable() decides
    whether such a snapshot can serve."""
    import dataclasses
    from collections import ChainMap

    from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

    planner = planners(cache_as=cache_as)[0]

    def global_plan(all_plans):
        plans, metadata = create_default_global_save_plan(planner._dedup_save_plans(all_plans))
        mappings = dict(ChainMap(*[p.planner_data for p in plans]))
        return plans, dataclasses.replace(metadata, planner_data=mappings)

    planner._create_global_plan = global_plan
    return planner


class Snapshots:
    """A run's in-memory snapshots (see the module docstring), beside its Checkpointer `ckpt`
    (its entries, identity and run id: open() it first)."""

    def __init__(self, ckpt, mesh, every: int, root: str | None = None):
        self.ckpt, self.every, self.rank = ckpt, every, dist.get_rank()
        world = dist.get_world_size()
        size = mesh.node_size or world
        groups = [dist.new_group(list(range(n * size, (n + 1) * size)), backend="gloo") for n in range(world // size)]
        self.group, self.first = groups[self.rank // size], self.rank % size == 0
        self.ranks = list(range(self.rank // size * size, (self.rank // size + 1) * size))
        names: list = [None] * size
        dist.all_gather_object(names, node_name(), group=self.group)
        self.node = names[0]  # the node's first rank names it (the same agent, unless in a test)
        self.base = os.path.join(root or DEFAULT_ROOT, ckpt.run_id)
        self.folder = os.path.join(self.base, self.node)
        self.missing = missing_on_node(ckpt._entries(), self.group)
        self.events: list[dict] = []  # per snapshot: step, seconds
        if self.first:
            remove_gone_nodes(root or DEFAULT_ROOT)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, step: int) -> None:
        """Every rank: the state after `step` into this node's memory (the asynchronous disk
        save in flight first completes)."""
        t0 = time.perf_counter()
        ck = self.ckpt
        ck.wait()
        with ck.flight.watch("snapshot: begin", self.group, f"step {step}"):
            tmp = begin_save(self.folder, step, self.group, self.first)
        state = boxes_state([Entry(e.key, e.shape, e.pieces, True) for e in ck._entries()], saving=True)
        state["meta"] = ck._meta()
        state[f"rng/{self.rank}"] = torch.get_rng_state()
        info = {
            **run_info(ck.identity, ck.config, step, ck.layout, ck.aliases, ck.run_id),
            "snapshot": {
                "node": self.node,
                "ranks": self.ranks,
                "complete": self.missing is None,
                "missing": self.missing,
            },
        }
        with ck.flight.watch("snapshot: save (DCP)", self.group, f"step {step}"):
            write_and_publish(
                state,
                tmp,
                self.group,
                self.first,
                self.folder,
                step,
                info,
                KEEP,
                partial_planner(f"snapshot-{id(self)}"),
            )
        self.events.append({"step": step, "s": round(time.perf_counter() - t0, 4)})

    def held(self) -> dict[int, dict]:
        """{step: the manifest's snapshot record} of this node's intact snapshots of the run."""
        out = {}
        for folder in checkpoints(self.folder):
            try:
                manifest = verify(folder)
            except CheckpointError:
                continue
            if run_of(folder) == self.ckpt.run_id:
                out[manifest["step"]] = {
                    **manifest.get("snapshot", {}),
                    "layout": manifest["layout"],
                    "world_size": manifest["world_size"],
                }
        return out

    def usable(self, record: dict) -> bool:
        """Whether this rank can restore a snapshot of its node: a whole one, or in a restart of
        the same layout with the node's ranks as they were, the shards they saved."""
        return record.get("complete") or (
            record["layout"] == self.ckpt.layout
            and record.get("ranks") == self.ranks
            and record["world_size"] == dist.get_world_size()
        )

    def choose(self, disk_step: int | None) -> tuple[str | None, str | None]:
        """Every rank, at the start: (this node's snapshot folder to restore, or None for the disk
        checkpoint; a line saying why a newer snapshot cannot serve, or None)."""
        held = self.held()
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (self.node, held, {s for s, r in held.items() if self.usable(r)}))
        best = max(set.intersection(*(ok for _, _, ok in everyone)), default=None)
        disk = -1 if disk_step is None else disk_step
        if best is not None and best > disk:
            return os.path.join(self.folder, f"{PREFIX}{best:08d}"), None
        newest = max((s for _, held, _ in everyone for s in held), default=-1)
        if newest <= disk:
            return None, None
        return None, f"the in-memory snapshot of step {newest} cannot be restored: {why_not(everyone, newest)}"

    def close(self) -> None:
        """The run is over: this node's snapshots go (the disk checkpoints stay)."""
        if self.first:
            shutil.rmtree(self.folder, ignore_errors=True)
            try:
                os.rmdir(self.base)
            except OSError:
                pass


def why_not(everyone: list, step: int) -> str:
    """Why the nodes' snapshots (node, {step: record}, usable steps) cannot restore `step`."""
    for node, held, ok in everyone:
        if step in held and step not in ok:
            return (
                f"node {node} holds only its ranks' shards (of {held[step].get('missing')}, for one), and the "
                f"world changed: the only copy of the others was on a lost node, as under ZeRO or tp or pp "
                f"across nodes"
            )
    node = next(n for n, held, _ in everyone if step not in held)
    return f"node {node} has none (it joined since, or lost it)"


def remove_gone_nodes(root: str) -> None:
    """Snapshot folders of this host whose agent has ended (a crashed run's), under every run."""
    host = socket.gethostname()
    runs_here = [os.path.join(root, r) for r in os.listdir(root)] if os.path.isdir(root) else []
    for run in filter(os.path.isdir, runs_here):
        for name in os.listdir(run):
            who, _, pid = name.rpartition("-")
            if who == host and pid.isdigit() and runs.gone(int(pid)):
                shutil.rmtree(os.path.join(run, name), ignore_errors=True)
