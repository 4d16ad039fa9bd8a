"""The data-parallel gradient all-reduce, by the algorithm the run chose (`--allreduce`).

`backend` is torch.distributed's own all-reduce, launched asynchronously as each bucket fills (gloo
runs a ring whatever the size; NCCL picks ring or tree). Our algorithms (comm/algorithms.py: ring,
tree, hierarchical) are synchronous sequences of point-to-point steps and group collectives; to
keep the overlap with backward they run on one communication thread that takes the buckets in
the order they were launched, the same order on every rank (Horovod's background thread does the
same). `auto` picks per bucket the algorithm the alpha-beta model of the links predicts fastest.
The thread's sends are counted in a CommStats per bucket, added to the step's when the bucket is
waited for, and fingerprinted in a flight recorder of its own that the hang watchdog also reads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from paratrain.comm.algorithms import Hierarchy, all_reduce_with, choose, group_node_size
from paratrain.comm.collectives import CommStats, all_reduce
from paratrain.comm.flight import FlightRecorder


class _Pending:
    """A bucket on the communication thread: wait() joins it and adds its counts to the step's."""

    def __init__(self, future, stats: CommStats, into: CommStats):
        self.future, self.stats, self.into = future, stats, into

    def wait(self) -> None:
        self.future.result()
        self.into.bytes += self.stats.bytes
        self.into.inter_bytes += self.stats.inter_bytes
        self.into.calls.update(self.stats.calls)


class GradientAllReduce:
    """The all-reduce of one mesh axis's gradients (the dp group). Built on every rank at the same
    point (the hierarchical algorithm creates its node groups here, a collective over the world)."""

    def __init__(self, algorithm: str, mesh, axis: str = "dp", links: dict | None = None):
        from paratrain.mesh import axis_groups

        self.algorithm, self.mesh, self.group = algorithm, mesh, mesh.group(axis)
        self.n = mesh.size(axis)
        ranks = mesh.ranks(axis)
        self.node_size = group_node_size(ranks, mesh.node_size) if mesh.node_size else None
        if algorithm in ("hierarchical", "auto") and self.node_size:
            Hierarchy.build(self.group, self.node_size, groups=axis_groups(mesh.shape, axis, mesh.order))
        self.links = links if links is not None or algorithm != "auto" else link_model(mesh)
        self.flight = FlightRecorder()  # the thread's own fingerprints, for the hang watchdog
        self.pool = None if algorithm == "backend" or self.n == 1 else ThreadPoolExecutor(
            1, thread_name_prefix="paratrain-allreduce")

    def chosen(self, t: torch.Tensor) -> str:
        return choose(self.algorithm, t.numel() * t.element_size(), self.n, self.node_size, self.links)

    def start(self, t: torch.Tensor):
        """Begin summing `t` in place over the group; returns a handle whose wait() finishes it."""
        if self.pool is None:
            return all_reduce(t, self.group, self.mesh.comm, async_op=True)
        stats = CommStats(flight=self.flight, node_size=self.mesh.comm.node_size)
        algorithm = self.chosen(t)
        return _Pending(self.pool.submit(all_reduce_with, t, self.group, stats, algorithm, self.node_size),
                        stats, self.mesh.comm)

    def run(self, t: torch.Tensor) -> None:
        """Sum `t` in place over the group, now (after backward: no overlap to keep)."""
        if self.pool is None:
            all_reduce(t, self.group, self.mesh.comm)
        else:
            all_reduce_with(t, self.group, self.mesh.comm, self.chosen(t), self.node_size)


def link_model(mesh) -> dict:
    """The alpha-beta links `auto` chooses by: this machine's calibration on CPU (`paratrain plan
    --calibrate`; conservative defaults without one), the H100 preset's NVLink and NIC on GPUs."""
    from paratrain.planner.hardware import cpu_local, get_hardware

    hw = cpu_local() if mesh.device_type == "cpu" else get_hardware("h100-80gb")
    return {"intra": (hw.intra.alpha, hw.intra.beta), "inter": (hw.inter.alpha, hw.inter.beta)}
