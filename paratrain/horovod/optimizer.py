"""Horovod's `DistributedOptimizer`, `broadcast_parameters`, `broadcast_optimizer_state` and
`SyncBatchNorm` on paratrain's engine (Sergeev and Del Balso 2018, "Horovod: fast and easy
distributed deep learning in TensorFlow").

The wrapped optimizer's gradients are reduced by paratrain's data parallelism (parallel/data.py):
flat buckets whose all-reduce starts as soon as backward has filled them, overlapped with the rest
of backward, `Compression.fp16` as its fp16 compressor; not one all-reduce per tensor. Horovod's
semantics are kept: `op=Average` (default) divides by the size, `Sum` does not, `Adasum` combines
gradients by Maleki et al. 2021's rule (per tensor: it is not a sum, so it cannot share a bucket);
`gradient_predivide_factor` f scales by 1/f before the sum and f/size after; with
`backward_passes_per_step` N gradients accumulate locally for N backward passes and are reduced
on the N-th; `synchronize()` finishes the reduction (so that gradients can be clipped), and
`step()` inside `skip_synchronize()` does not reduce again; `zero_grad()` between a backward and
its `step()` is refused, as in Horovod. Once a step, one small negotiated all-reduce counts the ranks
inside `hvd.join()`; when some are, that step's gradients go through the negotiated all-reduce, in
which the joined ranks stand in with zeros (so uneven numbers of steps per rank train as Horovod's).
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.comm import parse_compress
from paratrain.horovod import timeline
from paratrain.horovod.basics import _ON_SHUTDOWN
from paratrain.mesh import Mesh
from paratrain.parallel.batchnorm import SyncBatchNorm as _SyncBatchNorm
from paratrain.parallel.data import DataParallel

_MESH: list = []  # (world size, Mesh): the data-parallel mesh of the whole world, built once
_ON_SHUTDOWN.append(_MESH.clear)  # hvd.shutdown() destroys its groups


def world_mesh() -> Mesh:
    """The mesh of every rank as one dp group (Horovod's global process set)."""
    if not dist.is_initialized():
        raise ValueError("Horovod has not been initialized; use hvd.init().")
    world = dist.get_world_size()
    if not _MESH or _MESH[0][0] != world:
        _MESH[:] = [(world, Mesh.build(world, device_type="cuda" if dist.get_backend() == "nccl" else "cpu"))]
    return _MESH[0][1]


def engine_compressor(compression):
    """Horovod's `Compression.none` / `Compression.fp16` as the engine's: no compressor, its fp16 one."""
    from paratrain.horovod.compression import Compression

    if compression is None or compression is Compression.none:
        return None
    if compression is Compression.fp16:
        return parse_compress("fp16")
    raise ValueError(f"DistributedOptimizer: compression must be Compression.none or Compression.fp16, got "
                     f"{compression!r}")


def _named(named_parameters, groups: list[dict]) -> dict[nn.Parameter, str]:
    """A name for every parameter of the optimizer (Horovod's checks: unique names, every
    optimized parameter named when names are given)."""
    params = [p for g in groups for p in g["params"]]
    if named_parameters is None:
        return {p: f"allreduce.noname.{i}" for i, p in enumerate(params)}
    named = list(named_parameters)
    if named and not isinstance(named[0], tuple):
        raise ValueError("named_parameters should be a sequence of tuples (name, parameter), usually produced by "
                         "model.named_parameters().")
    names = [n for n, _ in named]
    if len(set(names)) < len(names):
        raise ValueError(f"Parameter names in named_parameters must be unique. Found duplicates: "
                         f"{', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    by_param = {p: n for n, p in named}
    unnamed = [p for p in params if p not in by_param]
    if unnamed:
        raise ValueError("named_parameters was specified, but one or more model parameters were not named. Python "
                         "object ids: " + ", ".join(str(id(p)) for p in unnamed))
    return by_param


class _DistributedOptimizer:
    """The methods a wrapped optimizer gains (mixed into a subclass of its own class)."""

    def __init__(self, params, named_parameters, compression, backward_passes_per_step: int, op,
                 gradient_predivide_factor: float):
        super(self.__class__, self).__init__(params)
        from paratrain.horovod.ops import Adasum, Average, Sum

        if op not in (Average, Sum, Adasum):
            raise ValueError(f"DistributedOptimizer: op must be Average, Sum or Adasum, got {op!r}")
        if gradient_predivide_factor != 1.0 and op != Average:
            raise ValueError("gradient_predivide_factor not supported with op != Average")
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be at least 1, got {backward_passes_per_step}")
        self._names = _named(named_parameters, self.param_groups)
        self._op, self._passes, self._predivide = op, backward_passes_per_step, gradient_predivide_factor
        self._should_synchronize, self._synchronized = True, False
        trained = [p for p in self._names if p.requires_grad]
        self._delay = {p: backward_passes_per_step for p in trained}
        for p in trained:  # before the engine's own hooks: they decide whether this backward reduces
            p.register_post_accumulate_grad_hook(self._arrived)
        self._engine, self._joined, self._count = None, None, None
        if op != Adasum:
            holder = nn.Module()
            holder.params = nn.ParameterList(trained)
            compressor = engine_compressor(compression)
            self._engine = DataParallel(holder, world_mesh(), compressor=compressor, broadcast_buffers=False,
                                        sync_states=False)

    def _arrived(self, p: nn.Parameter) -> None:
        if p.grad is not None and p.grad.is_sparse:  # into the dense buckets (the values of Horovod's sparse path)
            p.grad = p.grad.to_dense()
        self._delay[p] -= 1
        if self._delay[p] < 0:
            raise AssertionError("Gradients were computed more than backward_passes_per_step times before call to "
                                 "step(). Increase backward_passes_per_step to accumulate gradients locally.")
        last = self._delay[p] == 0
        if last and self._predivide != 1.0:
            p.grad.div_(self._predivide)
        if self._engine is not None:
            if last:
                self._start_count()
                slot = self._engine._slot_of.get(p)
                if slot is None or self._engine.buckets[slot[0]].pending <= 1:  # p may start a bucket's all-reduce
                    self._finish_count()
            self._engine.require_sync = last and not self._joined

    def _start_count(self) -> None:
        """Once a step, at its first gradient: post the header of a barrier, which tells how many ranks
        are inside `hvd.join()` (joined ranks answer it). It overlaps backward until a bucket is full."""
        if self._joined is not None or self._count is not None:
            return
        if dist.get_world_size() == 1:
            self._joined = 0
            return
        from paratrain.horovod.basics import global_process_set as ps, rank, world
        from paratrain.horovod.negotiation import Call, post

        call = Call("barrier", name="DistributedOptimizer: ranks stepping")
        self._count = (call, *post(call, ps.group, len(ps.ranks), ps.ranks.index(rank()), world().comm,
                                   world().header_device, async_op=True))

    def _finish_count(self) -> None:
        """Before the step's first bucket all-reduce: with no joined rank the engine's buckets reduce
        as backward fills them; with some, the step's gradients take the negotiated all-reduce, in
        which a joined rank stands in with zeros (Horovod's join: an average still divides by the
        whole world's size)."""
        self._start_count()
        if self._joined is not None:
            return
        from paratrain.horovod.basics import global_process_set as ps, rank
        from paratrain.horovod.negotiation import check, read

        (call, h, work), self._count = self._count, None
        work.wait()
        agreed = read(h, len(ps.ranks))
        check(agreed, call, ps.ranks.index(rank()), ps.ranks)
        self._joined = len(ps.ranks) - len(agreed.active)
        if self._joined:  # no bucket has started: the engine forgets the arrivals it counted
            for bucket in self._engine.buckets:
                bucket.pending = len(bucket.params)

    def _reduce_with_joined(self) -> None:
        """This step's gradients through the negotiated all-reduce, one grouped call per bucket of
        the engine (a joined rank stands in with zeros), fp16 on the wire under Compression.fp16."""
        from paratrain.horovod.ops import Average, Sum, grouped_allreduce_

        wire = torch.float16 if self._engine.compressor is not None else None
        op = Average if self._op == Average else Sum
        for i, b in enumerate(self._engine.buckets):
            for p in b.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            grads = [p.grad.to(wire) for p in b.params] if wire else [p.grad for p in b.params]
            grouped_allreduce_(grads, op=op, postscale_factor=self._predivide, name=f"DistributedOptimizer: bucket {i}")
            if wire:
                for p, g in zip(b.params, grads):
                    p.grad.copy_(g)

    def synchronize(self) -> None:
        """Finish the reduction of this step's gradients (every rank calls it)."""
        from paratrain.horovod.ops import Average, allreduce_

        size, start = dist.get_world_size(), time.perf_counter()
        if self._engine is not None:
            self._finish_count()
            if self._joined:
                self._reduce_with_joined()
            else:
                self._engine.finish_grad_sync()
                if self._op == Average and size > 1:
                    for b in self._engine.buckets:
                        b.buffer.mul_(self._predivide / size)
        else:  # Adasum, per tensor, in the order of the optimizer's parameters
            for p in self._delay:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                allreduce_(p.grad, op=self._op, name=self._names[p])
        self._delay = dict.fromkeys(self._delay, self._passes)
        self._synchronized, self._joined = True, None
        timeline.done(("DistributedOptimizer.synchronize", "ALLREDUCE"), start)

    @contextmanager
    def skip_synchronize(self):
        """`step()` inside does not reduce (after an explicit `synchronize()`)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() context after "
                              "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
                              "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in "
                              "your code.")
            self.synchronize()
        self._synchronized = False
        return super(self.__class__, self).step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if any(n != self._passes for n in self._delay.values()) and self._engine is not None:
            if any(b.handle is not None for b in self._engine.buckets):
                raise AssertionError("optimizer.zero_grad() was called after loss.backward() but before "
                                     "optimizer.step() or optimizer.synchronize(). This is prohibited as it can "
                                     "cause a race condition.")
        return super(self.__class__, self).zero_grad(set_to_none=set_to_none)


def DistributedOptimizer(optimizer, named_parameters=None, compression=None, backward_passes_per_step: int = 1,
                         op=None, gradient_predivide_factor: float = 1.0, num_groups: int = 0, groups=None,
                         sparse_as_dense: bool = False, process_set=None):
    """Horovod's wrapper: an optimizer of the same class whose gradients are averaged (or summed,
    or Adasum-combined) over every rank before each step. `num_groups` / `groups` are accepted
    (the engine's buckets group the reductions by size); sparse gradients are always reduced as dense
    ones (`sparse_as_dense`'s way; the same average as Horovod's all-gather of sparse rows)."""
    from paratrain.horovod.basics import global_process_set
    from paratrain.horovod.compression import Compression
    from paratrain.horovod.ops import Average

    if process_set is not None and process_set is not global_process_set and \
            getattr(process_set, "ranks", None) not in (None, list(range(dist.get_world_size()))):
        raise ValueError("DistributedOptimizer: paratrain reduces gradients over the global process set only; "
                         "train a subset of ranks in a process group of its own")
    methods = {k: v for k, v in _DistributedOptimizer.__dict__.items() if k not in ("__dict__", "__weakref__")}
    cls = type(optimizer.__class__.__name__, (optimizer.__class__,), methods)
    return cls(optimizer.param_groups, named_parameters, compression or Compression.none, backward_passes_per_step,
               Average if op is None else op, gradient_predivide_factor)


def broadcast_parameters(params, root_rank: int, process_set=None) -> None:
    """Overwrite every tensor of `params` (a `state_dict()`, or `named_parameters()`) with root's, in place."""
    from paratrain.comm import broadcast

    if isinstance(params, dict):
        items = sorted(params.items())
    elif isinstance(params, list) or hasattr(params, "__iter__"):
        items = list(params)
    else:
        raise ValueError(f"invalid params of type: {type(params)}")
    mesh = world_mesh()
    with torch.no_grad():
        for name, t in items:
            if torch.is_tensor(t):
                broadcast(t.data if isinstance(t, nn.Parameter) else t, root_rank, mesh.world_group, mesh.comm)


def broadcast_optimizer_state(optimizer, root_rank: int, process_set=None) -> None:
    """Root's optimizer state and hyper-parameters (its `state_dict()`) on every rank; a rank
    whose state is not built yet (before its first step) gets it too."""
    if isinstance(optimizer, torch.optim.LBFGS):
        raise ValueError("cannot broadcast torch.optim.LBFGS state")
    box = [optimizer.state_dict() if dist.get_rank() == root_rank else None]
    dist.broadcast_object_list(box, src=root_rank)
    if dist.get_rank() != root_rank:
        optimizer.load_state_dict(box[0])


class SyncBatchNorm(_SyncBatchNorm):
    """Horovod's `hvd.SyncBatchNorm(num_features, eps, momentum, affine, track_running_stats)`:
    statistics over every rank's batch (paratrain's SyncBatchNorm on the global process set)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True):
        super().__init__(num_features, world_mesh(), eps, momentum, affine, track_running_stats)
