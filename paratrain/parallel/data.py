"""Data parallelism: bucketed gradient all-reduce overlapped with backward.

The scheme of PyTorch DDP (Li et al., VLDB 2020), written out: parameters are broadcast from
dp rank 0 once; gradients live in flat per-bucket buffers (each `p.grad` is a view into one);
a hook on every parameter fires when its gradient is accumulated, and when the last gradient of
a bucket arrives the bucket's all-reduce is launched asynchronously while backward carries on
with earlier layers. Buckets are launched in a fixed order so every rank issues the same
collectives in the same sequence. Under `no_sync()` (all but the last micro-batch of gradient
accumulation) gradients only accumulate locally.

Gradients are summed, not averaged: the trainer normalises the loss by the global token count,
so the sum over ranks is the gradient of the global mean loss. Pass `average=True` for the
convention of a loss averaged per rank.

With a gradient `compressor` (`--compress`) the hooks only count arrivals, and
`finish_grad_sync` hands each bucket to the compressor in bucket order (a compressed round is
synchronous and may talk twice, as PowerSGD does).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from paratrain.comm import Compressor, broadcast
from paratrain.comm.reduction import GradientAllReduce
from paratrain.mesh import Mesh
from paratrain.parallel.batchnorm import broadcast_buffers
from paratrain.parallel.roles import role_of


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor  # flat gradients of `params`, in order
    offsets: list[int]
    pending: int = 0  # gradients still to arrive in this backward
    handle: object = None  # the in-flight all-reduce
    views: list[torch.Tensor] = field(default_factory=list)


class SyncSwitch:
    """What data parallelism and ZeRO share around the module: `no_sync()` (while inside,
    gradient hooks accumulate locally instead of communicating) and the forward that first, as
    DDP does, broadcasts dp rank 0's buffers when `broadcast_buffers` is on and the previous
    forward (if any) ran with grad enabled outside `no_sync()`."""

    require_sync = True

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self.require_forward_param_sync:
            broadcast_buffers(self.module, self.mesh)
        out = self.module(*args, **kwargs)
        self.require_forward_param_sync = torch.is_grad_enabled() and self.require_sync
        return out

    @contextmanager
    def no_sync(self):
        """Accumulate gradients locally, without communication (all but the last micro-batch)."""
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous


def sync_module_states(module: nn.Module, mesh: Mesh) -> None:
    """Every parameter (frozen ones too) and buffer as dp rank 0 has it, once, as DDP does at
    construction: replicas that start apart would never meet again."""
    if mesh.size("dp") == 1:
        return
    src, group = mesh.ranks("dp")[0], mesh.group("dp")
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            broadcast(t.data, src, group, mesh.comm)


class DataParallel(SyncSwitch, nn.Module):
    def __init__(self, module: nn.Module, mesh: Mesh, bucket_mb: float = 25.0, average: bool = False,
                 compressor: Compressor | None = None, broadcast_buffers: bool = True, allreduce: str = "backend",
                 sync_states: bool = True):
        super().__init__()
        self.module = module
        self.broadcast_buffers = broadcast_buffers
        self.require_forward_param_sync = True  # DDP's name: sync buffers before the next forward
        self.compressor = compressor
        self.mesh = mesh
        self.group = mesh.group("dp")
        self.dp = mesh.size("dp")
        self.average = average
        self.require_sync = True
        self.reduction = GradientAllReduce(allreduce, mesh)  # --allreduce: the backend's, or ours on a thread
        params = [p for p in module.parameters() if p.requires_grad]
        if sync_states:  # off for Horovod's optimizer: its script broadcasts the parameters itself
            sync_module_states(module, mesh)
        self.buckets: list[Bucket] = []
        self._slot_of: dict[nn.Parameter, tuple[int, int]] = {}  # param -> (bucket, index)
        self._next_to_launch = 0
        if self.dp > 1:
            # Reverse registration order approximates the order in which backward produces grads.
            self._build_buckets(list(reversed(params)), int(bucket_mb * 2**20))
            for p in params:
                p.register_post_accumulate_grad_hook(self._on_grad_ready)
            self.zero_grad()

    def _build_buckets(self, params: list[nn.Parameter], cap_bytes: int) -> None:
        groups: list[list[nn.Parameter]] = []
        size = 0
        for p in params:
            nbytes = p.numel() * p.element_size()
            if not groups or size + nbytes > cap_bytes or p.dtype != groups[-1][0].dtype:
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += nbytes
        for ps in groups:
            offsets, n = [], 0
            for p in ps:
                offsets.append(n)
                n += p.numel()
            buf = torch.zeros(n, dtype=ps[0].dtype, device=ps[0].device)
            views = [buf[o : o + p.numel()].view_as(p) for o, p in zip(offsets, ps)]
            self.buckets.append(Bucket(ps, buf, offsets, pending=len(ps), views=views))
            for i, p in enumerate(ps):
                self._slot_of[p] = (len(self.buckets) - 1, i)

    def _on_grad_ready(self, p: nn.Parameter) -> None:
        if not self.require_sync:
            return
        bucket, index = self._slot_of[p]
        b = self.buckets[bucket]
        view = b.views[index]
        if p.grad.data_ptr() != view.data_ptr():  # the grad was replaced (e.g. set to None)
            view.copy_(p.grad)
            p.grad = view
        b.pending -= 1
        self._launch_ready_buckets()

    def _launch_ready_buckets(self, force: bool = False) -> None:
        if self.compressor is not None:
            return  # compressed buckets are reduced in finish_grad_sync
        # Launch strictly in bucket order so that all ranks issue identical collective sequences.
        while self._next_to_launch < len(self.buckets):
            b = self.buckets[self._next_to_launch]
            if b.pending > 0 and not force:
                return
            b.handle = self.reduction.start(b.buffer)
            self._next_to_launch += 1

    def finish_grad_sync(self) -> None:
        """Wait for every bucket's all-reduce; afterwards `p.grad` holds the dp-summed gradient.

        Buckets with parameters that received no gradient (unused in this forward) are launched
        here, so ranks stay in step.
        """
        if self.dp == 1:
            return
        self._launch_ready_buckets(force=True)
        for i, b in enumerate(self.buckets):
            if self.compressor is not None:
                # tp-sharded and replicated gradients apart: a replicated parameter's compressed
                # sum must not depend on this tp rank's shards, or its replicas would drift apart
                for sharded in (True, False):
                    views = [v for p, v in zip(b.params, b.views) if role_of(p).tp_sharded == sharded]
                    if views:
                        self.compressor.reduce((i, sharded), views, self.group, self.mesh.comm)
            else:
                b.handle.wait()
                b.handle = None
            b.pending = len(b.params)
            if self.average:
                b.buffer.div_(self.dp)
        self._next_to_launch = 0

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Zero the gradient buffers in place (grads stay views into the buckets)."""
        if self.dp == 1:
            self.module.zero_grad(set_to_none=set_to_none)
            return
        for b in self.buckets:
            b.buffer.zero_()
            for p, v in zip(b.params, b.views):
                p.grad = v
