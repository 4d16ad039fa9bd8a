"""Horovod's elastic API (`hvd.elastic.State`, `TorchState`, `ObjectState`, `ElasticSampler`,
`@hvd.elastic.run`) on paratrain's restarts.

Horovod keeps its workers alive through a failure and re-forms the ring among the survivors; under
torchrun (`--max-restarts`, `--nnodes MIN:MAX`) a failure or a change of hosts restarts every
worker instead. So `commit()` keeps the state where a restarted worker finds it: besides the copy
in memory (`restore()` rolls back to it), each node's local rank 0 writes it to that node's memory
file system (`/dev/shm/paratrain-horovod/<run id>/`, run id: torchrun's `--rdzv-id`). A restarted
worker's `@hvd.elastic.run` loads the newest commit any rank holds, calls the reset callbacks (the
world may have another size), and `sync()` broadcasts it from a rank that has it; the training
function then continues from the committed epoch and batch. A HorovodInternalError inside the
function ends the worker (torchrun restarts them all), as the broken process group cannot be
re-formed in place; `check_host_updates()` has nothing to do (a change of hosts restarts the workers).
"""

from __future__ import annotations

import copy
import functools
import os

import torch
import torch.distributed as dist

from paratrain.horovod.optimizer import broadcast_optimizer_state, broadcast_parameters

ROOT = os.environ.get("PARATRAIN_HOROVOD_STATE_DIR", "/dev/shm/paratrain-horovod")


def _folder() -> str:
    return os.path.join(ROOT, os.environ.get("TORCHELASTIC_RUN_ID", "none"))


class State:
    """What a training function commits and gets back after a reset (Horovod's `State`)."""

    def __init__(self, **kwargs):
        self._reset_callbacks: list = []
        self.commits = 0

    def register_reset_callbacks(self, callbacks) -> None:
        self._reset_callbacks.extend(callbacks)

    def on_reset(self) -> None:
        for callback in self._reset_callbacks:
            callback()

    def commit(self) -> None:
        """Keep the state (in memory and on this node's memory file system), then check the hosts."""
        self.commits += 1
        self.save()
        if int(os.environ.get("LOCAL_RANK", 0)) == 0 and "TORCHELASTIC_RUN_ID" in os.environ:
            os.makedirs(_folder(), exist_ok=True)
            path = os.path.join(_folder(), "state.pt")
            torch.save({"commits": self.commits, "state": self.saved()}, path + ".tmp")
            os.replace(path + ".tmp", path)
        self.check_host_updates()

    def check_host_updates(self) -> None:
        """Nothing to do: under torchrun a change of hosts restarts the workers."""

    def recover(self) -> bool:
        """After a restart: load the newest commit any rank holds, broadcast from it; True if one was found."""
        path = os.path.join(_folder(), "state.pt")
        mine = torch.load(path, weights_only=False) if os.path.exists(path) else None
        counts = [None] * dist.get_world_size()
        dist.all_gather_object(counts, mine["commits"] if mine else -1)
        best = max(counts)
        if best < 0:
            return False
        root = counts.index(best)
        if dist.get_rank() == root:
            self.commits = best
            self.load_saved(mine["state"])
        self.sync(root)
        self.commits = best
        self.save()
        return True

    # what a kind of state keeps
    def save(self) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        raise NotImplementedError

    def sync(self, root_rank: int = 0) -> None:
        raise NotImplementedError

    def saved(self) -> dict:
        raise NotImplementedError

    def load_saved(self, saved: dict) -> None:
        raise NotImplementedError


class ObjectState(State):
    """Picklable attributes (`epoch=0, batch=0`), broadcast from the root on sync."""

    def __init__(self, bcast_object=None, get_rank=None, **kwargs):
        self._keys = list(kwargs)
        self.__dict__.update(kwargs)
        self._saved = copy.deepcopy(kwargs)
        super().__init__()

    def save(self) -> None:
        self._saved = {k: copy.deepcopy(getattr(self, k)) for k in self._keys}

    def restore(self) -> None:
        for k, v in copy.deepcopy(self._saved).items():
            setattr(self, k, v)

    def sync(self, root_rank: int = 0) -> None:
        if self._keys:
            box = [{k: getattr(self, k) for k in self._keys}]
            dist.broadcast_object_list(box, src=root_rank)
            for k, v in box[0].items():
                setattr(self, k, v)

    def saved(self) -> dict:
        return copy.deepcopy(self._saved)

    def load_saved(self, saved: dict) -> None:
        self._saved = copy.deepcopy(saved)
        self.restore()


class TorchState(ObjectState):
    """A model, an optimizer and picklable attributes (Horovod's `TorchState(model, optimizer, **kwargs)`);
    attributes with `state_dict()` / `load_state_dict()` (an `ElasticSampler`) are kept by them."""

    def __init__(self, model=None, optimizer=None, **kwargs):
        self.model, self.optimizer = model, optimizer
        handled = {k: v for k, v in kwargs.items() if hasattr(v, "state_dict")}
        self._handled = handled
        super().__init__(**{k: v for k, v in kwargs.items() if k not in handled})
        self.__dict__.update(handled)
        self.save()

    def _objects(self) -> dict:
        return {"model": self.model, "optimizer": self.optimizer, **self._handled}

    def save(self) -> None:
        super().save()
        self._saved_objects = {k: copy.deepcopy(o.state_dict()) for k, o in self._objects().items() if o is not None}

    def restore(self) -> None:
        for k, sd in self._saved_objects.items():
            self._objects()[k].load_state_dict(copy.deepcopy(sd))
        super().restore()

    def sync(self, root_rank: int = 0) -> None:
        if self.model is not None:
            broadcast_parameters(self.model.state_dict(), root_rank)
        if self.optimizer is not None:
            broadcast_optimizer_state(self.optimizer, root_rank)
        for obj in self._handled.values():
            box = [obj.state_dict()]
            dist.broadcast_object_list(box, src=root_rank)
            obj.load_state_dict(box[0])
        super().sync(root_rank)

    def saved(self) -> dict:
        return {"objects": copy.deepcopy(self._saved_objects), "attributes": super().saved()}

    def load_saved(self, saved: dict) -> None:
        self._saved_objects = copy.deepcopy(saved["objects"])
        super().load_saved(saved["attributes"])
        self.restore()


class ElasticSampler(torch.utils.data.Sampler):
    """Horovod's elastic sampler: each rank's part of the epoch's (seeded) order, without the samples
    the ranks have processed this epoch (`record_batch`), re-split over the world after a reset."""

    def __init__(self, dataset, shuffle: bool = True, seed: int = 0):
        self.dataset, self.shuffle, self.seed = dataset, shuffle, seed
        self.epoch = self.processed_num = 0
        self.reset()

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.processed_num = epoch, 0
        self.reset()

    def record_batch(self, batch_idx: int, batch_size: int) -> None:
        """One more batch of `batch_size` per rank was processed by every rank."""
        self.processed_num += batch_size * dist.get_world_size()

    def record_indices(self, indices) -> None:
        self.processed_num += len(indices) * dist.get_world_size()

    def reset(self) -> None:
        n = len(self.dataset)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist() \
            if self.shuffle else list(range(n))
        remaining = order[self.processed_num:]
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        self.num_samples = -(-len(remaining) // world)
        padded = remaining + remaining[: self.num_samples * world - len(remaining)]
        self.indices = padded[rank::world]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "processed_num": self.processed_num}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.processed_num = state["epoch"], state["processed_num"]
        self.reset()


def run(func):
    """`@hvd.elastic.run`: call `func(state, ...)` after bringing every rank to the same state: the
    newest commit after a restart (then the reset callbacks), else the root's."""

    @functools.wraps(func)
    def wrapper(state: State, *args, **kwargs):
        restarted = torch.tensor([int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)])
        dist.all_reduce(restarted, op=dist.ReduceOp.MAX)  # a joining node's workers start at 0
        if int(restarted) > 0 and state.recover():
            state.on_reset()
        else:
            state.sync()
            state.save()
        return func(state, *args, **kwargs)

    return wrapper
