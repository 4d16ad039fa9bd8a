"""The pipeline as the planner sees it: what each pipeline rank holds, and the schedule's bubble
and in-flight activations, from the same split and the same schedule tables the trainer runs."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from paratrain.models.gpt import GPTConfig
from paratrain.parallel.pipeline.partition import split_gpt
from paratrain.parallel.pipeline.schedule import bubble_fraction, build_schedule, peak_in_flight

TABLE_LIMIT = 20_000  # schedule actions up to which the real table is replayed (see schedule_info)


@dataclass(frozen=True)
class RankStages:
    blocks: int          # blocks held over all chunks
    max_chunk: int       # blocks of the largest chunk
    first: bool          # holds the embedding (stage 0)
    last: bool           # holds the head (last stage)


@functools.lru_cache(maxsize=None)
def stage_plan(cfg: GPTConfig, seq_len: int, pp: int, v: int) -> tuple[RankStages, ...]:
    """Per pipeline rank, what partition.split_gpt gives it (the split the trainer uses)."""
    if pp * v == 1:
        return (RankStages(cfg.n_layer, cfg.n_layer, True, True),)
    splits = split_gpt(cfg, seq_len, pp * v)
    n = len(splits)
    out = []
    for r in range(pp):
        chunks = [splits[c * pp + r] for c in range(v)]
        out.append(RankStages(sum(len(c) for c in chunks), max(len(c) for c in chunks), r == 0, r == (n - 1) % pp))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def schedule_info(schedule: str, p: int, m: int, v: int) -> tuple[float, tuple[int, ...], int]:
    """(bubble fraction, peak in-flight (micro-batch, chunk) activations per rank, peak in-flight
    micro-batches of the head chunk on the last rank), from the schedule's real table replayed
    with backward = 2 x forward (the bubble of these schedules does not depend on the ratio; with
    equal stages it is (p-1)/(v m + p-1)). Tables of more than TABLE_LIMIT actions use the closed
    forms they agree with (tests check): bubble (p-1)/(v m + p-1); in flight: GPipe m, 1F1B
    min(p-r, m), interleaved min(2(p-r-1) + (v-1)p + 1, v m); the head's: GPipe m, else 1."""
    if p == 1:
        return 0.0, (1,), 1
    if 2 * p * m * v <= TABLE_LIMIT:
        table = build_schedule(schedule, p, m, v)
        bubble = bubble_fraction(table, p)
        head = peak_in_flight([a for a in table[p - 1] if a.chunk == v - 1])
        return bubble, tuple(peak_in_flight(actions) for actions in table), head
    bubble = (p - 1) / (v * m + p - 1)
    if schedule == "gpipe":
        return bubble, (m,) * p, m
    if schedule == "1f1b":
        return bubble, tuple(min(p - r, m) for r in range(p)), 1
    return bubble, tuple(min(2 * (p - r - 1) + (v - 1) * p + 1, v * m) for r in range(p)), 1
