"""Run one rank's pipeline schedule: forward and backward actions with point-to-point transfers.

The schedule (schedule.py) is a list of actions per rank; this interpreter runs them in order.
Activations go to the next stage and gradients to the previous one with non-blocking sends; a
receive blocks just before the action that needs it. Since sends never block, a rank can only
wait on a value its peer is due to send, and a schedule whose table simulates without deadlock
runs without deadlock on gloo and NCCL. Each action's wall-clock interval is recorded, so the
measured idle fraction and the timeline come from the run itself.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn as nn

from paratrain.balance import slowed
from paratrain.comm import isend, recv
from paratrain.mesh import Mesh
from paratrain.parallel.pipeline.schedule import Action, stage_of


class PipelineExecutor:
    def __init__(self, chunks: list[nn.Module], mesh: Mesh, actions: list[Action], n_stages: int,
                 act_shape: tuple[int, ...] | list[tuple[int, ...]], device: torch.device,
                 no_sync: Callable | None = None):
        """`chunks[c]` is this rank's module for global stage c * pp + pp_rank; `act_shape` is the
        shape that crosses stage boundaries (the GPT's (micro-batch, sequence, hidden)), or a list
        of shapes: the output of stage s for every s but the last; `no_sync` (from DataParallel)
        defers gradient all-reduce until this rank's last backward."""
        self.chunks, self.mesh, self.actions = chunks, mesh, actions
        self.p, self.rank = mesh.size("pp"), mesh.coord("pp")
        self.n_stages = n_stages
        self.ranks = mesh.ranks("pp")
        self.group = mesh.group("pp")
        # the shape each stage but the last sends (one shape for all boundaries, or one per stage)
        self.act_shape = act_shape if isinstance(act_shape, list) else [tuple(act_shape)] * (n_stages - 1)
        self.device = device
        self.act_dtype = torch.float32  # the compute dtype (bf16 / fp16 under mixed precision)
        self.no_sync = no_sync or nullcontext
        self.events: list[dict] = []  # {"rank", "name", "kind", "start", "end"} of the last run
        self.wall_start = 0.0  # time.time() when the last run began: aligns the ranks' events
        self.slowdown = 1.0  # --simulate-slowdown: this rank's forwards and backwards take this many times as long

    def _tag(self, mb: int, stage: int, backward: bool) -> int:
        return (2 * mb + backward) * self.n_stages + stage

    def _neighbour(self, stage: int) -> int:
        return self.ranks[stage % self.p]

    def _shape(self, a: int, b: int) -> tuple[int, ...]:
        """The shape exchanged between neighbouring stages a and b: the lower one's output."""
        return tuple(self.act_shape[min(a, b)])

    def _receive(self, src_stage: int, mb: int, backward: bool, stage: int) -> torch.Tensor:
        buf = torch.empty(self._shape(src_stage, stage), dtype=self.act_dtype, device=self.device)
        t0 = time.perf_counter()
        recv(buf, self._neighbour(src_stage), self.group, tag=self._tag(mb, stage, backward), stats=self.mesh.comm)
        self._event("recv", f"recv {'grad' if backward else 'act'} {mb}", t0)
        return buf

    def _send(self, t: torch.Tensor, dst_stage: int, mb: int, backward: bool, stage: int, pending: list):
        shape = self._shape(stage, dst_stage)
        if tuple(t.shape) != shape or t.dtype != self.act_dtype:
            raise RuntimeError(
                f"pipeline stage {stage} would send {tuple(t.shape)} {t.dtype} but stages {stage} and "
                f"{dst_stage} exchange {shape} {self.act_dtype}"
            )
        pending.append(isend(t.detach().contiguous(), self._neighbour(dst_stage), self.group, self.mesh.comm,
                             tag=self._tag(mb, dst_stage, backward)))

    def _event(self, kind: str, name: str, t0: float) -> None:
        self.events.append({"rank": self.mesh.rank, "name": name, "kind": kind,
                            "start": t0 - self.t_start, "end": time.perf_counter() - self.t_start})

    def run(self, inputs: list[torch.Tensor], loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
            forward_only: bool = False) -> torch.Tensor:
        """Run the schedule on micro-batches `inputs` (token ids, used by stage 0); `loss_fn(logits,
        mb)` is called on the last stage. Returns the sum of this rank's micro-batch losses (zero
        unless it holds the last stage)."""
        self.events, self.t_start, self.wall_start = [], time.perf_counter(), time.time()
        total = torch.zeros((), device=self.device)
        saved: dict[tuple[int, int], tuple[torch.Tensor | None, torch.Tensor]] = {}
        pending: list = []
        actions = [a for a in self.actions if a.kind == "F"] if forward_only else self.actions
        last_backward = max((i for i, a in enumerate(actions) if a.kind == "B"), default=-1)
        for i, a in enumerate(actions):
            stage = stage_of(a, self.rank, self.p)
            chunk = self.chunks[a.chunk]
            if a.kind == "F":
                if stage == 0:
                    x = inputs[a.mb].to(self.device)
                else:
                    x = self._receive(stage - 1, a.mb, False, stage).requires_grad_(not forward_only)
                t0 = time.perf_counter()
                with torch.no_grad() if forward_only else nullcontext(), slowed(self.slowdown, self.mesh.comm.flight):
                    y = chunk(x)
                    if stage == self.n_stages - 1:
                        y = loss_fn(y, a.mb)
                        total = total + y.detach()
                self._event("F", str(a), t0)
                if stage < self.n_stages - 1:
                    self._send(y, stage + 1, a.mb, False, stage, pending)
                if not forward_only:
                    saved[(a.mb, a.chunk)] = (x if stage > 0 else None, y)
            else:
                x, y = saved.pop((a.mb, a.chunk))
                grad = None if stage == self.n_stages - 1 else self._receive(stage + 1, a.mb, True, stage)
                t0 = time.perf_counter()
                with nullcontext() if i == last_backward else self.no_sync(), slowed(self.slowdown, self.mesh.comm.flight):
                    torch.autograd.backward(y, grad)
                self._event("B", str(a), t0)
                if stage > 0:
                    self._send(x.grad, stage - 1, a.mb, True, stage, pending)
        for work in pending:
            work.wait()
        return total

    def idle_fraction(self) -> float:
        """1 - (compute time / wall time) of the last run, from its own timings."""
        if not self.events:
            return 0.0
        busy = sum(e["end"] - e["start"] for e in self.events if e["kind"] in ("F", "B"))
        wall = max(e["end"] for e in self.events)
        return 1.0 - busy / wall if wall > 0 else 0.0
