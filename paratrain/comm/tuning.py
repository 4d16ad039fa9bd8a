"""`--allreduce auto`: the algorithm of each collective chosen by timing the candidates on the run's
own group, once per (operation, size, dtype), as NCCL's tuner picks by its own tables and Horovod's
autotuner by measured throughput.

Why measured and not modelled: the alpha-beta model of the links (comm/algorithms.py,
`predicted_times`, which the planner uses) predicts large messages well, but below a few hundred
KiB a collective's time on a host shared by several workers is the time the peers take to be
scheduled, which no link term captures (BENCHMARKS.md, "All-reduce across nodes": the model's pick
was up to 3.5x slower than the tree there). So the first collective of each shape times every
candidate a few times (each call started together, the slowest rank's time kept), the ranks agree
on the times (an all-gather of our own: bit-identical everywhere), and all take the fastest.
Tuning runs on the communication thread, in the order the collectives were started, the same on
every rank; its traffic is fingerprinted for the hang reports but not counted in `comm_bytes`.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from paratrain.comm.algorithms import all_reduce_with, tree_all_reduce, two_levels
from paratrain.comm.collectives import CommStats
from paratrain.comm.sharded import all_gather_with, reduce_scatter_with, ring_all_gather


def candidates(op: str, n: int, node_size: int | None) -> list[str]:
    """The algorithms `auto` tries for `op` over n ranks: the tree only all-reduces, and the
    hierarchical ones need two levels (else they are another's fallback)."""
    out = ["backend", "ring"] + (["tree"] if op == "all_reduce" else [])
    return out + (["hierarchical"] if two_levels(n, node_size) else [])


def repeats(nbytes: int) -> int:
    """Timed calls per candidate: more where a call is short and noisy."""
    return 11 if nbytes <= 1 << 20 else 5 if nbytes <= 16 << 20 else 3


class Tuner:
    """The choice of `auto` for one group, remembered per (op, numel, dtype)."""

    def __init__(self, group: dist.ProcessGroup, node_size: int | None, stats: CommStats):
        self.group, self.node_size, self.stats = group, node_size, stats
        self.n = dist.get_world_size(group)
        self.picked: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}  # seconds per candidate, for reports and tests

    def pick(self, op: str, like: torch.Tensor) -> str:
        """The algorithm for `op` on tensors like `like` (an all-reduce's tensor, a reduce-scatter's
        input, an all-gather's output); times the candidates the first time (collective)."""
        numel = like.numel()
        key = (op, numel, like.dtype)
        if key not in self.picked:
            names = candidates(op, self.n, self.node_size)
            seconds = self._time(op, names, numel, like)
            self.timings[key] = dict(zip(names, seconds))
            self.picked[key] = names[min(range(len(names)), key=seconds.__getitem__)]
        return self.picked[key]

    def _time(self, op: str, names: list[str], numel: int, like: torch.Tensor) -> list[float]:
        """Median seconds of each of `names`, the slowest rank's, agreed by every rank."""
        buf = torch.zeros(numel, dtype=like.dtype, device=like.device)
        shard = torch.zeros(numel // self.n, dtype=like.dtype, device=like.device)
        reps = repeats(numel * like.element_size())
        mine = []
        for name in names:
            self._call(op, name, buf, shard)  # warm-up: the first use of this size
            seen = []
            for _ in range(reps):
                tree_all_reduce(torch.zeros(1), self.group, self.stats)  # start together
                t0 = time.perf_counter()
                self._call(op, name, buf, shard)
                seen.append(time.perf_counter() - t0)
            mine.append(statistics.median(seen))
        everyone = torch.empty(self.n * len(names), dtype=torch.float64)
        ring_all_gather(everyone, torch.tensor(mine, dtype=torch.float64), self.group, self.stats)
        return everyone.view(self.n, len(names)).max(dim=0).values.tolist()

    def _call(self, op: str, name: str, buf: torch.Tensor, shard: torch.Tensor) -> None:
        if op == "all_reduce":
            all_reduce_with(buf, self.group, self.stats, name, self.node_size)
        elif op == "reduce_scatter":
            reduce_scatter_with(shard, buf, self.group, self.stats, name, self.node_size)
        else:
            all_gather_with(buf, shard, self.group, self.stats, name, self.node_size)
