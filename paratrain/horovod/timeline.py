"""Horovod's timeline (`hvd.start_timeline`, `hvd.stop_timeline`, `HOROVOD_TIMELINE=path`): a
Chrome trace (chrome://tracing, Perfetto) of the collectives, one row per tensor name, with
Horovod's phases: `NEGOTIATE_<OP>` (the header exchange in which the ranks agree on the call) and
`<OP>` (from then until `synchronize` returns the result). As in Horovod, rank 0 writes the file.
Horovod's `mark_cycles` marks its background thread's cycles; there are none here, so it is
accepted and draws nothing. DistributedOptimizer's buckets are reduced by the engine (overlapped
with backward, not negotiated per tensor) and show as one `DistributedOptimizer.synchronize` span
per step.
"""

from __future__ import annotations

import json
import os
import time

import torch.distributed as dist

_ACTIVE: list = []  # the Timeline being recorded, if any
_LAST: list = [None]  # the label of the call negotiated last on this rank (its handle comes next)


class Timeline:
    def __init__(self, path: str, rank: int):
        self.path, self.rank, self.t0 = path, rank, time.perf_counter()
        self.events: list[dict] = []
        self.rows: dict[str, int] = {}

    def span(self, name: str, phase: str, start: float, end: float) -> None:
        row = self.rows.setdefault(name, len(self.rows) + 1)
        self.events.append({"name": phase, "ph": "X", "pid": row, "tid": self.rank,
                            "ts": round((start - self.t0) * 1e6, 3), "dur": round((end - start) * 1e6, 3)})

    def write(self) -> None:
        rows = [{"name": "process_name", "ph": "M", "pid": row, "args": {"name": name}}
                for name, row in self.rows.items()]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path + ".tmp", "w") as f:
            json.dump({"traceEvents": rows + self.events, "displayTimeUnit": "ms"}, f)
        os.replace(self.path + ".tmp", self.path)


def start_timeline(file_path: str, mark_cycles: bool = False) -> None:
    """Record a timeline of this rank's collectives; rank 0 writes it to `file_path` on stop."""
    if not file_path:
        raise ValueError("hvd.start_timeline: file_path must be a file name")
    stop_timeline()
    _ACTIVE.append(Timeline(file_path, dist.get_rank() if dist.is_initialized() else 0))


def stop_timeline() -> None:
    """Stop recording and write the file (rank 0)."""
    if _ACTIVE:
        timeline = _ACTIVE.pop()
        if timeline.rank == 0:
            timeline.write()


def negotiated(kind: str, name: str | None, start: float) -> None:
    """A call's header exchange, from `start` until now."""
    label = name or f"{kind}.noname"
    _LAST[0] = (label, kind.upper())
    if _ACTIVE:
        _ACTIVE[0].span(label, f"NEGOTIATE_{kind.upper()}", start, time.perf_counter())


def take_label() -> tuple[str, str] | None:
    """The (name, phase) of the call just negotiated, for its handle."""
    label, _LAST[0] = _LAST[0], None
    return label


def done(label: tuple[str, str] | None, start: float) -> None:
    """An operation from `start` (its handle) until its result was returned."""
    if _ACTIVE and label is not None:
        _ACTIVE[0].span(label[0], label[1], start, time.perf_counter())
