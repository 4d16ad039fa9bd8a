"""Batch normalisation (Ioffe & Szegedy, ICML 2015) under data parallelism.

Two things keep BatchNorm right when each dp rank sees only part of a batch:

- `broadcast_buffers`: DDP's forward buffer sync (`broadcast_buffers=True`, Li et al., VLDB 2020).
  Each replica updates its running statistics from its own batch; before a forward, every buffer
  is replaced by dp rank 0's, so the replicas keep one set of statistics (rank 0's).
- `SyncBatchNorm`: the batch statistics of the whole dp group. Each rank packs its per-channel
  sum, sum of squares and element count into one tensor, one all-reduce gives the global mean
  and variance, and backward all-reduces the two per-channel sums that the input gradient needs.
  Unlike torch's `nn.SyncBatchNorm` it runs on CPU tensors over gloo as well.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from paratrain.comm import CommStats, all_reduce, broadcast
from paratrain.mesh import Mesh


@torch.no_grad()
def broadcast_buffers(module: nn.Module, mesh: Mesh) -> None:
    """Every floating, integer and bool buffer of `module` as dp rank 0 has it: one broadcast
    per dtype, of the dtype's buffers packed into one flat tensor (DDP coalesces them too)."""
    if mesh.size("dp") == 1:
        return
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for b in module.buffers():
        if not b.is_complex():
            by_kind.setdefault((b.device, b.dtype), []).append(b)
    src, group = mesh.ranks("dp")[0], mesh.group("dp")
    for bufs in by_kind.values():  # same order on every rank: the modules are built alike
        flat = torch.cat([b.reshape(-1) for b in bufs])
        broadcast(flat, src, group, mesh.comm)
        # as DDP: overwriting a buffer that autograd saved (an eval-mode BatchNorm) must not
        # fail the version check of a backward still to come
        with torch.autograd._unsafe_preserve_version_counter(tuple(bufs)):
            for b, part in zip(bufs, flat.split([b.numel() for b in bufs])):
                b.copy_(part.view_as(b))


def _channel_shape(x: torch.Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector over (N, C, *)."""
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward: normalise with the statistics of the whole group (one all-reduce of sum, sum of
    squares and count). Backward: all-reduce sum(dy) and sum(dy * x_hat), the two terms through
    which every rank's input reaches every other rank's output."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float, group, stats: CommStats):
        acc = torch.promote_types(x.dtype, torch.float32)  # statistics in at least fp32
        xs, c = x.to(acc), x.shape[1]
        dims = [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() // c, dtype=acc, device=x.device)
        packed = torch.cat([xs.sum(dims), (xs * xs).sum(dims), count])
        all_reduce(packed, group, stats)
        n = float(packed[-1])
        if n <= 1:
            raise ValueError(f"SyncBatchNorm: expected more than 1 value per channel when training, got {n:g}")
        mean = packed[:c] / n
        var = (packed[c : 2 * c] / n - mean * mean).clamp_(min=0)  # biased: what normalises
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:  # unbiased, as nn.BatchNorm keeps it
            running_var.mul_(1 - momentum).add_((var * (n / (n - 1))).to(running_var.dtype), alpha=momentum)
        shape = _channel_shape(x)
        y = (xs - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(acc).view(shape)
        if bias is not None:
            y = y + bias.to(acc).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n, ctx.group, ctx.stats = n, group, stats
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        acc, shape, c = mean.dtype, _channel_shape(x), x.shape[1]
        dims = [0, *range(2, x.dim())]
        dys = dy.to(acc)
        x_hat = (x.to(acc) - mean.view(shape)) * invstd.view(shape)
        sum_dy, sum_dy_xhat = dys.sum(dims), (dys * x_hat).sum(dims)  # this rank's: weight and bias grads
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            packed = torch.cat([sum_dy, sum_dy_xhat])
            all_reduce(packed, ctx.group, ctx.stats)
            g_dy, g_dy_xhat = packed[:c] / ctx.n, packed[c:] / ctx.n
            scale = invstd if weight is None else invstd * weight.to(acc)
            grad_x = ((dys - g_dy.view(shape) - x_hat * g_dy_xhat.view(shape)) * scale.view(shape)).to(x.dtype)
        if ctx.needs_input_grad[1]:  # (autograd casts these to the parameters' dtype)
            grad_w = sum_dy_xhat
        if ctx.needs_input_grad[2]:
            grad_b = sum_dy
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """BatchNorm over the whole dp group's batch in training (any (N, C, *) input, as
    BatchNorm1d/2d/3d take); eval mode uses the running statistics and does not communicate.
    Ranks may hold batches of different sizes: the element count is all-reduced with the sums."""

    def __init__(self, num_features: int, mesh: Mesh, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.mesh = mesh

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm: expected at least 2D input (N, C, *), got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        if not (bn_training and self.training and self.mesh.size("dp") > 1):
            return nn.functional.batch_norm(x, running_mean, running_var, self.weight, self.bias, bn_training,
                                            momentum, self.eps)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, running_mean, running_var, self.eps, momentum,
                                            self.mesh.group("dp"), self.mesh.comm)


def convert_sync_batchnorm(module: nn.Module, mesh: Mesh) -> nn.Module:
    """`module` with every BatchNorm layer (`_BatchNorm`, torch's SyncBatchNorm too) replaced by a
    `SyncBatchNorm` over `mesh`'s dp group that keeps the layer's parameters (the same tensors,
    so `requires_grad` too), buffers and mode, as `torch.nn.SyncBatchNorm.convert_sync_batchnorm`."""
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(module.num_features, mesh, module.eps, module.momentum, module.affine,
                            module.track_running_stats, bias=module.bias is not None)
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, mesh))
    return out
