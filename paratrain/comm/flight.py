"""Hang diagnostics: a flight recorder of collectives, and a watchdog that names where ranks wait.

Every collective and point-to-point call made through `paratrain.comm` leaves a fingerprint
(sequence number, operation, group ranks, shapes, dtype, call site, training step) in a small
ring per process, and marks itself in flight until it returns (or, for asynchronous calls, until
its handle's `wait()` returns). A watchdog thread wakes twice a second; when this rank's call has
been in flight longer than `--collective-timeout`, it writes its fingerprints to the process
group's store, waits briefly for the other ranks' reports, and the lowest reporting rank prints
one cross-rank summary such as

    paratrain: hang: no collective completed in 5 s.
      rank 1 waits in all_gather (group 0,1; 64 float32) at train.py:120, step 41
      ranks 0, 2-3 wait in all_reduce (group 0-3; 13,312 float32) at zero.py:88, step 41

Then every stuck rank exits with status 3 instead of hanging until the engine's own timeout.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

HANG_EXIT = 3
_HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Fingerprint:
    seq: int
    op: str
    group: str
    shape: str
    dtype: str
    site: str
    step: int

    def describe(self) -> str:
        what = f"; {self.shape} {self.dtype}" if self.dtype != "-" else (f"; {self.shape}" if self.shape != "-" else "")
        return f"{self.op} (group {self.group}{what}) at {self.site}, step {self.step}"


def _inside(filename: str) -> bool:
    """paratrain/comm itself, or torch.compile's wrapper that keeps the collectives out of graphs."""
    path = os.path.abspath(filename)
    return os.path.dirname(path) == _HERE or f"{os.sep}torch{os.sep}_dynamo{os.sep}" in path


def _call_site() -> str:
    """file:line of the first caller outside paratrain/comm."""
    frame = sys._getframe(2)
    while frame is not None and _inside(frame.f_code.co_filename):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def _ranks(group) -> str:
    try:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    except Exception:  # a group this rank is not part of
        return "?"
    return compact(ranks)


def compact(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, run = [], []
    for r in sorted(ranks):
        if run and r != run[-1] + 1:
            out.append(run)
            run = []
        run.append(r)
    if run:
        out.append(run)
    return ", ".join(f"{a[0]}-{a[-1]}" if len(a) > 2 else ", ".join(map(str, a)) for a in out)


class FlightRecorder:
    """The last few collectives of this process and the one in flight (thread-safe enough: the
    watchdog only reads)."""

    def __init__(self, size: int = 16):
        self.recent: deque[Fingerprint] = deque(maxlen=size)
        self.seq = 0
        self.step = 0
        self.current: Fingerprint | None = None
        self.since = 0.0
        self.blocked_s = 0.0  # seconds spent waiting in collectives, all told (balance.py subtracts them)

    def record(self, op: str, tensor: torch.Tensor, group) -> Fingerprint:
        self.seq += 1
        fp = Fingerprint(self.seq, op, _ranks(group), "x".join(map(str, tensor.shape)) or "scalar",
                         str(tensor.dtype).replace("torch.", ""), _call_site(), self.step)
        self.recent.append(fp)
        return fp

    def watch(self, op: str, group, what: str = "-") -> "_Watched":
        """`with flight.watch("checkpoint save", group):` counts a call made outside paratrain.comm
        (DCP's save and load, a barrier) as in flight, so the watchdog sees it too."""
        self.seq += 1
        fp = Fingerprint(self.seq, op, _ranks(group), what, "-", _call_site(), self.step)
        self.recent.append(fp)
        return _Watched(self, fp)

    def begin(self, fp: Fingerprint) -> None:
        self.current, self.since = fp, time.monotonic()

    def end(self) -> None:
        if self.current is not None:
            self.blocked_s += time.monotonic() - self.since
        self.current = None

    def track(self, work, fp: Fingerprint):
        """Wrap an asynchronous handle so that waiting on it counts as being in flight."""
        return _Tracked(work, fp, self) if work is not None else None


class _Watched:
    def __init__(self, flight: FlightRecorder, fp: Fingerprint):
        self.flight, self.fp = flight, fp

    def __enter__(self):
        self.flight.begin(self.fp)

    def __exit__(self, *exc):
        self.flight.end()


class _Tracked:
    def __init__(self, work, fp: Fingerprint, flight: FlightRecorder):
        self.work, self.fp, self.flight = work, fp, flight

    def wait(self, *args, **kwargs):
        self.flight.begin(self.fp)
        try:
            return self.work.wait(*args, **kwargs)
        finally:
            self.flight.end()

    def is_completed(self) -> bool:
        return self.work.is_completed()

    def __getattr__(self, name):
        return getattr(self.work, name)


class Watchdog:
    """Watches one FlightRecorder; see the module docstring."""

    def __init__(self, flight: FlightRecorder, timeout: float, grace: float | None = None,
                 exit=os._exit, out=sys.stderr):
        self.flight, self.timeout = flight, timeout
        self.others: list[FlightRecorder] = []  # more recorders to watch (a background thread's)
        self.grace = grace if grace is not None else min(10.0, max(2.0, timeout))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()
        self.exit, self.out = exit, out
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="paratrain-watchdog", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def also(self, flight: FlightRecorder) -> None:
        """Watch `flight` too (the recorder of a thread that runs collectives of its own)."""
        self.others.append(flight)

    def _run(self) -> None:
        while not self.stopped.wait(0.5):
            for flight in [self.flight, *self.others]:
                fp = flight.current
                if fp is not None and time.monotonic() - flight.since > self.timeout:
                    self._report(fp, flight)
                    return

    def _report(self, fp: Fingerprint, flight: FlightRecorder) -> None:
        mine = {"rank": self.rank, "current": asdict(fp), "recent": [asdict(f) for f in flight.recent]}
        self.store.set(f"paratrain/hang/{self.rank}", json.dumps(mine))
        deadline = time.monotonic() + self.grace
        keys = [f"paratrain/hang/{r}" for r in range(self.world)]
        reports = {}
        while time.monotonic() < deadline:
            for r, k in enumerate(keys):
                if r not in reports and self.store.check([k]):
                    reports[r] = json.loads(self.store.get(k))
            if len(reports) == self.world:
                break
            time.sleep(0.2)
        if min(reports) == self.rank:
            print(summary(reports, self.world, self.timeout), file=self.out, flush=True)
            self.store.set("paratrain/hang/printed", "1")
        else:  # a launcher stops every rank once one exits: let the summary out first
            deadline = time.monotonic() + self.grace
            while time.monotonic() < deadline and not self.store.check(["paratrain/hang/printed"]):
                time.sleep(0.1)
        self.exit(HANG_EXIT)


def summary(reports: dict[int, dict], world: int, timeout: float) -> str:
    """One block naming, per distinct wait, the ranks and their operation, group and call site."""
    waits: dict[str, list[int]] = {}
    for r, rep in reports.items():
        waits.setdefault(Fingerprint(**rep["current"]).describe(), []).append(r)
    lines = [f"paratrain: hang: a collective did not complete within {timeout:g} s (--collective-timeout)."]
    for what, ranks in sorted(waits.items(), key=lambda kv: kv[1]):
        who = f"rank {ranks[0]} waits" if len(ranks) == 1 else f"ranks {compact(ranks)} wait"
        lines.append(f"  {who} in {what}")
    silent = [r for r in range(world) if r not in reports]
    if silent:
        lines.append(f"  rank{'s' if len(silent) > 1 else ''} {compact(silent)} reported nothing "
                     f"(not in a collective: computing, stuck elsewhere, or gone)")
    return "\n".join(lines)
