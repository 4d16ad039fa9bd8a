"""Load balancing: each data-parallel replica's share of the global batch follows its measured speed.

Synchronous SGD runs at the pace of its slowest replica. With `--balance dynamic` the global batch
of step k is still the same sequences (a function of (seed, k) only); what changes is which
replica computes which of them. Replica r takes a contiguous run of `shares[r]` units of the
global batch, and every pass's mean loss is weighed by its rows over the global batch, so the
summed gradient is the global mean loss's whatever the shares (the weighting of LB-BSP, Chen et
al. 2020, and of Cannikin, Poplar). A unit is one micro-batch of the even split (its rows, its
BatchNorm statistics unchanged), run as one pass, so replicas make different numbers of passes;
under ZeRO-2/3, whose collectives follow the passes, every replica makes `microbatches` passes and
a unit is one sequence.

After every step each replica's compute time (its forward and backward, less the time it waited
in collectives: its own work) feeds an exponential average at its present share; a line through
that time and the one at its share before (a fixed cost per pass, plus a cost per unit; through
zero until it has two) predicts its time at any share. The controller moves units one grain at a
time from the replica predicted to finish last to the one predicted to finish first, at most
`max_move` (a tenth of the batch) per step, and makes the move only if it cuts the predicted step
by more than HYSTERESIS and the step before called for the same move, so noise and a burst of
outside load alone do not move work. Every rank decides from the same
gathered numbers, so the shares agree without a collective of their own.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager

import torch

BALANCE = ("even", "dynamic")
HYSTERESIS = 0.04  # a move must shorten the predicted step by more than this
SMOOTHING = 0.3  # weight of the newest measurement in the average time per unit
SLOW = 1.25  # a replica this much slower per unit than the fastest, step after step, is named
MAX_SLOWDOWN = 100.0


def parse_slowdown(text: str | None) -> tuple[int, float] | None:
    """`RANK:FACTOR` (--simulate-slowdown) as (rank, factor); None for None; ValueError otherwise."""
    if text is None:
        return None
    rank, _, factor = text.partition(":")
    try:
        f = float(factor)
    except ValueError:
        f = math.nan
    if not rank.isdigit() or not 1 <= f <= MAX_SLOWDOWN:
        raise ValueError(f"--simulate-slowdown: expected RANK:FACTOR with a worker RANK and a FACTOR from 1 to "
                         f"{MAX_SLOWDOWN:g}, got {text!r}")
    return int(rank), f


def balance_problem(cfg) -> str | None:
    """One line saying why `--balance` / `--simulate-slowdown` cannot run with `cfg`, else None."""
    lay, tr = cfg.layout, cfg.train
    try:
        slow = parse_slowdown(tr.simulate_slowdown)
    except ValueError as e:
        return str(e)
    if slow and slow[0] >= lay.world_size:
        return f"--simulate-slowdown: rank {slow[0]} is not a worker of {lay.world_size}; use 0..{lay.world_size - 1}"
    if tr.balance not in BALANCE:
        return f"--balance: must be even or dynamic, got {tr.balance!r}"
    if tr.balance == "even":
        return None
    if tr.sync == "ps":
        return "--balance dynamic: parameter-server workers do not wait for each other; leave it out with --sync ps"
    if lay.pp > 1 and lay.zero >= 2:
        return ("--balance dynamic: ZeRO-2/3 inside a pipeline reduce per micro-batch, which every replica must "
                "make alike; use --zero 0 or 1 with --pp")
    unit, least, _ = units_of(lay, tr.global_batch)
    per_replica = tr.global_batch // unit // lay.dp if lay.dp else 0
    if lay.dp > 1 and per_replica <= least:
        what = ("sequence" if unit == 1 else "micro-batch") + ("" if per_replica == 1 else "s" if unit == 1 else "es")
        return (f"--balance dynamic: each replica holds {per_replica} {what}, the least it may keep ({least}); "
                f"nothing could move: use more --microbatches" + (" or a larger --global-batch" if unit == 1 else ""))
    return None


def units_of(lay, global_batch: int) -> tuple[int, int, int]:
    """(rows of a unit, the fewest units a replica keeps, the step of a share in units)."""
    if lay.zero >= 2 and lay.pp == 1:  # the passes are fixed: a unit is one sequence, each pass keeps one
        return 1, lay.microbatches, 1
    rows = global_batch // (lay.dp * lay.microbatches)
    if lay.pp > 1:  # a schedule of m micro-batches needs m >= pp; interleaved, a multiple of pp
        return rows, lay.pp, lay.pp if lay.schedule == "interleaved" else 1
    return rows, 1, 1


class Balancer:
    """The shares of `dp` replicas in a global batch of `global_batch` rows (see the module)."""

    def __init__(self, dp: int, global_batch: int, lay, moving: bool = True, max_move: int | None = None):
        self.dp, self.global_batch, self.passes, self.moving = dp, global_batch, lay.microbatches, moving
        self.unit, self.least, self.grain = units_of(lay, global_batch)
        self.fixed_passes = self.unit == 1 and lay.zero >= 2
        self.units = global_batch // self.unit
        self.max_move = max_move or max(self.grain, self.grain * round(0.1 * self.units / self.grain))
        self.reset()

    def reset(self) -> None:
        self.shares = [self.units // self.dp] * self.dp
        self.seconds: list[float | None] = [None] * self.dp  # averaged compute time at the present share
        self.before: list[tuple[int, float] | None] = [None] * self.dp  # (share, time) at the one before
        self.slow_steps = [0] * self.dp  # steps in a row each replica was SLOW x the fastest per unit
        self.moves = 0
        self.measured: list[float] | None = None  # seconds per unit at the last step
        self.proposed: list[int] | None = None  # the move the last step called for

    # ------------------------------------------------------------------ this replica's part
    def rows(self, replica: int) -> tuple[int, int]:
        """(first row, rows) of `replica`'s part of the global batch."""
        return sum(self.shares[:replica]) * self.unit, self.shares[replica] * self.unit

    def pass_sizes(self, replica: int) -> list[int]:
        """Rows of each of `replica`'s passes."""
        n = self.shares[replica]
        if not self.fixed_passes:
            return [self.unit] * n
        q, r = divmod(n, self.passes)
        return [q + 1] * r + [q] * (self.passes - r)

    # ------------------------------------------------------------------ the controller
    def observe(self, seconds: list[float]) -> bool:
        """Each replica's compute seconds for its shares this step; moves units when it pays.
        Returns whether the shares changed."""
        for r, t in enumerate(seconds):
            old = self.seconds[r]
            self.seconds[r] = t if old is None else (1 - SMOOTHING) * old + SMOOTHING * t
        per_unit = self.measured = self.per_unit()
        fastest = min(per_unit)
        self.slow_steps = [n + 1 if t > SLOW * fastest else 0 for n, t in zip(self.slow_steps, per_unit)]
        if not self.moving:  # --balance even: measured, not moved
            return False
        proposal = self._greedy(list(self.shares))
        if self.predicted(proposal) >= (1 - HYSTERESIS) * self.predicted(self.shares):
            self.proposed = None
            return False
        seen, self.proposed = self.proposed, proposal
        if seen == proposal:  # the same move two steps in a row: not a burst of outside load
            for r, (new, old) in enumerate(zip(proposal, self.shares)):
                if new != old:  # a new share: its time is measured afresh
                    self.before[r], self.seconds[r] = (old, self.seconds[r]), None
            self.shares, self.proposed = proposal, None
            self.moves += 1
            return True
        return False

    def per_unit(self) -> list[float]:
        return [max(t, 1e-9) / n for t, n in zip(self.seconds, self.shares)]

    def time_at(self, r: int, n: int) -> float:
        """Replica r's predicted compute seconds for n units: a line through its time at the present
        share and at the one before (what a pass costs whatever its rows, plus a time per unit), or
        through zero when that line is not one of rising cost."""
        now, t = self.shares[r], max(self.seconds[r], 1e-9)
        if self.before[r] is not None and self.before[r][0] != now:
            n0, t0 = self.before[r]
            slope = (t - t0) / (now - n0)
            if slope > 0:
                fixed = min(max(t - slope * now, 0.0), t)
                return fixed + (t - fixed) / now * n
        return t / now * n

    def predicted(self, shares: list[int]) -> float:
        return max(self.time_at(r, n) for r, n in enumerate(shares))

    def _greedy(self, shares: list[int]) -> list[int]:
        """Up to max_move units, one grain at a time, from the last to finish to the first."""
        g = self.grain
        for _ in range(self.max_move // g):
            finish = [self.time_at(r, n) for r, n in enumerate(shares)]
            donors = [r for r in range(self.dp) if shares[r] - g >= self.least]
            if not donors:
                break
            slow = max(donors, key=lambda r: finish[r])
            fast = min(range(self.dp), key=lambda r: self.time_at(r, shares[r] + g))
            if fast == slow or self.time_at(fast, shares[fast] + g) >= finish[slow]:
                break
            shares[slow] -= g
            shares[fast] += g
        return shares

    def slow_replicas(self, steps: int = 5) -> list[int]:
        """Replicas SLOW x slower per unit than the fastest for at least `steps` steps in a row."""
        return [r for r, n in enumerate(self.slow_steps) if n >= steps]

    def speeds(self) -> list[float | None]:
        """Measured sequences per second of each replica (the averaged compute time per unit)."""
        return [self.unit / t for t in self.measured] if self.measured else [None] * self.dp

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """One JSON string (checkpoints flatten dicts and lists, whose lengths follow dp)."""
        return {"json": json.dumps({"dp": self.dp, "units": self.units, "shares": self.shares, "seconds": self.seconds,
                                    "before": self.before, "moves": self.moves})}

    def load_state_dict(self, state: dict) -> None:
        """The shares a run saved, where the replicas and units are the same (else the even split:
        a restart in another world starts from even and learns again)."""
        self.reset()
        saved = json.loads(state["json"])
        if saved["dp"] == self.dp and saved["units"] == self.units and sum(saved["shares"]) == self.units:
            self.shares, self.seconds, self.moves = saved["shares"], saved["seconds"], saved["moves"]
            self.before = [tuple(b) if b else None for b in saved["before"]]


def report(b: Balancer, last_per_rank: list[float], replica_of: list[int]) -> dict:
    """The end summary's `balance`: shares (sequences), measured speeds, moves, and the ranks
    (the slowest of each persistently slow replica) to look at."""
    slow = []
    for r in b.slow_replicas():
        ranks = [k for k, x in enumerate(replica_of) if x == r]
        slow.append(max(ranks, key=lambda k: last_per_rank[k]))
    speeds = b.speeds()
    fastest = max((v for v in speeds if v), default=None)
    return {"mode": "dynamic" if b.moving else "even", "shares": [b.rows(r)[1] for r in range(b.dp)],
            "seq_per_s": speeds, "moves": b.moves, "slow_ranks": slow,
            "slow_vs_fastest": [speeds[replica_of[k]] / fastest for k in slow] if fastest else []}


def describe(rep: dict) -> str:
    """The summary's line for `report`."""
    speeds = "/".join(f"{v:,.1f}" if v else "-" for v in rep["seq_per_s"])
    line = (f"  balance ({rep['mode']}): shares {'/'.join(map(str, rep['shares']))} sequences per replica, "
            f"measured {speeds} sequences/s of compute")
    if rep["mode"] == "dynamic":
        line += f", {rep['moves']} moves"
    for k, x in zip(rep["slow_ranks"], rep["slow_vs_fastest"]):
        line += f"; rank {k} is persistently slow ({x:.2f}x the fastest replica)"
    if rep["slow_ranks"] and rep["mode"] == "even":
        line += "; --balance dynamic would give it less of the batch"
    return line


def replica_seconds(per_rank: list[float], replica_of: list[int], dp: int) -> list[float]:
    """A replica's compute time: the longest of its ranks' (its tp and pp ranks work together)."""
    out = [0.0] * dp
    for s, r in zip(per_rank, replica_of):
        out[r] = max(out[r], s)
    return out


@contextmanager
def slowed(factor: float, flight, device: torch.device | None = None):
    """--simulate-slowdown: the work inside takes `factor` times as long (a sleep of (factor - 1)
    times its own compute: the wall time less the time waited in collectives)."""
    if factor <= 1:
        yield
        return
    t0, b0 = time.perf_counter(), flight.blocked_s
    yield
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    work = time.perf_counter() - t0 - (flight.blocked_s - b0)
    time.sleep((factor - 1) * max(work, 0.0))
