"""Horovod's torch collectives (horovod.torch.mpi_ops, 0.28) with their signatures and results.

- `allreduce` returns a new tensor (default op Average; `average=` is the deprecated spelling),
  `allreduce_` reduces in place, the `_async` forms return an integer handle for
  `synchronize` / `poll`; `grouped_*` take a list. Out-of-place calls are differentiable as in
  Horovod: an allreduce's gradient is the same allreduce of the output's gradient; allgather and
  broadcast pass back the average over ranks (broadcast: to the root only); alltoall sends the
  gradient back along the received splits; reducescatter all-gathers it (times the size for
  Sum).
- `allgather`: the first dimension may differ by rank; `alltoall(tensor, splits=None)` returns
  the gathered tensor, and with `splits` also the received splits (an int32 tensor);
  `reducescatter` gives the first (rows mod size) ranks one more row.
- `join()` returns the rank that joined last; a joined rank takes part in the others'
  allreduces with zeros (engine.py). DistributedOptimizer's gradient reduction is paratrain's
  DataParallel, which a joined rank does not take part in: join when no step is left to run.
"""

from __future__ import annotations

import warnings

import torch

from paratrain.horovod import engine
from paratrain.horovod.basics import global_process_set, rank, resolve
from paratrain.horovod.compression import Compression
from paratrain.horovod.engine import (  # noqa: F401 (re-exported)
    Adasum, Average, Max, Min, Product, Sum, barrier, join, poll, synchronize,
)


def _op(op, average):
    """Horovod's handle_average_backwards_compatibility."""
    if op is not None:
        if average is not None:
            raise ValueError("The op parameter supersedes average. Please provide only one of them.")
        return op
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed in v1.0", DeprecationWarning)
        return Average if average else Sum
    return Average


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.contiguous_format)


class HorovodAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, prescale_factor, postscale_factor, process_set):
        ctx.args = (op, prescale_factor, postscale_factor, process_set)
        return synchronize(engine.allreduce_async([_copy(tensor)], op, prescale_factor, postscale_factor, process_set,
                                                  name))[0]

    @staticmethod
    def backward(ctx, grad):
        op, pre, post, ps = ctx.args
        return allreduce(grad, op=op, prescale_factor=pre, postscale_factor=post, process_set=ps), *[None] * 5


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
              postscale_factor=1.0, process_set=global_process_set):
    """The reduction (Average by default) of `tensor` over the set, as a new tensor."""
    compressed, ctx = compression.compress(tensor)
    reduced = HorovodAllreduce.apply(compressed, name, _op(op, average), prescale_factor, postscale_factor,
                                     process_set)
    return compression.decompress(reduced, ctx)


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                    process_set=global_process_set) -> int:
    h = engine.allreduce_async([_copy(tensor)], _op(op, average), prescale_factor, postscale_factor, process_set, name)
    return engine.then(h, lambda outs: outs[0])


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                     process_set=global_process_set) -> int:
    h = engine.allreduce_async([tensor.detach()], _op(op, average), prescale_factor, postscale_factor, process_set,
                               name)
    return engine.then(h, lambda _: tensor)


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
               process_set=global_process_set):
    """Reduce `tensor` in place; returns it."""
    return synchronize(allreduce_async_(tensor, average, name, op, prescale_factor, postscale_factor, process_set))


class HorovodGroupedAllreduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, name, op, prescale_factor, postscale_factor, process_set, *tensors):
        ctx.args = (op, prescale_factor, postscale_factor, process_set)
        return tuple(synchronize(engine.allreduce_async([_copy(t) for t in tensors], op, prescale_factor,
                                                        postscale_factor, process_set, name)))

    @staticmethod
    def backward(ctx, *grads):
        op, pre, post, ps = ctx.args
        return *[None] * 5, *grouped_allreduce(list(grads), op=op, prescale_factor=pre, postscale_factor=post,
                                               process_set=ps)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None, prescale_factor=1.0,
                      postscale_factor=1.0, process_set=global_process_set):
    """`allreduce` of each tensor, the tensors of one dtype fused into one reduction."""
    compressed = [compression.compress(t) for t in tensors]
    reduced = HorovodGroupedAllreduce.apply(name, _op(op, average), prescale_factor, postscale_factor, process_set,
                                            *[c for c, _ in compressed])
    return [compression.decompress(r, ctx) for r, (_, ctx) in zip(reduced, compressed)]


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                            process_set=global_process_set) -> int:
    return engine.allreduce_async([_copy(t) for t in tensors], _op(op, average), prescale_factor, postscale_factor,
                                  process_set, name)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                             process_set=global_process_set) -> int:
    tensors = list(tensors)
    h = engine.allreduce_async([t.detach() for t in tensors], _op(op, average), prescale_factor, postscale_factor,
                               process_set, name)
    return engine.then(h, lambda _: tensors)


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0, postscale_factor=1.0,
                       process_set=global_process_set):
    return synchronize(grouped_allreduce_async_(tensors, average, name, op, prescale_factor, postscale_factor,
                                                process_set))


def _set_rank(process_set) -> int:
    return (process_set or global_process_set).ranks.index(rank())


class HorovodAllgather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.dim, ctx.shape, ctx.process_set = (tensor.shape[0] if tensor.dim() else 1), tensor.shape, process_set
        return synchronize(engine.allgather_async(tensor, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average, process_set=ctx.process_set)
        dims = allgather(torch.tensor([ctx.dim]), process_set=ctx.process_set)
        offset = int(dims[: _set_rank(ctx.process_set)].sum())
        return reduced.narrow(0, offset, ctx.dim).reshape(ctx.shape), None, None


def allgather(tensor, name=None, process_set=global_process_set):
    """Every rank's tensor concatenated along the first dimension (which may differ by rank), in
    the set's rank order."""
    return HorovodAllgather.apply(tensor, name, process_set)


def allgather_async(tensor, name=None, process_set=global_process_set) -> int:
    return engine.allgather_async(tensor, name, process_set)


def grouped_allgather(tensors, name=None, process_set=global_process_set):
    return [allgather(t, name, process_set) for t in tensors]


def grouped_allgather_async(tensors, name=None, process_set=global_process_set) -> int:
    return engine.combine([engine.allgather_async(t, name, process_set) for t in tensors])


class HorovodBroadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank, ctx.process_set = root_rank, process_set
        return synchronize(engine.broadcast_async(_copy(tensor), root_rank, name, process_set))

    @staticmethod
    def backward(ctx, grad):
        reduced = allreduce(grad, op=Average, process_set=ctx.process_set)
        return (reduced if rank() == ctx.root_rank else reduced * 0), None, None, None


def broadcast(tensor, root_rank, name=None, process_set=global_process_set):
    """Global rank `root_rank`'s tensor, as a new tensor on every rank of the set."""
    return HorovodBroadcast.apply(tensor, root_rank, name, process_set)


def broadcast_async(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    return engine.broadcast_async(_copy(tensor), root_rank, name, process_set)


def broadcast_async_(tensor, root_rank, name=None, process_set=global_process_set) -> int:
    return engine.then(engine.broadcast_async(tensor.detach(), root_rank, name, process_set), lambda _: tensor)


def broadcast_(tensor, root_rank, name=None, process_set=global_process_set):
    """Overwrite `tensor` with root's, in place; returns it."""
    return synchronize(broadcast_async_(tensor, root_rank, name, process_set))


class HorovodAlltoall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        out, received = synchronize(engine.alltoall_async(tensor, splits, name, process_set))
        ctx.received, ctx.process_set = received, process_set
        ctx.mark_non_differentiable(received)
        return out, received

    @staticmethod
    def backward(ctx, grad, _):
        back, _ = alltoall(grad.contiguous(), splits=ctx.received, process_set=ctx.process_set)
        return back, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=global_process_set):
    """Send `splits[j]` rows (default: equal parts) to the set's j-th rank; returns the received
    rows in rank order, and with `splits` given also the received splits."""
    out, received = HorovodAlltoall.apply(tensor, splits, name, process_set)
    return out if splits is None else (out, received)


def alltoall_async(tensor, splits=None, name=None, process_set=global_process_set) -> int:
    """Its handle's result is (tensor, received splits)."""
    return engine.alltoall_async(tensor, splits, name, process_set)


class HorovodReducescatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor):
        ctx.args = (op, process_set, prescale_factor * postscale_factor)
        return synchronize(engine.reducescatter_async(tensor, op, prescale_factor, postscale_factor, process_set,
                                                      name))

    @staticmethod
    def backward(ctx, grad):
        op, ps, factor = ctx.args
        if op == Sum:
            factor *= len(resolve(ps, "reducescatter").ranks)
        return allgather(grad * factor if factor != 1 else grad, process_set=ps), *[None] * 5


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=global_process_set,
                  prescale_factor=1.0, postscale_factor=1.0):
    """Reduce over the set (Average or Sum) and keep this rank's block of rows."""
    compressed, ctx = compression.compress(tensor)
    out = HorovodReducescatter.apply(compressed, name, Average if op is None else op, process_set, prescale_factor,
                                     postscale_factor)
    return compression.decompress(out, ctx)


def reducescatter_async(tensor, name=None, op=Average, process_set=global_process_set, prescale_factor=1.0,
                        postscale_factor=1.0) -> int:
    return engine.reducescatter_async(tensor, Average if op is None else op, prescale_factor, postscale_factor,
                                      process_set, name)


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=global_process_set, prescale_factor=1.0, postscale_factor=1.0):
    return [reducescatter(t, name, compression, op, process_set, prescale_factor, postscale_factor) for t in tensors]


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=global_process_set,
                                prescale_factor=1.0, postscale_factor=1.0) -> int:
    return engine.combine([reducescatter_async(t, name, op, process_set, prescale_factor, postscale_factor)
                           for t in tensors])
