"""The process mesh: named axes pp x dp x tp over the world, and one process group per axis.

Ranks are laid out row-major over (pp, dp, tp), so tp varies fastest: the ranks of a
tensor-parallel group are consecutive and, under torchrun, on the same node, where the
bandwidth is highest. A `Mesh` is created once per run and passed explicitly to every strategy;
nothing here is global state. It is built on torch's `DeviceMesh`, which later strategies and
distributed checkpoints use directly.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch.distributed as dist

from paratrain.comm import CommStats

AXES = ("pp", "dp", "tp")


def rank_of(coords: dict[str, int], shape: dict[str, int]) -> int:
    """Global rank of the process at `coords` in a mesh of `shape` (row-major over pp, dp, tp)."""
    return (coords["pp"] * shape["dp"] + coords["dp"]) * shape["tp"] + coords["tp"]


def coords_of(rank: int, shape: dict[str, int]) -> dict[str, int]:
    tp = rank % shape["tp"]
    dp = (rank // shape["tp"]) % shape["dp"]
    pp = rank // (shape["tp"] * shape["dp"])
    return {"pp": pp, "dp": dp, "tp": tp}


def axis_groups(shape: dict[str, int], axis: str) -> list[list[int]]:
    """All groups along `axis`: each is the ranks that differ only in their `axis` coordinate.

    Pure (no processes): the unit tests check it for every layout, and `Mesh` checks that the
    process groups torch builds contain exactly these ranks.
    """
    others = [a for a in AXES if a != axis]
    groups = []
    for fixed in itertools.product(*(range(shape[a]) for a in others)):
        base = dict(zip(others, fixed))
        groups.append([rank_of({**base, axis: i}, shape) for i in range(shape[axis])])
    return groups


def embedding_groups(shape: dict[str, int]) -> list[list[int]]:
    """For each pp group, its first and last rank: the stages that hold the tied embedding."""
    return [[g[0], g[-1]] for g in axis_groups(shape, "pp")]


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

    @classmethod
    def build(cls, dp: int = 1, tp: int = 1, pp: int = 1, device_type: str = "cpu") -> "Mesh":
        """Create the mesh over the default process group (which must already be initialised)."""
        from torch.distributed.device_mesh import init_device_mesh

        world = dist.get_world_size()
        if dp * tp * pp != world:
            raise ValueError(f"mesh pp={pp} x dp={dp} x tp={tp} does not match world size {world}")
        device_mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=AXES)
        mesh = cls({"pp": pp, "dp": dp, "tp": tp}, dist.get_rank(), device_mesh, device_type)
        for axis in AXES:
            got = dist.get_process_group_ranks(mesh.group(axis))
            assert got == mesh.ranks(axis), f"{axis} group {got} != expected {mesh.ranks(axis)}"
        if pp > 1:  # first and last stage share the tied embedding: one group per (dp, tp) pair
            for pair in embedding_groups(mesh.shape):
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
        return coords_of(self.rank, self.shape)[axis]

    def ranks(self, axis: str) -> list[int]:
        """Global ranks of this rank's group along `axis`, in group order."""
        return next(g for g in axis_groups(self.shape, axis) if self.rank in g)

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.groups[axis] if self.groups else self.device_mesh.get_group(axis)

    def __str__(self) -> str:
        c = coords_of(self.rank, self.shape)
        return f"rank {self.rank} at pp={c['pp']},dp={c['dp']},tp={c['tp']} of {self.shape}"
