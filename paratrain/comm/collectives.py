"""Thin wrappers over torch.distributed collectives that record every call.

Each call adds one to the count of its operation (tests assert the collectives a scheme
promises) and the bytes this rank sends for it under the bandwidth-optimal ring algorithms that
gloo and NCCL use, for a payload of S bytes over n ranks: all-reduce 2(n-1)/n S, reduce-scatter
(n-1)/n S of its input, all-gather (n-1) S of its input, broadcast (n-1)/n S. The trainer sums
them over ranks for the metrics' `comm_bytes`. So an all-reduce and the reduce-scatter plus
all-gather that replace it under sequence parallelism count the same, as they should. A
point-to-point send (`send`, `isend`) counts its payload; a receive counts nothing (its bytes are
the sender's) but is fingerprinted, so a rank waiting for a peer, or for any peer, shows in a
hang report as `recv from 3` or `recv from any`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paratrain.comm.flight import Fingerprint, FlightRecorder


# torch.compile does not trace into these wrappers: their bookkeeping (byte counts, the flight
# recorder's sequence numbers, call sites) would make it recompile at every call. A compiled
# block breaks its graph around each collective and runs the collective as it is.
opaque = torch.compiler.disable


RING_FACTOR = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_gather": lambda n: n - 1,
    "broadcast": lambda n: (n - 1) / n,
    "send": lambda n: 1,  # point to point
}


@dataclass
class CommStats:
    bytes: int = 0
    calls: Counter = field(default_factory=Counter)
    flight: FlightRecorder = field(default_factory=FlightRecorder)  # fingerprints (hang diagnostics)
    node_size: int | None = None  # ranks per node (consecutive ranks) when the mesh spans nodes
    inter_bytes: int = 0  # of `bytes`, those sent to another node
    _rings: dict = field(default_factory=dict, repr=False)  # group -> does my ring successor sit on another node

    def record(self, op: str, tensor: torch.Tensor, group: dist.ProcessGroup | None,
               label: str | None = None, peer: int | None = None) -> Fingerprint:
        """Count `op` and its bytes; the fingerprint names it `label` (e.g. `send to 3`) or `op`.
        Across nodes, the bytes go to another node when the peer (a send's destination, a ring
        collective's successor) is on one."""
        fp = self.flight.record(label or op, tensor, group)
        n = dist.get_world_size(group)
        if n == 1:
            return fp  # a group of one sends nothing
        size = round(tensor.numel() * tensor.element_size() * RING_FACTOR[op](n))
        self.bytes += size
        self.calls[op] += 1
        if self.node_size and self._crosses(group, peer):
            self.inter_bytes += size
        return fp

    def _crosses(self, group: dist.ProcessGroup | None, peer: int | None) -> bool:
        me = dist.get_rank()
        if peer is not None:
            return peer // self.node_size != me // self.node_size
        key = id(group)
        if key not in self._rings:
            ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
            nxt = ranks[(ranks.index(me) + 1) % len(ranks)]
            self._rings[key] = nxt // self.node_size != me // self.node_size
        return self._rings[key]

    def reset(self) -> None:
        self.bytes = self.inter_bytes = 0
        self.calls.clear()


def _issue(stats: CommStats, fp: Fingerprint, call, async_op: bool):
    """Run a collective marked in flight (until it returns, or until its handle is waited on)."""
    if async_op:
        return stats.flight.track(call(), fp)
    stats.flight.begin(fp)
    try:
        return call()
    finally:
        stats.flight.end()


@opaque
def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup, stats: CommStats,
               op: dist.ReduceOp = dist.ReduceOp.SUM, async_op: bool = False):
    fp = stats.record("all_reduce", tensor, group)
    return _issue(stats, fp, lambda: dist.all_reduce(tensor, op=op, group=group, async_op=async_op), async_op)


@opaque
def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup, stats: CommStats,
              async_op: bool = False):
    """Broadcast from global rank `src` to every rank of `group`."""
    fp = stats.record("broadcast", tensor, group)
    return _issue(stats, fp, lambda: dist.broadcast(tensor, src=src, group=group, async_op=async_op), async_op)


# torch 2.13 renamed the tensor forms of these two collectives; accept both spellings.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@opaque
def all_gather(tensor: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, dim: int = 0) -> torch.Tensor:
    """Concatenate every rank's `tensor` along `dim`, in group-rank order."""
    n = dist.get_world_size(group)
    fp = stats.record("all_gather", tensor, group)
    x = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _issue(stats, fp, lambda: _all_gather_single(out, x, group=group), False)
    return out.movedim(0, dim)


@opaque
def reduce_scatter(tensor: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, dim: int = 0) -> torch.Tensor:
    """Sum over ranks, then keep this rank's chunk of the result along `dim`."""
    n = dist.get_world_size(group)
    fp = stats.record("reduce_scatter", tensor, group)
    x = tensor.movedim(dim, 0).contiguous()
    out = torch.empty((x.shape[0] // n, *x.shape[1:]), dtype=x.dtype, device=x.device)
    _issue(stats, fp, lambda: _reduce_scatter_single(out, x, group=group), False)
    return out.movedim(0, dim)


@opaque
def send(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None, stats: CommStats, tag: int = 0) -> None:
    """Blocking send to global rank `dst`."""
    fp = stats.record("send", tensor, group, f"send to {dst}", peer=dst)
    _issue(stats, fp, lambda: dist.send(tensor, dst=dst, group=group, tag=tag), False)


@opaque
def isend(tensor: torch.Tensor, dst: int, group: dist.ProcessGroup | None, stats: CommStats, tag: int = 0):
    """Non-blocking send to global rank `dst`; returns the work handle."""
    fp = stats.record("send", tensor, group, f"send to {dst}", peer=dst)
    return _issue(stats, fp, lambda: dist.isend(tensor, dst=dst, group=group, tag=tag), True)


@opaque
def recv(tensor: torch.Tensor, src: int | None, group: dist.ProcessGroup | None, tag: int = 0,
         stats: CommStats | None = None) -> int:
    """Blocking receive into `tensor` from global rank `src`, or from any rank of `group` with
    `src=None`; returns the sender's global rank. With `stats` the wait is fingerprinted."""
    if stats is None:
        return dist.recv(tensor, src=src, group=group, tag=tag)
    fp = stats.flight.record(f"recv from {'any' if src is None else src}", tensor, group)
    return _issue(stats, fp, lambda: dist.recv(tensor, src=src, group=group, tag=tag), False)


class _Works:
    """Several handles waited on as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self, *args, **kwargs) -> bool:
        for w in self.works:
            w.wait(*args, **kwargs)
        return True  # as a c10d Work's wait

    def is_completed(self) -> bool:
        return all(w.is_completed() for w in self.works)


def _gather_in_place(out: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup, async_op: bool):
    """The all-gather as one broadcast per rank into its slice of `out`. gloo stages
    all_gather_into_tensor through a temporary as large as `out` (ZeRO-3 prefetches one block
    ahead, so a third block-sized buffer would be alive at backward's peak); a broadcast
    reads and writes the tensor it is given."""
    chunks = out.view(dist.get_world_size(group), -1)
    chunks[dist.get_rank(group)].copy_(shard.reshape(-1))  # a no-op when already in place
    works = _Works([dist.broadcast(c, group=group, async_op=True, group_src=i) for i, c in enumerate(chunks)])
    if async_op:
        return works
    works.wait()


def _all_gather_into(out: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup, async_op: bool):
    if out.device.type == "cpu" and dist.get_backend(group) == "gloo" and shard.is_contiguous():
        return _gather_in_place(out, shard, group, async_op)
    return _all_gather_single(out, shard, group=group, async_op=async_op)


@opaque
def all_gather_flat(out: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup, stats: CommStats,
                    async_op: bool = False):
    """`out` (n * shard.numel(), flat) receives every rank's `shard` in group-rank order."""
    fp = stats.record("all_gather", shard, group)
    return _issue(stats, fp, lambda: _all_gather_into(out, shard, group, async_op), async_op)


@opaque
def reduce_scatter_flat(out: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup, stats: CommStats,
                        async_op: bool = False):
    """`out` receives this rank's 1/n chunk of the sum over ranks of `flat`."""
    fp = stats.record("reduce_scatter", flat, group)
    return _issue(stats, fp, lambda: _reduce_scatter_single(out, flat, group=group, async_op=async_op), async_op)
