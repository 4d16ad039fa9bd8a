"""Horovod's basics on torch.distributed: `init` / `shutdown`, sizes and ranks, what is built,
and process sets.

`init()` joins the world the way paratrain does (paratrain/group.py): from the launcher's
environment (torchrun, paratrain's elastic launcher: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK), else as a world of one; gloo on CPU, and with CUDA the combined
`cpu:gloo,cuda:nccl` backend, so that CPU tensors (a metric averaged with `hvd.allreduce`, as
Horovod's examples do) and CUDA tensors both reduce. A process group that is already initialised
is used as it is (and left alone by `shutdown`).

Horovod's API is global by contract (`hvd.rank()` anywhere), so this module keeps the one world
of the process while it is initialised; paratrain's own strategies still take a Mesh.

A process set is a torch.distributed group over its ranks (`new_group`), which every rank must
create: every rank calls `add_process_set` / `remove_process_set` (or lists the sets in
`init(process_sets=...)`) with the same ranks, in the same order; a header all-reduce checks this
and any disagreement raises on every rank. A collective on a set this rank is not in raises at
once. `add_process_set` needs no `process_sets="dynamic"` here (accepted, as are sets given to
`init`).
"""

from __future__ import annotations

import operator
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paratrain.comm import CommStats
from paratrain.group import init_process_group, leave_at_exit, leave_process_group, under_torchrun
from paratrain.horovod import timeline
from paratrain.horovod.exceptions import HorovodInternalError, HostsUpdatedInterrupt
from paratrain.horovod.negotiation import Call, agree

NOT_INITIALIZED = "Horovod has not been initialized; use hvd.init()."


class ProcessSet:
    """A subset of the ranks that runs collectives of its own (`process_set=` of every call).
    `size()`, `rank()` and `included()` are None until the set is registered; `rank()` is -1 on a
    rank outside the set."""

    def __init__(self, ranks_or_comm):
        try:
            ranks = sorted(operator.index(r) for r in ranks_or_comm)
        except TypeError:
            raise ValueError("ProcessSet should be initialized with a list of ranks (mpi4py communicators are not "
                             "supported: paratrain runs on torch.distributed)") from None
        self.ranks: list[int] = ranks
        self.process_set_id: int | None = None
        self.group = None  # its torch.distributed group (None: the default group)

    def _invalidate(self) -> None:
        self.process_set_id, self.group = None, None

    def size(self) -> int | None:
        return None if self.process_set_id is None else len(_registered(self).ranks)

    def rank(self) -> int | None:
        if self.process_set_id is None:
            return None
        me = rank()
        return _registered(self).ranks.index(me) if me in self.ranks else -1

    def included(self) -> bool | None:
        return None if self.process_set_id is None else rank() in _registered(self).ranks

    def __str__(self) -> str:
        return f"ProcessSet(process_set_id={self.process_set_id}, ranks={self.ranks})"

    __repr__ = __str__


global_process_set = ProcessSet([])
global_process_set.process_set_id = 0


@dataclass
class World:
    """This process's view of the initialised world."""

    created: bool  # init() joined the default group (shutdown() leaves it)
    local_rank: int
    local_size: int
    cross_rank: int
    cross_size: int
    homogeneous: bool
    header_device: str  # where negotiation headers live: "cpu" unless the backend has no CPU side
    comm: CommStats = field(default_factory=CommStats)  # bytes and fingerprints of every hvd collective
    sets: dict[int, ProcessSet] = field(default_factory=dict)
    next_id: int = 1


_WORLD: list[World] = []  # the one world while initialised
_ON_SHUTDOWN: list = []  # callbacks (engine.py forgets its pending handles)


def _join_world() -> bool:
    """Join the default group as paratrain does; False when it was already initialised."""
    if dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if under_torchrun():
        init_process_group(backend)
    else:  # a plain process: a world of one on its own in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    leave_at_exit()
    return True


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else default


def _topology(device: str) -> tuple[int, int, int, int, bool]:
    """local rank / size and cross (node) rank / size, from the launcher's environment; a group
    initialised without it is one node. Homogeneous: every node has as many ranks (checked)."""
    world, me = dist.get_world_size(), dist.get_rank()
    local_size = max(1, _env_int("LOCAL_WORLD_SIZE", world))
    local_rank = _env_int("LOCAL_RANK", me % local_size)
    cross_rank = _env_int("GROUP_RANK", me // local_size)
    cross_size = _env_int("GROUP_WORLD_SIZE", -(-world // local_size))
    homogeneous = True
    if world > 1:
        sizes = torch.tensor([local_size, -local_size], dtype=torch.int64, device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        homogeneous = int(sizes[0]) == -int(sizes[1]) and world % local_size == 0
    return local_rank, local_size, cross_rank, cross_size, homogeneous


def init(comm=None, process_sets=None) -> None:
    """Join the world (see the module docstring); `process_sets`: sets to register now, on every
    rank in the same order, or "dynamic". A second call while initialised does nothing."""
    if _WORLD:
        return
    created = _join_world()
    world = dist.get_world_size()
    if comm is not None and (not hasattr(comm, "__iter__") or sorted(comm) != list(range(world))):
        raise ValueError("hvd.init(comm=...): paratrain runs every rank of the torch.distributed world; pass comm=None "
                         "(or all ranks) and use process sets for subsets")
    backend = str(dist.get_backend())
    device = "cpu" if ("gloo" in backend or "mpi" in backend) else "cuda"
    _WORLD.append(World(created, *_topology(device), header_device=device))
    global_process_set.ranks = list(range(world))
    global_process_set.group = None
    _WORLD[0].sets[0] = global_process_set
    if process_sets is not None and process_sets != "dynamic":
        for ps in process_sets:
            add_process_set(ps)
    if os.environ.get("HOROVOD_TIMELINE"):  # Horovod's way to record from init on
        timeline.start_timeline(os.environ["HOROVOD_TIMELINE"])


def shutdown() -> None:
    """Forget process sets and pending handles; leave the default group if init() joined it."""
    if not _WORLD:
        return
    timeline.stop_timeline()
    world = _WORLD.pop()
    for callback in _ON_SHUTDOWN:
        callback()
    for ps in world.sets.values():
        if ps is not global_process_set:
            _destroy(ps)
            ps._invalidate()
    if world.created:
        leave_process_group()


def is_initialized() -> bool:
    return bool(_WORLD)


def world() -> World:
    if not _WORLD:
        raise ValueError(NOT_INITIALIZED)
    return _WORLD[0]


def size() -> int:
    world()
    return dist.get_world_size()


def rank() -> int:
    world()
    return dist.get_rank()


def local_rank() -> int:
    return world().local_rank


def local_size() -> int:
    return world().local_size


def cross_rank() -> int:
    return world().cross_rank


def cross_size() -> int:
    return world().cross_size


def is_homogeneous() -> bool:
    return world().homogeneous


# What this build has (Horovod's names; values true of paratrain's engine, not of a Horovod build).
def mpi_built() -> bool:
    return False


def mpi_enabled() -> bool:
    return False


def mpi_threads_supported() -> bool:
    raise ValueError("Horovod MPI is not enabled: paratrain.horovod runs on torch.distributed (gloo, NCCL)")


def gloo_built() -> bool:
    return dist.is_gloo_available()


def gloo_enabled() -> bool:
    return is_initialized() and "gloo" in str(dist.get_backend())


def nccl_built() -> int:
    """NCCL_VERSION_CODE of torch's NCCL, 0 without one (Horovod's convention)."""
    if not dist.is_nccl_available():
        return 0
    try:
        major, minor, patch = torch.cuda.nccl.version()[:3]
    except Exception:
        return 0
    return major * 10000 + minor * 100 + patch if (major, minor) >= (2, 9) else major * 1000 + minor * 100 + patch


def ddl_built() -> bool:
    return False


def ccl_built() -> bool:
    return False


def cuda_built() -> bool:
    return torch.version.cuda is not None


def rocm_built() -> bool:
    return getattr(torch.version, "hip", None) is not None


def _registered(ps: ProcessSet) -> ProcessSet:
    w = world()
    if w.sets.get(ps.process_set_id) is not ps:
        raise ValueError(f"{ps} is not registered: add it with hvd.add_process_set on every rank")
    return ps


def resolve(process_set: ProcessSet | None, what: str) -> ProcessSet:
    """The registered set a collective runs on; this rank must be in it."""
    world()
    ps = global_process_set if process_set is None else process_set
    if not isinstance(ps, ProcessSet):
        raise TypeError(f"hvd.{what}: process_set must be a ProcessSet, got {type(process_set).__name__}")
    _registered(ps)
    if rank() not in ps.ranks:
        raise ValueError(f"hvd.{what}: rank {rank()} is not in process set {ps.ranks}; only its ranks may call "
                         f"collectives on it")
    return ps


def negotiate(ps: ProcessSet, call: Call):
    """Agree on `call` with the set's other ranks (nothing to agree on in a set of one)."""
    if len(ps.ranks) == 1:
        timeline.negotiated(call.kind, call.name, time.perf_counter())
        if call.problem:
            raise call.error(call.problem)
        return None
    w = world()
    return agree(call, ps.group, ps.ranks, ps.ranks.index(rank()), w.comm, w.header_device)


def add_process_set(process_set) -> ProcessSet:
    """Register a set (a ProcessSet or its ranks) on every rank, in the same order; returns it."""
    w = world()
    ps = process_set if isinstance(process_set, ProcessSet) else ProcessSet(process_set)
    problem = None
    if ps.process_set_id is not None:
        problem = f"hvd.add_process_set: {ps} has already been added"
    elif not ps.ranks or ps.ranks[0] < 0 or ps.ranks[-1] >= size() or len(set(ps.ranks)) < len(ps.ranks):
        problem = f"hvd.add_process_set: ranks {ps.ranks} must be distinct ranks of 0..{size() - 1}"
    elif any(other.ranks == ps.ranks for other in w.sets.values()):
        problem = f"hvd.add_process_set: a process set with ranks {ps.ranks} already exists"
    negotiate(global_process_set, Call("add_process_set", shape=tuple(ps.ranks), problem=problem))
    group = dist.new_group(ps.ranks)  # collective over the world
    ps.process_set_id, ps.group = w.next_id, group
    w.sets[w.next_id] = ps
    w.next_id += 1
    return ps


def remove_process_set(process_set: ProcessSet) -> bool:
    """Unregister a set (every rank, in the same order); False if it was not registered."""
    w = world()
    if process_set is global_process_set:
        raise ValueError("hvd.remove_process_set: the global process set cannot be removed")
    if w.sets.get(process_set.process_set_id) is not process_set:
        return False
    negotiate(global_process_set, Call("remove_process_set", shape=tuple(process_set.ranks)))
    _destroy(process_set)
    del w.sets[process_set.process_set_id]
    process_set._invalidate()
    return True


def _destroy(ps: ProcessSet) -> None:
    if ps.group is not None and dist.is_initialized() and dist.get_rank() in ps.ranks:
        dist.destroy_process_group(ps.group)


__all__ = ["HorovodInternalError", "HostsUpdatedInterrupt", "ProcessSet", "add_process_set", "ccl_built",
           "cross_rank", "cross_size", "cuda_built", "ddl_built", "global_process_set", "gloo_built", "gloo_enabled",
           "init", "is_homogeneous", "is_initialized", "local_rank", "local_size", "mpi_built", "mpi_enabled",
           "mpi_threads_supported", "nccl_built", "rank", "remove_process_set", "rocm_built", "shutdown", "size"]
