"""Alpha-beta times of collectives and send/recv on a `Link`, and which mesh axes cross nodes.

A ring collective over n ranks takes its steps x alpha plus the bytes each rank sends / beta, with
comm/collectives.py's byte factors; a pipelined binary tree all-reduce takes 2 log2(n) alpha +
2 S / beta (the alpha-beta model of Thakur et al. 2005; NCCL picks between the two by size, gloo
here runs ring). Ranks are laid out pp x dp x tp with tp fastest, and nodes hold consecutive ranks.
"""

from __future__ import annotations

import functools
import math

from paratrain.comm.collectives import RING_FACTOR
from paratrain.mesh import axis_groups, node_order
from paratrain.planner.hardware import Link

STEPS = {"all_reduce": lambda n: 2 * (n - 1), "reduce_scatter": lambda n: n - 1, "all_gather": lambda n: n - 1}


def ring_time(op: str, input_bytes: float, n: int, link: Link) -> float:
    """Ring collective over n ranks: steps x alpha + bytes each rank sends / beta, with
    collectives.py's byte factors (input: the tensor of all_reduce, the full input of
    reduce_scatter, the shard of all_gather). All-reduce: 2(n-1) alpha + 2(n-1)/n S / beta."""
    if n <= 1 or input_bytes <= 0:
        return 0.0
    return STEPS[op](n) * link.alpha + RING_FACTOR[op](n) * input_bytes / link.beta


def tree_all_reduce_time(nbytes: float, n: int, link: Link) -> float:
    """Pipelined binary tree (reduce up, broadcast down): 2 log2(n) alpha + 2 S / beta."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.alpha + 2 * nbytes / link.beta


def all_reduce_time(nbytes: float, n: int, link: Link, algorithms: tuple[str, ...] = ("ring",)) -> float:
    """The cheaper of the backend's algorithms (NCCL chooses by size; gloo here: ring)."""
    times = [ring_time("all_reduce", nbytes, n, link)]
    if "tree" in algorithms:
        times.append(tree_all_reduce_time(nbytes, n, link))
    return min(times)


def collective_time(op: str, full_bytes: float, n: int, link: Link, calls: int = 1,
                    algorithms: tuple[str, ...] = ("ring",)) -> float:
    """`calls` collectives `op` over n ranks moving `full_bytes` in all (the full tensor: the
    input of all-reduce and reduce-scatter, the output of all-gather): each call pays its alpha."""
    if n <= 1 or full_bytes <= 0 or calls < 1:
        return 0.0
    per = full_bytes / calls
    if op == "all_reduce":
        return calls * all_reduce_time(per, n, link, algorithms)
    return calls * ring_time(op, per if op == "reduce_scatter" else per / n, n, link)


def p2p_time(nbytes: float, link: Link) -> float:
    return link.alpha + nbytes / link.beta if nbytes > 0 else 0.0


@functools.lru_cache(maxsize=None)
def crosses_node(dp: int, tp: int, pp: int, axis: str, gpus_per_node: int) -> bool:
    """Does any group along `axis` span two nodes (nodes hold consecutive ranks, laid out as
    `mesh.Mesh` lays them across nodes: tp, then pp, inside a node, dp across)?"""
    shape = {"pp": pp, "dp": dp, "tp": tp}
    if shape[axis] == 1 or dp * tp * pp <= gpus_per_node:
        return False
    order = node_order(dp * tp * pp, gpus_per_node)
    return any(len({r // gpus_per_node for r in g}) > 1 for g in axis_groups(shape, axis, order))
