"""Alpha-beta times of collectives and send/recv on a `Link`, and which mesh axes cross nodes.

A ring collective over n ranks takes its steps x alpha plus the bytes each rank sends / beta, with
comm/collectives.py's byte factors; a pipelined binary tree all-reduce takes 2 log2(n) alpha +
2 S / beta (the alpha-beta model of Thakur et al. 2005; NCCL picks between the two by size, gloo
here runs ring). The data-parallel all-reduce can also be one of our own (`--allreduce`: ring,
tree, Horovod's hierarchical; comm/algorithms.py), priced by that module's own alpha-beta model
over the send/recv links inside and between nodes. Nodes hold consecutive ranks, laid out as
`mesh.Mesh` lays them (tp, then pp, inside a node; dp across).
"""

from __future__ import annotations

import functools
import math

from paratrain.comm.algorithms import group_node_size, predicted_times
from paratrain.comm.collectives import RING_FACTOR
from paratrain.mesh import axis_groups, node_order
from paratrain.planner.hardware import Hardware, Link

ALLREDUCE = ("backend", "ring", "tree", "hierarchical", "auto")  # `--allreduce`, as `paratrain train` takes it

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


def dp_all_reduce_time(algorithm: str, nbytes: float, n: int, calls: int, hw: Hardware, flows: int,
                       node_size: int | None) -> tuple[float, str]:
    """(seconds, algorithm run) of `calls` data-parallel all-reduces of `nbytes` in all over n ranks.
    `backend`: the backend's own (gloo's ring over the flat group) on the collective's calibrated
    line; ring, tree, hierarchical: comm.algorithms.predicted_times over the send/recv links, inside
    the node and the node's link (`flows` groups share it); `auto`: the cheapest of those, as
    `choose` picks per bucket. A hierarchical all-reduce of a group on one level runs the backend's."""
    if n <= 1 or nbytes <= 0 or calls < 1:
        return 0.0, algorithm
    if algorithm != "backend":
        links = {"intra": hw.p2p_link(False), "inter": hw.p2p_link(flows)}
        times = predicted_times(nbytes / calls, n, node_size, links)
        name = min(times, key=times.get) if algorithm == "auto" else algorithm
        if name in times:
            return calls * times[name], name
    link = hw.link(flows, "all_reduce")
    return collective_time("all_reduce", nbytes, n, link, calls, hw.algorithms), "backend"


@functools.lru_cache(maxsize=None)
def node_flows(dp: int, tp: int, pp: int, axis: str, gpus_per_node: int) -> int:
    """How many groups along `axis` that span nodes have ranks on one node, at most over the nodes:
    the transfers that share a node's link when the axis's groups communicate at once (0: none
    spans two nodes). Nodes hold consecutive ranks, laid out as `mesh.Mesh` lays them."""
    shape, world = {"pp": pp, "dp": dp, "tp": tp}, dp * tp * pp
    if shape[axis] == 1 or world <= gpus_per_node:
        return 0
    groups = axis_groups(shape, axis, node_order(world, gpus_per_node))
    nodes = [{r // gpus_per_node for r in g} for g in groups]
    crossing = [k for k in nodes if len(k) > 1]
    return max((sum(node in k for k in crossing) for node in range(-(-world // gpus_per_node))), default=0)


def crosses_node(dp: int, tp: int, pp: int, axis: str, gpus_per_node: int) -> bool:
    """Does any group along `axis` span two nodes (tp, then pp, inside a node, dp across)?"""
    return node_flows(dp, tp, pp, axis, gpus_per_node) > 0


@functools.lru_cache(maxsize=None)
def axis_node_size(dp: int, tp: int, pp: int, axis: str, gpus_per_node: int) -> int | None:
    """The node_size comm/reduction.py gives the algorithms for a group along `axis`: its ranks per
    node (comm.algorithms.group_node_size), None inside one node."""
    shape, world = {"pp": pp, "dp": dp, "tp": tp}, dp * tp * pp
    if world <= gpus_per_node:
        return None
    return group_node_size(axis_groups(shape, axis, node_order(world, gpus_per_node))[0], gpus_per_node)
