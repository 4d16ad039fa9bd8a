"""The process mesh: named axes over the world, and one process group per axis.

On one machine ranks are laid out row-major over (pp, dp, tp), so tp varies fastest: the ranks
of a tensor-parallel group are consecutive. Across nodes (torchrun's local world size below the
world size) the order is (dp, pp, tp): tp, then pp, inside a node (consecutive ranks are a node's
under torchrun), and dp across nodes, where only the gradient reduction crosses the slower link
(Narayanan et al. 2021, section 3.3). A `Mesh` is created once per run and passed explicitly to
every strategy; nothing here is global state. It is built on torch's `DeviceMesh`, which later
strategies and distributed checkpoints use directly.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

import torch.distributed as dist

from paratrain.comm import CommStats

AXES = ("pp", "dp", "tp")  # one machine's order (slowest first)
NODE_AXES = ("dp", "pp", "tp")  # across nodes: dp the slowest, so only dp groups span nodes


def rank_of(coords: dict[str, int], shape: dict[str, int], order: tuple[str, ...] = AXES) -> int:
    """Global rank of the process at `coords` in a mesh of `shape` (row-major over `order`)."""
    rank = 0
    for axis in order:
        rank = rank * shape[axis] + coords[axis]
    return rank


def coords_of(rank: int, shape: dict[str, int], order: tuple[str, ...] = AXES) -> dict[str, int]:
    coords = {}
    for axis in reversed(order):
        rank, coords[axis] = divmod(rank, shape[axis])
    return {axis: coords[axis] for axis in AXES}


def axis_groups(shape: dict[str, int], axis: str, order: tuple[str, ...] = AXES) -> list[list[int]]:
    """All groups along `axis`: each is the ranks that differ only in their `axis` coordinate.

    Pure (no processes): the unit tests check it for every layout, and `Mesh` checks that the
    process groups torch builds contain exactly these ranks.
    """
    others = [a for a in order if a != axis]
    groups = []
    for fixed in itertools.product(*(range(shape[a]) for a in others)):
        base = dict(zip(others, fixed))
        groups.append([rank_of({**base, axis: i}, shape, order) for i in range(shape[axis])])
    return groups


def embedding_groups(shape: dict[str, int], order: tuple[str, ...] = AXES) -> list[list[int]]:
    """For each pp group, its first and last rank: the stages that hold the tied embedding."""
    return [[g[0], g[-1]] for g in axis_groups(shape, "pp", order)]


def node_order(world: int, node_size: int | None) -> tuple[str, ...]:
    """The layout order for a world of `world` ranks on nodes of `node_size` (None: one node)."""
    return NODE_AXES if node_size and node_size < world else AXES


def local_world_size() -> int | None:
    """Ranks per node under torchrun (its LOCAL_WORLD_SIZE), else None."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() else None


@dataclass
class Mesh:
    """This rank's view of the pp x dp x tp mesh: sizes, coordinates and process groups."""

    shape: dict[str, int]
    rank: int
    device_mesh: object  # torch.distributed.device_mesh.DeviceMesh
    device_type: str
    comm: CommStats = field(default_factory=CommStats)  # what this rank's collectives sent
    embedding_group: dist.ProcessGroup | None = None  # first + last pipeline stage, if pp > 1
    world_group: dist.ProcessGroup | None = None  # all ranks of the mesh (None: the default group)
    groups: dict[str, dist.ProcessGroup] | None = None  # given groups instead of the device mesh's
    order: tuple[str, ...] = AXES  # the axes slowest first (NODE_AXES across nodes)
    node_size: int | None = None  # ranks per node (consecutive ranks), None: all on one node

    @classmethod
    def build(cls, dp: int = 1, tp: int = 1, pp: int = 1, device_type: str = "cpu",
              node_size: int | None = None) -> "Mesh":
        """Create the mesh over the default process group (which must already be initialised);
        `node_size`: ranks per node (default: torchrun's local world size)."""
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if dp * tp * pp != world:
            raise ValueError(f"mesh pp={pp} x dp={dp} x tp={tp} does not match world size {world}")
        node_size = node_size or local_world_size()
        node_size = node_size if node_size and node_size < world and world % node_size == 0 else None
        order = node_order(world, node_size)
        shape = {"pp": pp, "dp": dp, "tp": tp}
        device_mesh = init_device_mesh(device_type, tuple(shape[a] for a in order), mesh_dim_names=order)
        mesh = cls(shape, dist.get_rank(), device_mesh, device_type, order=order, node_size=node_size)
        mesh.comm.node_size = node_size  # bytes to other nodes are counted apart
        for axis in AXES:
            got = dist.get_process_group_ranks(mesh.group(axis))
            assert got == mesh.ranks(axis), f"{axis} group {got} != expected {mesh.ranks(axis)}"
        if pp > 1:  # first and last stage share the tied embedding: one group per (dp, tp) pair
            for pair in embedding_groups(mesh.shape, order):
                group = dist.new_group(pair)  # every rank takes part in creating every group
                if mesh.rank in pair:
                    mesh.embedding_group = group
        return mesh

    @classmethod
    def of_one(cls, group: dist.ProcessGroup, device_type: str = "cpu") -> "Mesh":
        """A mesh of this process alone inside a larger world (a parameter-server worker): every
        axis of size one on `group`, a group holding only this rank."""
        return cls({"pp": 1, "dp": 1, "tp": 1}, 0, None, device_type, world_group=group,
                   groups={axis: group for axis in AXES})

    @property
    def world_size(self) -> int:
        return self.shape["pp"] * self.shape["dp"] * self.shape["tp"]

    def size(self, axis: str) -> int:
        return self.shape[axis]

    def coord(self, axis: str) -> int:
        """This rank's index along `axis` (its rank inside that axis's group)."""
        return coords_of(self.rank, self.shape, self.order)[axis]

    def coords(self, rank: int) -> dict[str, int]:
        """Any rank's coordinates in this mesh."""
        return coords_of(rank, self.shape, self.order)

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along `axis`, in group order."""
        return next(g for g in axis_groups(self.shape, axis, self.order) if self.rank in g)

    def node_of(self, rank: int) -> int:
        """The node holding `rank` (consecutive ranks share a node); 0 on one node."""
        return rank // self.node_size if self.node_size else 0

    def spans_nodes(self, axis: str) -> bool:
        """Does this rank's group along `axis` cross nodes?"""
        return len({self.node_of(r) for r in self.ranks(axis)}) > 1

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.groups[axis] if self.groups else self.device_mesh.get_group(axis)

    def __str__(self) -> str:
        c = coords_of(self.rank, self.shape, self.order)
        return f"rank {self.rank} at pp={c['pp']},dp={c['dp']},tp={c['tp']} of {self.shape}"
