"""A model cut into pipeline stages, this rank's chunks, and the schedule that runs them.

The model spec cuts the model into `pp x v` stage modules whose parameters keep the full
model's names; every rank keeps stages rank, rank + pp, ... (interleaved when v > 1). A matrix
on both the first and the last stage (a tied embedding and head) is kept in both places and
its two gradients are summed every step (Megatron's embedding group); any other parameter shared
between stages is refused. The shapes that cross stage boundaries are found by one forward of a
micro-batch without gradients, stage after stage, again whenever the micro-batch shape changes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from paratrain.comm import isend, recv
from paratrain.mesh import Mesh
from paratrain.parallel.pipeline.executor import PipelineExecutor
from paratrain.parallel.pipeline.schedule import bubble_fraction, build_schedule
from paratrain.parallel.roles import set_role


class Pipeline:
    def __init__(self, stages: list[nn.Module], mesh: Mesh, schedule: str, microbatches: int, virtual_stages: int,
                 device: torch.device):
        self.mesh, self.microbatches, self.schedule = mesh, microbatches, schedule
        p, rank = mesh.size("pp"), mesh.coord("pp")
        self.v = v = virtual_stages if schedule == "interleaved" else 1
        n = p * v
        if len(stages) != n:
            raise ValueError(f"pipeline: {len(stages)} stages given for pp={p} x {v} virtual stages")
        self.table = build_schedule(schedule, p, microbatches, v)  # refuses too few micro-batches
        self.tables = {microbatches: self.table}  # by micro-batches: --balance dynamic changes them
        self.bubble_theory = bubble_fraction(self.table, p)
        self.tied = self._tie(stages, rank, p)
        self.stage_blocks = [list(getattr(s, "blocks", {}).keys()) for s in stages]  # names, for the split's report
        self.chunks = nn.ModuleList([stages[s] for s in range(rank, n, p)])
        self.executor = PipelineExecutor(list(self.chunks), mesh, self.table[rank], n, [], device)
        self._probed: tuple | None = None

    @staticmethod
    def _tie(stages: list[nn.Module], rank: int, p: int) -> list[nn.Parameter]:
        """Parameters on the first and the last stage: this rank's copies, with their role."""
        n, owner, tied = len(stages), {}, []
        for s, stage in enumerate(stages):
            for q in stage.parameters():
                first = owner.setdefault(id(q), s)
                if first == s:
                    continue
                if (first, s) != (0, n - 1):
                    raise ValueError(f"parallelize: pipeline stage {s} shares a parameter with stage {first}; only "
                                     "the first and the last stage may share one (a tied embedding): untie it, "
                                     "or split elsewhere")
                tied.append(q)
        mine = []
        for q in tied:
            on_first, on_last = rank == 0, (n - 1) % p == rank
            if on_first or on_last:  # the last stage's copy is counted and saved once, on the first
                set_role(q, pp_tied=True, pp_duplicate=on_last and not on_first)
                mine.append(q)
        return mine

    def describe(self) -> str:
        """Each stage's first and last block, e.g. `0:[0-3] 1:[4-7]`."""
        return " ".join(f"{s}:[{b[0]}-{b[-1]}]" if b else f"{s}:[]" for s, b in enumerate(self.stage_blocks))

    def _probe_shapes(self, micro) -> None:
        """One forward of a micro-batch, stage after stage without gradients and in eval mode (no
        running statistics change), to learn the shape each stage sends."""
        ex = self.executor
        shapes = [None] * (ex.n_stages - 1)
        modes = [c.training for c in self.chunks]
        self.chunks.eval()
        with torch.no_grad():
            for s in range(ex.rank, ex.n_stages, ex.p):
                if s == 0:
                    x = micro.to(ex.device)
                else:  # the header lives on the device: NCCL sends device tensors only
                    header = torch.zeros(9, dtype=torch.int64, device=ex.device)
                    recv(header, ex._neighbour(s - 1), ex.group, tag=s, stats=self.mesh.comm)
                    shapes[s - 1] = tuple(header[1 : 1 + header[0]].tolist())
                    x = torch.zeros(shapes[s - 1], dtype=ex.act_dtype, device=ex.device)
                y = self.chunks[s // ex.p](x)
                if s < ex.n_stages - 1:
                    shapes[s] = tuple(y.shape)
                    if len(shapes[s]) > 8:
                        raise ValueError(f"pipeline stage {s} outputs a tensor of {len(shapes[s])} dimensions (at most 8)")
                    header = torch.tensor([len(y.shape), *y.shape, *[0] * (8 - len(y.shape))], dtype=torch.int64,
                                          device=ex.device)
                    isend(header, ex._neighbour(s + 1), ex.group, self.mesh.comm, tag=s + 1).wait()
        for c, mode in zip(self.chunks, modes):
            c.train(mode)
        ex.act_shape = shapes

    def set_microbatches(self, m: int) -> None:
        """Run `m` micro-batches per step from now on (a replica's share under --balance dynamic)."""
        p = self.mesh.size("pp")
        if m not in self.tables:
            self.tables[m] = build_schedule(self.schedule, p, m, self.v)
        self.microbatches, self.table = m, self.tables[m]
        self.executor.actions = self.table[self.mesh.coord("pp")]
        self.bubble_theory = bubble_fraction(self.table, p)

    def run(self, inputs: list, loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
            forward_only: bool = False) -> torch.Tensor:
        """Run the schedule on the micro-batches `inputs` (read by the first stage; each a tensor);
        `loss_fn(outputs, i)` is micro-batch i's loss on the last stage. Returns the sum of this
        rank's micro-batch losses (zero unless it holds the last stage)."""
        if not torch.is_tensor(inputs[0]):
            raise ValueError("pipeline: the first stage takes one tensor per micro-batch, got "
                             f"{type(inputs[0]).__name__}; pass the inputs as a tensor")
        if len(inputs) != self.microbatches:
            self.set_microbatches(len(inputs))
        key = (tuple(inputs[0].shape), inputs[0].dtype)
        if self._probed != key:
            self._probe_shapes(inputs[0])
            self._probed = key
        return self.executor.run(inputs, loss_fn, forward_only=forward_only)
