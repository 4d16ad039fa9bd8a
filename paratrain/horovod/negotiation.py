"""The ranks of a process set agree on each collective before they run it.

Horovod's coordinator matches the collectives of every rank by name before it runs them, so a
rank that issues something else gets an error, and a rank that has called `join()` can stand in
with zeros. torch.distributed matches collectives by order only. Here, before each collective,
the set's ranks all-reduce (max) one small int64 header:

    active[n] | joined_now[n] | refused[n] | rows[n] | fields[F] | -fields[F]

A rank that issues a collective sets its `active` slot and writes the call's fields (kind, op,
dtype, element count, a hash of the shape, root, device) and their negations; the max of both
gives every field's largest and smallest value over the active ranks, so any disagreement shows
(and raises one clear error on every rank instead of a hang or a silent mismatch). A rank whose
own arguments are bad sets its `refused` slot (every rank raises); `rows` carries each rank's
first dimension (allgather needs no second exchange). A rank inside `join()` writes only its
`joined_now` slot on its first round and otherwise nothing (the `NONE` sentinel), then reads
which collective the others run, and takes part.

One header costs one small all-reduce per collective; in return the hang report names the
Horovod call (`hvd.allreduce grad.fc1`) and the user's line, since ranks wait here.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paratrain.comm import CommStats
from paratrain.horovod import timeline
from paratrain.horovod.exceptions import HorovodInternalError

KINDS = ("none", "allreduce", "allgather", "broadcast", "alltoall", "reducescatter", "barrier",
         "add_process_set", "remove_process_set")
FIELDS = ("kind", "dtype", "op", "numel", "shape", "root", "device")
WHAT = {"dtype": "the dtype", "op": "the reduction op", "numel": "the number of elements",
        "shape": "the shape", "root": "the root rank", "device": "the device type"}
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8, torch.int16,
          torch.int32, torch.int64, torch.bool)
NONE = -(2**62)  # "no contribution": below every field value and every negated one
CONTINUE_AFTER_JOIN = ("allreduce", "barrier")  # what a joined rank takes part in (Horovod's join)
_HERE = os.path.dirname(os.path.abspath(__file__))
_COMM = os.path.join(os.path.dirname(_HERE), "comm")


@dataclass
class Call:
    """One rank's view of a collective it is about to issue."""

    kind: str
    dtype: torch.dtype | None = None
    op: int = 0
    numel: int = 0
    shape: tuple = ()  # hashed: the full shape, or the dims that must agree (allgather: all but the first)
    root: int = 0
    device: str = "cpu"
    rows: int = 0  # allgather: this rank's first dimension
    name: str | None = None
    problem: str | None = None  # this rank's arguments are bad: every rank raises
    error: type = ValueError  # what this rank raises for its problem

    def values(self) -> list[int]:
        dtype = DTYPES.index(self.dtype) if self.dtype in DTYPES else len(DTYPES)
        return [KINDS.index(self.kind), dtype, self.op, self.numel, shape_hash(self.shape), self.root,
                int(self.device != "cpu")]


def shape_hash(dims) -> int:
    """A hash of a tuple of ints that is the same in every process (Python's is salted for str)."""
    h = len(dims)
    for d in dims:
        h = (h * 1_000_003 + int(d) + 1) % (2**61 - 1)
    return h


@dataclass
class Agreed:
    """What the header said, in process-set ranks."""

    active: list[int]
    joined_now: list[int]
    refused: list[int]
    rows: list[int]
    high: dict[str, int]
    low: dict[str, int]

    @property
    def kind(self) -> str:
        return KINDS[self.high["kind"]] if self.active else "none"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.high["dtype"]]

    def disagreement(self) -> str | None:
        """The first field on which the active ranks differ, if any."""
        return next((f for f in FIELDS if self.active and self.high[f] != self.low[f]), None)


def _inside(filename: str) -> bool:
    """paratrain's horovod and comm packages, or torch's autograd (a differentiable collective)."""
    path = os.path.abspath(filename)
    return os.path.dirname(path) in (_HERE, _COMM) or f"{os.sep}torch{os.sep}autograd{os.sep}" in path


def _user_site() -> str:
    """file:line of the first caller outside paratrain's horovod and comm packages."""
    frame = sys._getframe(1)
    while frame is not None and _inside(frame.f_code.co_filename):
        frame = frame.f_back
    return "?" if frame is None else f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def header(call: Call | None, size: int, me: int, first_join: bool, device: str) -> torch.Tensor:
    f = len(FIELDS)
    h = torch.zeros(4 * size + 2 * f, dtype=torch.int64)
    h[4 * size:] = NONE
    if call is None:
        h[size + me] = int(first_join)
    else:
        h[me] = 1
        h[2 * size + me] = int(call.problem is not None)
        h[3 * size + me] = call.rows
        values = torch.tensor(call.values(), dtype=torch.int64)
        h[4 * size : 4 * size + f] = values
        h[4 * size + f :] = -values
    return h.to(device)


def post(call: Call | None, group, size: int, me: int, stats: CommStats, device: str = "cpu",
         first_join: bool = False, async_op: bool = False):
    """Contribute this rank's header; returns (header, work) (work None when not async)."""
    h = header(call, size, me, first_join, device)
    label = "hvd.join" if call is None else f"hvd.{call.kind}" + (f" {call.name}" if call.name else "")
    fp = stats.record("all_reduce", h, group, label=label)
    fp.site = _user_site()
    if async_op:
        return h, stats.flight.track(dist.all_reduce(h, op=dist.ReduceOp.MAX, group=group, async_op=True), fp)
    stats.flight.begin(fp)
    try:
        dist.all_reduce(h, op=dist.ReduceOp.MAX, group=group)
    finally:
        stats.flight.end()
    return h, None


def read(h: torch.Tensor, size: int) -> Agreed:
    v = h.cpu().tolist()
    f = len(FIELDS)
    slots = [[r for r in range(size) if v[k * size + r] > 0] for k in range(3)]
    fields = v[4 * size :]
    return Agreed(*slots, rows=v[3 * size : 4 * size], high=dict(zip(FIELDS, fields[:f])),
                  low={name: -x for name, x in zip(FIELDS, fields[f:])})


def check(agreed: Agreed, call: Call, me: int, ranks: list[int]) -> None:
    """Raise on every rank, the same way, when the ranks' calls do not fit together."""
    what = f"hvd.{call.kind}" + (f" ({call.name})" if call.name else "")
    if agreed.refused:
        if me in agreed.refused:
            raise call.error(call.problem)
        raise ValueError(f"{what}: refused by rank(s) {_global(agreed.refused, ranks)} for their arguments "
                         f"(see their error)")
    field = agreed.disagreement()
    if field == "kind":
        raise HorovodInternalError(f"ranks {ranks} disagree on the collective: one issued "
                                   f"hvd.{KINDS[agreed.low['kind']]}, another hvd.{KINDS[agreed.high['kind']]}; "
                                   f"every rank of a process set must issue the same collectives in the same order "
                                   f"(names are not matched)")
    if field is not None:
        seen = (f"from {DTYPES[agreed.low[field]]} to {DTYPES[agreed.high[field]]}" if field == "dtype" else
                f"from {agreed.low[field]} to {agreed.high[field]}" if field in ("numel", "root", "op") else "")
        raise HorovodInternalError(f"{what}: ranks {ranks} disagree on {WHAT[field]} {seen}".rstrip() +
                                   "; every rank must issue it with matching tensors, in the same order")
    joined = [r for r in range(len(ranks)) if r not in agreed.active]
    if joined and call.kind not in CONTINUE_AFTER_JOIN:
        raise HorovodInternalError(f"{what}: rank(s) {_global(joined, ranks)} have called hvd.join(); after a rank "
                                   f"joins only allreduce and barrier continue (Horovod's join)")


def _global(set_ranks: list[int], ranks: list[int]) -> list[int]:
    return [ranks[r] for r in set_ranks]


def agree(call: Call, group, ranks: list[int], me: int, stats: CommStats, device: str = "cpu") -> Agreed:
    """Exchange headers over the set (`ranks`, this rank at index `me`) and check them."""
    start = time.perf_counter()
    h, _ = post(call, group, len(ranks), me, stats, device)
    timeline.negotiated(call.kind, call.name, start)
    agreed = read(h, len(ranks))
    check(agreed, call, me, ranks)
    return agreed
