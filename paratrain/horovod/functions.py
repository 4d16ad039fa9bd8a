"""Horovod's object collectives (horovod.torch.functions): any picklable object, serialised with
cloudpickle (pickle when it is not installed) into a uint8 tensor, its length sent first."""

from __future__ import annotations

import io

import torch

from paratrain.horovod.basics import global_process_set, rank
from paratrain.horovod.ops import allgather, broadcast_

try:
    import cloudpickle as _pickle
except ImportError:  # pragma: no cover (cloudpickle ships with most environments)
    import pickle as _pickle


def _to_tensor(obj) -> torch.Tensor:
    b = io.BytesIO()
    _pickle.dump(obj, b)
    return torch.frombuffer(bytearray(b.getvalue()), dtype=torch.uint8)


def _from_tensor(t: torch.Tensor):
    return _pickle.load(io.BytesIO(t.numpy().tobytes()))


def broadcast_object(obj, root_rank: int = 0, name=None, process_set=global_process_set):
    """The object of global rank `root_rank`, on every rank of the set."""
    name = name or type(obj).__name__
    if rank() == root_rank:
        t = _to_tensor(obj)
        broadcast_(torch.tensor([t.numel()], dtype=torch.int64), root_rank, name + ".sz", process_set)
    else:
        size = broadcast_(torch.zeros(1, dtype=torch.int64), root_rank, name + ".sz", process_set)
        t = torch.empty(int(size), dtype=torch.uint8)
    broadcast_(t, root_rank, name + ".t", process_set)
    return obj if rank() == root_rank else _from_tensor(t)


def allgather_object(obj, name=None, process_set=global_process_set) -> list:
    """Every rank's object, in the set's rank order."""
    name = name or type(obj).__name__
    t = _to_tensor(obj)
    sizes = allgather(torch.tensor([t.numel()], dtype=torch.int64), name=name + ".sz", process_set=process_set)
    gathered = allgather(t, name=name + ".t", process_set=process_set)
    return [_from_tensor(part) for part in gathered.split(sizes.tolist())]
