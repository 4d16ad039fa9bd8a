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
