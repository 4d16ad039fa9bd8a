"""The collectives behind Horovod's handles, on torch.distributed.

Each call resolves its process set, agrees on the call with the set's other ranks
(negotiation.py: one small header all-reduce, which also lets a joined rank stand in), then
issues the torch.distributed collective asynchronously through paratrain.comm (bytes counted,
fingerprinted for the hang report) and returns an integer handle; `synchronize(handle)` waits and
finishes the result (averaging, scaling, trimming padding), `poll(handle)` says whether it is
done. So an `*_async` call returns once every rank of the set has issued it, and the data moves in
the background. Ranks must issue collectives in the same order: names are labels here (in the
hang report and errors), not keys that reorder calls as Horovod's coordinator does.

Semantics kept from Horovod 0.28: Average sums, then multiplies by postscale / size, in the
tensor's dtype, so an integer average truncates toward zero (sum 5 over 2 ranks gives 2, -5 gives
-2); prescale multiplies before the sum the same way. A grouped allreduce fuses its tensors of
one dtype into one buffer. Allgather and reducescatter pad to the largest part and trim;
reducescatter gives the first size mod n ranks one more row. A dtype the backend lacks travels
in a wider one and is cast back (int16 as int32 on gloo; 16-bit floats as float32 where a build
cannot reduce them).
"""

from __future__ import annotations

import datetime
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from paratrain.comm import all_gather_flat, all_reduce, broadcast, reduce_scatter_flat
from paratrain.horovod import adasum, timeline
from paratrain.horovod.basics import _ON_SHUTDOWN, global_process_set, negotiate, rank, resolve, world
from paratrain.horovod.exceptions import HorovodInternalError
from paratrain.horovod.negotiation import Agreed, Call, post, read

# Horovod's reduction ops (horovod.common.basics)
Average, Sum, Adasum, Min, Max, Product = 0, 1, 2, 3, 4, 5
OP_NAMES = {Average: "Average", Sum: "Sum", Adasum: "Adasum", Min: "Min", Max: "Max", Product: "Product"}
WIRE_OP = {Average: dist.ReduceOp.SUM, Sum: dist.ReduceOp.SUM, Min: dist.ReduceOp.MIN, Max: dist.ReduceOp.MAX,
           Product: dist.ReduceOp.PRODUCT}
WIDER = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.int16: torch.int32}


@dataclass
class Pending:
    works: list  # torch.distributed work objects still running
    finish: Callable[[], Any]  # after they are done: the result
    label: tuple[str, str] | None = None  # (name, phase) on the timeline
    start: float = 0.0


_HANDLES: dict[int, Pending] = {}
_NEXT = itertools.count(1)
_ON_SHUTDOWN.append(_HANDLES.clear)
_NATIVE: dict[torch.dtype, bool] = {}  # does gloo take this dtype itself


def handle(works: list, finish: Callable[[], Any]) -> int:
    h = next(_NEXT)
    _HANDLES[h] = Pending([w for w in works if w is not None], finish, timeline.take_label(), time.perf_counter())
    return h


def done(value) -> int:
    """A handle whose result is already there."""
    return handle([], lambda: value)


def poll(h: int) -> bool:
    """True when the operation of handle `h` has finished (synchronize then returns at once)."""
    if h not in _HANDLES:
        raise ValueError(f"hvd.poll: unknown handle {h} (already synchronized?)")
    return all(w.is_completed() for w in _HANDLES[h].works)


def synchronize(h: int):
    """Wait for handle `h` and return its result; an unknown (or already synchronized) handle
    gives None, as in Horovod."""
    pending = _HANDLES.pop(h, None)
    if pending is None:
        return None
    try:
        for w in pending.works:
            w.wait()
    except RuntimeError as e:  # a peer died or the collective failed
        raise HorovodInternalError(str(e)) from e
    result = pending.finish()
    timeline.done(pending.label, pending.start)
    return result


def then(h: int, f: Callable[[Any], Any]) -> int:
    """Handle `h`, its result passed through `f`."""
    pending = _HANDLES[h]
    pending.finish = lambda previous=pending.finish: f(previous())
    return h


def combine(handles: list[int]) -> int:
    """One handle for several (grouped calls): its result is the list of theirs."""
    parts = [_HANDLES.pop(h) for h in handles]
    return handle([w for p in parts for w in p.works], lambda: [p.finish() for p in parts])


def scale_(t: torch.Tensor, factor: float) -> None:
    """t *= factor in t's dtype; integers truncate toward zero (Horovod's ScaleBuffer)."""
    if factor == 1.0:
        return
    if t.dtype.is_floating_point or t.dtype.is_complex:
        t.mul_(factor)
    else:
        t.copy_((t.double() * factor).trunc())


def wire_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a tensor travels in: its own, or the wider one of WIDER where the backend lacks
    it (gloo has no int16; 16-bit floats where a build cannot reduce them). Probed once per dtype
    on a private gloo group of one, which checks dtypes as the real one does."""
    if dtype not in WIDER or device.type != "cpu":
        return dtype
    if dtype not in _NATIVE:
        try:
            probe = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, datetime.timedelta(seconds=30))
            probe.allreduce([torch.ones(1, dtype=dtype)]).wait()
            _NATIVE[dtype] = True
        except RuntimeError:
            _NATIVE[dtype] = False
    return dtype if _NATIVE[dtype] else WIDER[dtype]


def refuse(ps, kind: str, problem: str, error: type = ValueError):
    """Raise `problem` here and a pointer to it on the set's other ranks (which may be fine and
    would otherwise wait for this rank in the collective)."""
    negotiate(ps, Call(kind, problem=problem, error=error))


def allreduce_async(outputs: list[torch.Tensor], op: int, prescale: float, postscale: float, process_set,
                    name: str | None) -> int:
    """Reduce each tensor of `outputs` in place over the set; the handle's result is `outputs`."""
    ps = resolve(process_set, "allreduce")
    if op not in OP_NAMES:
        refuse(ps, "allreduce", f"unknown reduction op {op!r}: use hvd.Average, Sum, Adasum, Min, Max or Product")
    if op == Adasum:
        return done(_adasum(outputs, prescale, postscale, ps, name))
    n, buckets, parts = len(ps.ranks), {}, []
    for i, t in enumerate(outputs):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for (dtype, device), idx in buckets.items():  # in order of first appearance: the same on every rank
        wire = wire_dtype(dtype, device)
        single = len(idx) == 1 and wire == dtype and outputs[idx[0]].is_contiguous()
        flat = outputs[idx[0]].view(-1) if single else torch.cat([outputs[i].reshape(-1).to(wire) for i in idx])
        scale_(flat, prescale)
        shapes = tuple(d for i in idx for d in (outputs[i].dim(), *outputs[i].shape))
        negotiate(ps, Call("allreduce", wire, op, flat.numel(), shapes, device=device.type, name=name))
        work = all_reduce(flat, ps.group, world().comm, WIRE_OP[op], async_op=True) if n > 1 else None
        parts.append((work, flat, idx, single))

    def finish():
        for _, flat, idx, single in parts:
            scale_(flat, postscale / n if op == Average else postscale)
            if not single:
                for i, piece in zip(idx, flat.split([outputs[i].numel() for i in idx])):
                    outputs[i].copy_(piece.view_as(outputs[i]))
        return outputs

    return handle([p[0] for p in parts], finish)


def _adasum(outputs: list[torch.Tensor], prescale: float, postscale: float, ps, name) -> list[torch.Tensor]:
    """Adasum of each tensor over the world (Horovod's restrictions: the global set, 2^k ranks)."""
    n = len(ps.ranks)
    if ps is not global_process_set:
        refuse(ps, "allreduce", "Adasum does not support non-global process sets yet.", NotImplementedError)
    if not adasum.is_power_of_two(n):
        refuse(ps, "allreduce", f"Running Adasum with non-power of 2 ranks is not supported yet: the world has {n} "
                                f"ranks; use 1, 2, 4, 8, ... ranks, or op=hvd.Average", NotImplementedError)
    for t in outputs:
        problem = None if t.dtype.is_floating_point else f"hvd.allreduce: Adasum needs floating-point tensors, got " \
                                                         f"{t.dtype}"
        negotiate(ps, Call("allreduce", t.dtype, Adasum, t.numel(), tuple(t.shape), device=t.device.type, name=name,
                           problem=problem))
        x = t.reshape(-1).clone()
        scale_(x, prescale)
        if n > 1:
            x = adasum.allreduce(x, rank(), n, world().comm)
        scale_(x, postscale)
        t.copy_(x.view_as(t))
    return outputs


def allgather_async(tensor: torch.Tensor, name: str | None, process_set) -> int:
    """Concatenate every rank's tensor along the first dimension, which may differ by rank."""
    ps = resolve(process_set, "allgather")
    x = tensor.detach()
    x = x.reshape(1) if x.dim() == 0 else x
    n, rest, dtype = len(ps.ranks), tuple(x.shape[1:]), x.dtype
    agreed = negotiate(ps, Call("allgather", x.dtype, shape=(x.dim(), *rest), device=x.device.type,
                                rows=x.shape[0], name=name))
    if n == 1:
        return done(x.clone())
    rows, x = agreed.rows, x.to(wire_dtype(dtype, x.device))
    most = max(rows)
    shard = x if x.shape[0] == most else torch.cat([x, x.new_zeros((most - x.shape[0], *rest))])
    out = x.new_empty((n * most, *rest))
    work = None
    if out.numel():
        work = all_gather_flat(out.view(-1), shard.contiguous().view(-1), ps.group, world().comm, async_op=True)

    def finish():
        if len(set(rows)) == 1:
            return out.to(dtype)
        parts = out.view(n, most, *rest)
        return torch.cat([parts[i, : rows[i]] for i in range(n)]).to(dtype)

    return handle([work], finish)


def broadcast_async(output: torch.Tensor, root_rank: int, name: str | None, process_set) -> int:
    """Overwrite `output` with global rank `root_rank`'s tensor on every rank of the set."""
    ps = resolve(process_set, "broadcast")
    problem = None if root_rank in ps.ranks else f"hvd.broadcast: root_rank {root_rank} is not in process set " \
                                                 f"{ps.ranks}"
    negotiate(ps, Call("broadcast", output.dtype, 0, output.numel(), tuple(output.shape), root=int(root_rank),
                       device=output.device.type, name=name, problem=problem))
    if len(ps.ranks) == 1:
        return done(output)
    wire = wire_dtype(output.dtype, output.device)
    buf = output if output.is_contiguous() and wire == output.dtype else output.contiguous().to(wire)
    work = broadcast(buf, root_rank, ps.group, world().comm, async_op=True)

    def finish():
        if buf is not output:
            output.copy_(buf)
        return output

    return handle([work], finish)


def _send_splits(x: torch.Tensor, splits, n: int) -> tuple[list[int], str | None]:
    rows = x.shape[0] if x.dim() else 0
    if x.dim() == 0:
        return [0] * n, "hvd.alltoall: the tensor needs at least one dimension"
    if splits is None:
        problem = None if rows % n == 0 else f"hvd.alltoall: the first dimension ({rows}) is not divisible by the " \
                                             f"{n} ranks of the process set; pass splits"
        return [rows // n] * n, problem
    send = [int(s) for s in (splits.tolist() if torch.is_tensor(splits) else splits)]
    if len(send) != n or min(send) < 0 or sum(send) != rows:
        return [0] * n, f"hvd.alltoall: splits {send} must be {n} non-negative counts (one per rank of the process " \
                        f"set) summing to the first dimension, {rows}"
    return send, None


def alltoall_async(tensor: torch.Tensor, splits, name: str | None, process_set) -> int:
    """Send rows splits[j] of the first dimension to the set's j-th rank; the result is
    (gathered rows in rank order, received splits as int32)."""
    ps = resolve(process_set, "alltoall")
    x, n = tensor.detach(), len(ps.ranks)
    send, problem = _send_splits(x, splits, n)
    negotiate(ps, Call("alltoall", x.dtype, shape=(x.dim(), *x.shape[1:]), device=x.device.type, name=name,
                       problem=problem))
    if n == 1:
        return done((x.clone(), torch.tensor(send, dtype=torch.int32)))
    stats = world().comm
    counts = torch.tensor(send, dtype=torch.int64, device=x.device)
    received = torch.empty_like(counts)
    with stats.flight.watch("all_to_all splits", ps.group):
        dist.all_to_all_single(received, counts, group=ps.group)
    recv = received.tolist()
    dtype, x = x.dtype, x.to(wire_dtype(x.dtype, x.device))
    out = x.new_empty((sum(recv), *x.shape[1:]))
    me, row = ps.ranks.index(rank()), math.prod(x.shape[1:]) * x.element_size()
    stats.bytes += (sum(send) - send[me]) * row + 8 * (n - 1)
    stats.calls["all_to_all"] += 2
    fp = stats.flight.record("all_to_all", x, ps.group)
    work = dist.all_to_all_single(out, x.contiguous(), recv, send, group=ps.group, async_op=True)
    return handle([stats.flight.track(work, fp)], lambda: (out.to(dtype), torch.tensor(recv, dtype=torch.int32)))


def reducescatter_async(tensor: torch.Tensor, op: int, prescale: float, postscale: float, process_set,
                        name: str | None) -> int:
    """Reduce over the set, then give the set's r-th rank its block of rows: size // n rows,
    one more for the first size % n ranks (Horovod's split)."""
    ps = resolve(process_set, "reducescatter")
    if op not in (Average, Sum):
        refuse(ps, "reducescatter", f"hvd.reducescatter supports op=hvd.Average or hvd.Sum, got "
                                    f"{OP_NAMES.get(op, op)}")
    x, n = tensor.detach(), len(ps.ranks)
    problem = None if x.dim() else "hvd.reducescatter: the tensor needs at least one dimension"
    rows, rest = (x.shape[0], tuple(x.shape[1:])) if x.dim() else (0, ())
    counts = [rows // n + (1 if r < rows % n else 0) for r in range(n)]
    wire = wire_dtype(x.dtype, x.device)
    negotiate(ps, Call("reducescatter", wire, op, x.numel(), tuple(x.shape), device=x.device.type, name=name,
                       problem=problem))
    most, me = counts[0], ps.ranks.index(rank())
    padded = x.new_zeros((n, most, *rest), dtype=wire)
    for r, part in enumerate(x.split(counts)):
        padded[r, : counts[r]] = part
    scale_(padded, prescale)
    out = padded[0].reshape(-1) if n == 1 else padded.new_empty(most * math.prod(rest))
    work = None
    if n > 1 and out.numel():
        work = reduce_scatter_flat(out, padded.view(-1), ps.group, world().comm, async_op=True)

    def finish():
        scale_(out, postscale / n if op == Average else postscale)
        return out.view(most, *rest)[: counts[me]].to(x.dtype)

    return handle([work], finish)


def barrier(process_set=global_process_set) -> None:
    """Wait until every rank of the set has arrived (the header all-reduce is the barrier)."""
    negotiate(resolve(process_set, "barrier"), Call("barrier"))


def _identity(op: int, dtype: torch.dtype):
    """What a joined rank contributes: the identity of the reduction (zero for Sum / Average)."""
    if op == Product:
        return 1
    if op not in (Min, Max):
        return 0
    if dtype == torch.bool:
        return op == Min
    if dtype.is_floating_point:
        return math.inf if op == Min else -math.inf
    return torch.iinfo(dtype).max if op == Min else torch.iinfo(dtype).min


def _stand_in(ps, agreed: Agreed, device: int) -> None:
    """A joined rank's part in the others' allreduce: zeros for Sum and Average (Horovod's; an
    average still divides by the whole set's size) and for Adasum (where zero changes nothing),
    the identity for Min, Max and Product (so the result is the active ranks'); nothing for a
    barrier, whose header was all there was."""
    if agreed.kind != "allreduce" or agreed.refused or agreed.disagreement():
        return  # the active ranks raise
    dtype, numel, op = agreed.dtype, agreed.high["numel"], agreed.high["op"]
    where = torch.device("cpu")
    if agreed.high["device"]:
        where = torch.device("cuda", device if device >= 0 else torch.cuda.current_device())
    if op == Adasum:
        adasum.allreduce(torch.zeros(numel, dtype=dtype, device=where), rank(), len(ps.ranks), world().comm)
        return
    stand_in = torch.full((numel,), _identity(op, dtype), dtype=dtype, device=where)
    all_reduce(stand_in, ps.group, world().comm, WIRE_OP[op])


def join(device: int = -1) -> int:
    """This rank has no more data: until every rank has joined, take part in the others'
    allreduces (and barriers) on every set this rank is in; returns the rank that joined last
    (the highest of those that joined together last). Other collectives raise on the ranks
    that issue them while a rank is joined."""
    w, me = world(), rank()
    sets = [ps for ps in w.sets.values() if me in ps.ranks and len(ps.ranks) > 1]
    last = me

    def post_on(ps, first: bool):
        return (ps, *post(None, ps.group, len(ps.ranks), ps.ranks.index(me), w.comm, w.header_device,
                          first_join=first, async_op=True))

    pending = {i: post_on(ps, ps is global_process_set) for i, ps in enumerate(sets)}
    delay = 1e-4
    while pending:
        ready = [i for i, (_, _, work) in pending.items() if len(pending) == 1 or work.is_completed()]
        if not ready:
            time.sleep(delay)
            delay = min(2 * delay, 0.01)
            continue
        delay = 1e-4
        for i in ready:
            ps, h, work = pending.pop(i)
            work.wait()
            agreed = read(h, len(ps.ranks))
            if not agreed.active:  # every rank of this set has joined
                if ps is global_process_set:
                    last = max((ps.ranks[r] for r in agreed.joined_now), default=me)
                continue
            _stand_in(ps, agreed, device)
            pending[i] = post_on(ps, False)
    return last
