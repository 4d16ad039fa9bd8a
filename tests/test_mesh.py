"""Mesh: which ranks share each axis's group, for every layout of up to 8 ranks."""

import itertools

import pytest
import torch.distributed as dist

from helpers import spawn
from paratrain.mesh import AXES, Mesh, axis_groups, coords_of, rank_of


def layouts(max_world: int = 8):
    for pp, dp, tp in itertools.product(range(1, max_world + 1), repeat=3):
        if pp * dp * tp <= max_world:
            yield {"pp": pp, "dp": dp, "tp": tp}


@pytest.mark.parametrize("shape", list(layouts()), ids=lambda s: f"pp{s['pp']}dp{s['dp']}tp{s['tp']}")
def test_axis_groups_partition_the_world(shape):
    world = shape["pp"] * shape["dp"] * shape["tp"]
    for axis in AXES:
        groups = axis_groups(shape, axis)
        assert len(groups) == world // shape[axis]
        assert all(len(g) == shape[axis] for g in groups)
        assert sorted(r for g in groups for r in g) == list(range(world))
        for g in groups:  # members differ only in their coordinate along `axis`
            coords = [coords_of(r, shape) for r in g]
            assert [c[axis] for c in coords] == list(range(shape[axis]))
            for other in AXES:
                if other != axis:
                    assert len({c[other] for c in coords}) == 1
    # groups of two different axes meet in at most one rank
    for a, b in itertools.combinations(AXES, 2):
        for ga in axis_groups(shape, a):
            for gb in axis_groups(shape, b):
                assert len(set(ga) & set(gb)) <= 1
    for r in range(world):
        assert rank_of(coords_of(r, shape), shape) == r


def test_known_layout_dp2_tp2_pp2():
    shape = {"pp": 2, "dp": 2, "tp": 2}
    assert axis_groups(shape, "tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # consecutive: one node
    assert axis_groups(shape, "dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert axis_groups(shape, "pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _groups_of_every_layout(world):
    """In a spawned rank: build a Mesh for every (pp, dp, tp) of `world` and read its groups back."""
    seen = {}
    for shape in layouts(world):
        if shape["pp"] * shape["dp"] * shape["tp"] != world:
            continue
        mesh = Mesh.build(dp=shape["dp"], tp=shape["tp"], pp=shape["pp"])
        key = (shape["pp"], shape["dp"], shape["tp"])
        seen[key] = {
            axis: (dist.get_process_group_ranks(mesh.group(axis)), mesh.coord(axis), mesh.size(axis))
            for axis in AXES
        }
    return seen


# 8 processes on 2 cores take a while; every layout's groups are checked without processes above
@pytest.mark.parametrize("world", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_process_groups_match_the_layout(world):
    per_rank = spawn(_groups_of_every_layout, world, world)
    for rank, seen in enumerate(per_rank):
        assert len(seen) == sum(1 for s in layouts(world) if s["pp"] * s["dp"] * s["tp"] == world)
        for (pp, dp, tp), axes in seen.items():
            shape = {"pp": pp, "dp": dp, "tp": tp}
            for axis, (ranks, coord, size) in axes.items():
                expected = next(g for g in axis_groups(shape, axis) if rank in g)
                assert ranks == expected, (shape, axis, rank)
                assert coord == coords_of(rank, shape)[axis] and size == shape[axis]


def test_across_nodes_tp_then_pp_stay_inside_a_node_and_dp_crosses():
    """Nodes of 2 ranks: tp=2 is a node; pp=2 is a node; dp spans nodes (the only group that does)."""
    from paratrain.mesh import NODE_AXES, node_order

    assert node_order(4, 2) == NODE_AXES and node_order(4, 4) == AXES and node_order(4, None) == AXES
    for shape in ({"pp": 1, "dp": 2, "tp": 2}, {"pp": 2, "dp": 2, "tp": 1}, {"pp": 2, "dp": 2, "tp": 2}):
        for rank in range(8 if shape["tp"] * shape["pp"] == 4 else 4):
            assert rank_of(coords_of(rank, shape, NODE_AXES), shape, NODE_AXES) == rank
        node = 2 if shape["tp"] * shape["pp"] == 2 else 4
        for axis in ("tp", "pp"):
            assert all(len({r // node for r in g}) == 1 for g in axis_groups(shape, axis, NODE_AXES))
        assert all(len({r // node for r in g}) == 2 for g in axis_groups(shape, "dp", NODE_AXES))


def _node_mesh():
    import torch

    mesh = Mesh.build(dp=2, pp=2, node_size=2)
    t = torch.ones(1000)
    from paratrain.comm import all_reduce

    all_reduce(t, mesh.group("dp"), mesh.comm)
    pp_bytes = mesh.comm.bytes
    all_reduce(t, mesh.group("pp"), mesh.comm)
    return mesh.ranks("pp"), mesh.ranks("dp"), mesh.spans_nodes("dp"), mesh.spans_nodes("pp"), \
        mesh.comm.inter_bytes, mesh.comm.bytes - pp_bytes


def test_a_mesh_across_nodes_counts_the_bytes_that_leave_the_node():
    for rank, (pp, dp, dp_spans, pp_spans, inter, pp_bytes) in enumerate(spawn(_node_mesh, 4)):
        assert pp == [rank - rank % 2, rank - rank % 2 + 1] and dp == [rank % 2, rank % 2 + 2]
        assert dp_spans and not pp_spans
        assert inter == 4000 and pp_bytes == 4000  # the dp all-reduce crossed; the pp one stayed inside
