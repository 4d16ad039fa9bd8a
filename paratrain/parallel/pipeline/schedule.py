"""Pipeline schedules as pure data: one ordered list of actions per rank.

A schedule says *what* each rank computes and in which order; an executor elsewhere runs it and
does the point-to-point transfers (the DeepSpeed / Alpa split). Rank r holds v model chunks;
chunk c is global stage c * p + r, so with v > 1 a micro-batch loops through the ranks v times.
`simulate` replays a table with fixed per-action costs to get its timeline, bubble and deadlocks.
"""

from __future__ import annotations

from dataclasses import dataclass

Table = list[list["Action"]]
Timeline = list[list[tuple["Action", float, float]]]


@dataclass(frozen=True)
class Action:
    kind: str   # "F" (forward) or "B" (backward)
    mb: int     # micro-batch index, 0..m-1
    chunk: int  # model chunk held by this rank, 0..v-1; its global stage is chunk * p + rank

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f".{self.chunk}" if self.chunk else "")


def stage_of(action: Action, rank: int, p: int) -> int:
    """Global pipeline stage that `action` runs on `rank`."""
    return action.chunk * p + rank


def _check_sizes(p: int, m: int, v: int = 1) -> None:
    if p < 1 or m < 1 or v < 1:
        raise ValueError(f"pipeline needs p, m, v >= 1, got p={p}, m={m}, v={v}")


def gpipe(p: int, m: int) -> Table:
    """GPipe (Huang et al. 2019): every rank runs all m forwards, then all m backwards.
    Simple, but each rank keeps the activations of all m micro-batches."""
    _check_sizes(p, m)
    return [[Action("F", mb, 0) for mb in range(m)] + [Action("B", mb, 0) for mb in range(m)]
            for _ in range(p)]


def one_f_one_b(p: int, m: int) -> Table:
    """PipeDream-flush 1F1B (Narayanan et al. 2019/2021): same bubble as GPipe, but rank r holds
    at most p - r micro-batches, since it starts backwards as soon as the pipeline is full."""
    _check_sizes(p, m)
    table = []
    for rank in range(p):
        n_warmup = min(p - rank - 1, m)
        actions = []
        for mb in range(n_warmup):                  # warm-up: fill the pipeline
            actions.append(Action("F", mb, 0))
        for i in range(m - n_warmup):               # steady state: one forward, one backward
            actions.append(Action("F", n_warmup + i, 0))
            actions.append(Action("B", i, 0))
        for mb in range(m - n_warmup, m):           # cool-down: drain the remaining backwards
            actions.append(Action("B", mb, 0))
        table.append(actions)
    return table


def interleaved_1f1b(p: int, m: int, v: int) -> Table:
    """Megatron-LM interleaved 1F1B (Narayanan et al. 2021, "Efficient Large-Scale Language Model
    Training on GPU Clusters"): v chunks per rank cut the bubble by v, for v times the p2p traffic.
    Micro-batches go through the chunks in groups of p, hence m % p == 0."""
    _check_sizes(p, m, v)
    if m % p:
        raise ValueError(f"interleaved schedule needs the number of micro-batches ({m}) "
                         f"to be a multiple of the pipeline size ({p})")
    if v == 1:
        return one_f_one_b(p, m)
    total = m * v

    def forward(k: int) -> Action:               # k-th forward of a rank
        return Action("F", (k // (p * v)) * p + k % p, (k // p) % v)

    def backward(k: int) -> Action:              # k-th backward: chunks in reverse order
        return Action("B", (k // (p * v)) * p + k % p, v - 1 - (k // p) % v)

    table = []
    for rank in range(p):
        n_warmup = min((p - rank - 1) * 2 + (v - 1) * p, total)
        actions = []
        for k in range(n_warmup):                   # warm-up
            actions.append(forward(k))
        for i in range(total - n_warmup):           # steady state: one forward, one backward
            actions.append(forward(n_warmup + i))
            actions.append(backward(i))
        for k in range(total - n_warmup, total):    # cool-down
            actions.append(backward(k))
        table.append(actions)
    return table


SCHEDULES = ("gpipe", "1f1b", "interleaved")


def build_schedule(name: str, p: int, m: int, v: int = 1) -> Table:
    """The schedule `name` (one of SCHEDULES) for p ranks, m micro-batches and v chunks per rank."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    _check_sizes(p, m, v)
    if m < p:
        raise ValueError(f"pipeline schedule needs at least as many micro-batches as stages "
                         f"per chunk: m={m} < p={p} would leave ranks idle")
    if name == "interleaved":
        return interleaved_1f1b(p, m, v)
    if v != 1:
        raise ValueError(f"schedule {name!r} holds one chunk per rank; v={v} needs 'interleaved'")
    return gpipe(p, m) if name == "gpipe" else one_f_one_b(p, m)


def check_schedule(table: Table, p: int, m: int, v: int) -> None:
    """Raise ValueError unless every rank runs F and B of each (micro-batch, chunk) exactly once,
    each F before its B, and the table replays without deadlock across stages."""
    if len(table) != p:
        raise ValueError(f"schedule has {len(table)} ranks, expected {p}")
    expected = {(mb, c) for mb in range(m) for c in range(v)}
    for rank, actions in enumerate(table):
        done_f: set[tuple[int, int]] = set()
        done_b: set[tuple[int, int]] = set()
        for a in actions:
            key = (a.mb, a.chunk)
            if a.kind not in ("F", "B") or key not in expected:
                raise ValueError(f"rank {rank}: invalid action {a!r} for m={m}, v={v}")
            seen = done_f if a.kind == "F" else done_b
            if key in seen:
                raise ValueError(f"rank {rank}: {a} appears twice")
            if a.kind == "B" and key not in done_f:
                raise ValueError(f"rank {rank}: {a} comes before its forward")
            seen.add(key)
        if done_f != expected or done_b != expected:
            raise ValueError(f"rank {rank}: has {len(done_f)} forwards and {len(done_b)} backwards, "
                             f"expected {len(expected)} of each")
    simulate(table, p)


def simulate(table: Table, p: int, t_f: float = 1.0, t_b: float = 2.0) -> Timeline:
    """Replay the table with forward cost t_f and backward cost t_b (no transfer cost). An action
    starts when its rank is free and its inputs exist: F(mb, s) needs F(mb, s-1); B(mb, s) needs
    F(mb, s) and B(mb, s+1). Returns (action, start, end) per rank; ValueError on deadlock."""
    n_stages = p * (1 + max((a.chunk for actions in table for a in actions), default=0))
    end: dict[tuple[str, int, int], float] = {}    # (kind, mb, stage) -> end time
    out: Timeline = [[] for _ in table]
    nxt = [0] * len(table)
    free = [0.0] * len(table)
    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(table):
            while nxt[rank] < len(actions):
                a = actions[nxt[rank]]
                s = stage_of(a, rank, p)
                if a.kind == "F":
                    deps = [("F", a.mb, s - 1)] if s > 0 else []
                else:
                    deps = [("F", a.mb, s)] + ([("B", a.mb, s + 1)] if s < n_stages - 1 else [])
                if any(d not in end for d in deps):
                    break
                start = max([free[rank]] + [end[d] for d in deps])
                free[rank] = start + (t_f if a.kind == "F" else t_b)
                end[(a.kind, a.mb, s)] = free[rank]
                out[rank].append((a, start, free[rank]))
                nxt[rank] += 1
                progress = True
    stuck = [f"rank {r}: {actions[nxt[r]]}" for r, actions in enumerate(table) if nxt[r] < len(actions)]
    if stuck:
        raise ValueError("pipeline schedule deadlocks; waiting: " + ", ".join(stuck))
    return out


def bubble_fraction(table: Table, p: int, t_f: float = 1.0, t_b: float = 2.0) -> float:
    """Idle time summed over ranks / (p * makespan), from `simulate`."""
    sim = simulate(table, p, t_f, t_b)
    makespan = max((e for rank in sim for _, _, e in rank), default=0.0)
    if makespan == 0:
        return 0.0
    busy = sum(e - s for rank in sim for _, s, e in rank)
    return 1.0 - busy / (p * makespan)


def peak_in_flight(actions: list[Action]) -> int:
    """Most (micro-batch, chunk) activations a rank holds at once: max of #F done - #B done."""
    live = peak = 0
    for a in actions:
        live += 1 if a.kind == "F" else -1
        peak = max(peak, live)
    return peak
