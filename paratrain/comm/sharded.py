"""ZeRO's reduce-scatter and all-gather with our algorithms (`--allreduce` under `--zero 1/2/3`).

A flat buffer of n equal chunks over a group of n ranks; group rank r owns chunk r (ZeRO's shard).
- ring: the ring all-reduce's two halves (Patarasuk & Yuan 2009), each n-1 steps of one chunk;
  the reduce-scatter leaves rank r with the sum of chunk r, the all-gather spreads chunk r.
- hierarchical: the two-level reduce-scatter of Horovod's hierarchical all-reduce, kept sharded.
  With nodes of L ranks (N nodes, rank r = g L + i: node g, local index i), the buffer read as
  [N, L, S] is first reduce-scattered inside the node over its L rows of local index i
  (((L-1)/L of the buffer over the node's fast links), then the row of local index i, [N, S], is
  reduce-scattered across the N nodes between the ranks of local index i (each sends (N-1)/N of
  it, 1/L of the buffer, through the node's link): rank g L + i ends with chunk g L + i. The
  all-gather runs the same steps backwards. Across nodes each node sends (N-1)/N of the buffer,
  the ring's (n-1)/n of it per rank but from every rank of a node at once.
- backend: torch.distributed's own collectives.
The tree reduces to one root and has no sharded form: `tree` is refused with ZeRO stages 1-3.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from paratrain.comm.algorithms import Hierarchy, ring_phases, two_levels
from paratrain.comm.collectives import CommStats, all_gather_flat, opaque, reduce_scatter_flat

SHARDED_ALGORITHMS = ("backend", "ring", "hierarchical")


@opaque
def ring_reduce_scatter(out: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup | None,
                        stats: CommStats) -> torch.Tensor:
    """`out` = this rank's chunk of the sum of `flat` over `group` (`flat`, n equal chunks, is
    overwritten: it is the ring's working buffer)."""
    group = group if group is not None else dist.group.WORLD
    n, me = dist.get_world_size(group), dist.get_rank(group)
    if n > 1:
        ring_phases(flat, group, stats, reduce=True, gather=False, shift=-1)
    size = flat.numel() // n
    return out.copy_(flat[me * size:(me + 1) * size])


@opaque
def ring_all_gather(full: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup | None,
                    stats: CommStats) -> torch.Tensor:
    """`full` (n x shard, flat) = every rank's `shard` in group-rank order."""
    group = group if group is not None else dist.group.WORLD
    n, me = dist.get_world_size(group), dist.get_rank(group)
    size = shard.numel()
    full[me * size:(me + 1) * size].copy_(shard)
    if n > 1:
        ring_phases(full, group, stats, reduce=False, gather=True, shift=-1)
    return full


def _levels(group: dist.ProcessGroup | None, node_size: int | None) -> tuple[dist.ProcessGroup, Hierarchy | None, int]:
    """The group, its two levels (None: one level) and its number of nodes."""
    group = group if group is not None else dist.group.WORLD
    n = dist.get_world_size(group)
    if not two_levels(n, node_size):
        return group, None, 1
    return group, Hierarchy.of(group, node_size), n // node_size


@opaque
def hierarchical_reduce_scatter(out: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup | None,
                                stats: CommStats, node_size: int | None) -> torch.Tensor:
    """`out` = this rank's chunk of the sum of `flat` over `group`: inside the node, then across
    (module docstring). A group of one level takes the ring's reduce-scatter."""
    group, h, nodes = _levels(group, node_size)
    if h is None:
        return ring_reduce_scatter(out, flat, group, stats)
    size = out.numel()
    rows = flat.view(nodes, node_size, size).transpose(0, 1).contiguous()  # [L, N, S]: row i = local index i
    ring_phases(rows.view(-1), h.intra, stats, reduce=True, gather=False, shift=-1)
    mine = rows[dist.get_rank(h.intra)].view(-1)  # summed over the node
    ring_phases(mine, h.inter, stats, reduce=True, gather=False, shift=-1)
    node = dist.get_rank(h.inter)
    return out.copy_(mine[node * size:(node + 1) * size])


@opaque
def hierarchical_all_gather(full: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup | None,
                            stats: CommStats, node_size: int | None) -> torch.Tensor:
    """`full` = every rank's `shard` in group-rank order: across the nodes between the ranks of one
    local index, then inside the node."""
    group, h, nodes = _levels(group, node_size)
    if h is None:
        return ring_all_gather(full, shard, group, stats)
    size = shard.numel()
    rows = torch.empty((node_size, nodes, size), dtype=shard.dtype, device=shard.device)
    mine = rows[dist.get_rank(h.intra)].view(-1)
    ring_all_gather(mine, shard, h.inter, stats)
    ring_phases(rows.view(-1), h.intra, stats, reduce=False, gather=True, shift=-1)
    full.view(nodes, node_size, size).copy_(rows.transpose(0, 1))
    return full


def _backend_reduce_scatter(out, flat, group, stats, node_size=None):
    reduce_scatter_flat(out, flat, group, stats)
    return out


def _backend_all_gather(full, shard, group, stats, node_size=None):
    all_gather_flat(full, shard, group, stats)
    return full


# op -> algorithm -> fn(dest, src, group, stats, node_size)
_BY_ALGORITHM = {
    "reduce_scatter": {"backend": _backend_reduce_scatter, "hierarchical": hierarchical_reduce_scatter,
                       "ring": lambda out, flat, group, stats, _ns=None: ring_reduce_scatter(out, flat, group, stats)},
    "all_gather": {"backend": _backend_all_gather, "hierarchical": hierarchical_all_gather,
                   "ring": lambda full, shard, group, stats, _ns=None: ring_all_gather(full, shard, group, stats)},
}


def _dispatch(op: str, dest, src, group, stats, algorithm: str, node_size: int | None) -> torch.Tensor:
    fn = _BY_ALGORITHM[op].get(algorithm)
    if fn is None:
        raise ValueError(f"{op.replace('_', '-')} algorithm must be one of {', '.join(SHARDED_ALGORITHMS)}, "
                         f"got {algorithm!r}")
    return fn(dest, src, group if group is not None else dist.group.WORLD, stats, node_size)


def reduce_scatter_with(out: torch.Tensor, flat: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats,
                        algorithm: str, node_size: int | None = None) -> torch.Tensor:
    """`out` = this rank's 1/n of the sum of `flat` over `group`, by `algorithm` (SHARDED_ALGORITHMS;
    ours overwrite `flat`), synchronously."""
    return _dispatch("reduce_scatter", out, flat, group, stats, algorithm, node_size)


def all_gather_with(full: torch.Tensor, shard: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats,
                    algorithm: str, node_size: int | None = None) -> torch.Tensor:
    """`full` = every rank's `shard` in group-rank order, by `algorithm`, synchronously."""
    return _dispatch("all_gather", full, shard, group, stats, algorithm, node_size)
