"""The data-parallel gradient reduction by the algorithm the run chose (`--allreduce`): the
all-reduce of plain dp and ZeRO-0, and ZeRO-1/2/3's reduce-scatter of gradients and all-gather of
parameters.

`backend` is torch.distributed's own collectives, launched asynchronously (gloo runs a ring
whatever the size; NCCL picks ring or tree). Our algorithms (comm/algorithms.py: ring, tree,
hierarchical; comm/sharded.py: their reduce-scatter and all-gather) are synchronous sequences of
point-to-point steps and group collectives; to keep the overlap with compute they run on one
communication thread that takes the collectives in the order they were started, the same order on
every rank (Horovod's background thread does the same). `auto` times the candidates on the group
the first time it meets a shape and takes the fastest (comm/tuning.py). The thread's sends are
counted in a CommStats per call, added to the step's when the call is waited for, and
fingerprinted in a flight recorder of its own that the hang watchdog also reads.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from paratrain.comm.algorithms import Hierarchy, all_reduce_with, group_node_size
from paratrain.comm.collectives import CommStats, all_gather_flat, all_reduce, reduce_scatter_flat
from paratrain.comm.flight import FlightRecorder
from paratrain.comm.sharded import SHARDED_ALGORITHMS, all_gather_with, reduce_scatter_with
from paratrain.comm.tuning import Tuner


class _Pending:
    """A call on the communication thread: wait() joins it and adds its counts to the step's."""

    def __init__(self, future, stats: CommStats, into: CommStats):
        self.future, self.stats, self.into = future, stats, into

    def wait(self) -> None:
        t0 = time.monotonic()
        self.future.result()
        self.into.flight.blocked_s += time.monotonic() - t0
        self.into.bytes += self.stats.bytes
        self.into.inter_bytes += self.stats.inter_bytes
        self.into.calls.update(self.stats.calls)
        self.stats = CommStats()  # counted once, however often it is waited for


class GradientAllReduce:
    """The reductions of one mesh axis's group (the dp group). Built on every rank at the same
    point (the hierarchical algorithms create their node groups here, a collective over the
    world). `sharded`: ZeRO-1/2/3 will reduce-scatter and all-gather through it too, which the
    tree cannot do."""

    def __init__(self, algorithm: str, mesh, axis: str = "dp", sharded: bool = False):
        from paratrain.mesh import axis_groups

        if sharded and algorithm not in (*SHARDED_ALGORITHMS, "auto"):
            raise ValueError(f"--allreduce {algorithm}: ZeRO-1/2/3 reduce-scatter and all-gather; the tree has no "
                             f"sharded form (choose {', '.join(SHARDED_ALGORITHMS)} or auto)")
        self.algorithm, self.mesh, self.group = algorithm, mesh, mesh.group(axis)
        self.n = mesh.size(axis)
        ranks = mesh.ranks(axis)
        self.node_size = group_node_size(ranks, mesh.node_size) if mesh.node_size else None
        if algorithm in ("hierarchical", "auto") and self.node_size:
            Hierarchy.build(self.group, self.node_size, groups=axis_groups(mesh.shape, axis, mesh.order))
        self.flight = FlightRecorder()  # the thread's own fingerprints, for the hang watchdog
        self.pool = None if algorithm == "backend" or self.n == 1 else ThreadPoolExecutor(
            1, thread_name_prefix="paratrain-allreduce")
        self.tuner = None
        if algorithm == "auto" and self.pool is not None:
            self.tuner = Tuner(self.group, self.node_size, CommStats(flight=self.flight))

    def _submit(self, op: str, fn, *tensors, like: torch.Tensor) -> _Pending:
        stats = CommStats(flight=self.flight, node_size=self.mesh.comm.node_size)

        def job():
            algorithm = self.tuner.pick(op, like) if self.tuner else self.algorithm
            fn(*tensors, self.group, stats, algorithm, self.node_size)

        return _Pending(self.pool.submit(job), stats, self.mesh.comm)

    def start(self, t: torch.Tensor):
        """Begin summing `t` in place over the group; returns a handle whose wait() finishes it."""
        if self.pool is None:
            return all_reduce(t, self.group, self.mesh.comm, async_op=True)
        return self._submit("all_reduce", all_reduce_with, t, like=t)

    def start_reduce_scatter(self, out: torch.Tensor, flat: torch.Tensor):
        """Begin `out` = this rank's 1/n of the sum of `flat` over the group (ours overwrite `flat`)."""
        if self.pool is None:
            return reduce_scatter_flat(out, flat, self.group, self.mesh.comm, async_op=True)
        return self._submit("reduce_scatter", reduce_scatter_with, out, flat, like=flat)

    def start_all_gather(self, full: torch.Tensor, shard: torch.Tensor):
        """Begin `full` = every rank's `shard` in group-rank order."""
        if self.pool is None:
            return all_gather_flat(full, shard, self.group, self.mesh.comm, async_op=True)
        return self._submit("all_gather", all_gather_with, full, shard, like=full)

    def run(self, t: torch.Tensor) -> None:
        """Sum `t` in place over the group, now (after the thread's earlier calls)."""
        self.start(t).wait()

    def reduce_scatter(self, out: torch.Tensor, flat: torch.Tensor) -> None:
        self.start_reduce_scatter(out, flat).wait()

    def all_gather(self, full: torch.Tensor, shard: torch.Tensor) -> None:
        self.start_all_gather(full, shard).wait()

    def choices(self) -> list[dict]:
        """What `auto` chose for each shape it met, with the seconds it measured (the same on every rank)."""
        if self.tuner is None:
            return []
        return [{"op": op, "bytes": numel * dtype.itemsize, "chose": chose, "seconds": self.tuner.timings[op, numel, dtype]}
                for (op, numel, dtype), chose in self.tuner.picked.items()]
