"""The optimizer step's arithmetic shared by the Trainer and the Python API: the learning-rate
schedule (linear warm-up, cosine decay), clipping on the global gradient norm across every
parallel dimension, and dynamic loss scaling for fp16.
"""

from __future__ import annotations

import math

import torch

from paratrain.comm import all_reduce
from paratrain.mesh import Mesh


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to `base_lr * min_ratio` at `total`."""
    if step <= warmup:
        return base_lr * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def clip_grad_norm(parts: list[tuple[torch.Tensor, torch.nn.Parameter]], mesh: Mesh, max_norm: float,
                   dp_sharded: bool = False) -> torch.Tensor:
    """Clip on the norm of the whole model's gradient and return that norm (a 0-d tensor on the
    device: reading it waits for the device, so callers read it once the step is launched).

    `parts` are (gradient, parameter carrying the flags). Gradients are dp-reduced already: dp
    replicas hold the same gradients, or, under ZeRO (`dp_sharded`), disjoint shards whose squares
    add up over dp. tp-sharded parameters contribute their squares summed over the tp group,
    replicated ones once, and the stages' sums add up over the pp group; the last stage's copy of
    a tied embedding is left out. Same formula as `torch.nn.utils.clip_grad_norm_`
    (max_norm <= 0: no clipping).
    """
    parts = [(g, p) for g, p in parts if g is not None]
    device = parts[0][0].device

    def sum_sq(gs) -> torch.Tensor:
        return torch.stack([g.detach().float().pow(2).sum() for g in gs]).sum() if gs else torch.zeros((), device=device)

    counted = [(g, p) for g, p in parts if not getattr(p, "pp_duplicate", False)]
    sums = torch.stack([sum_sq([g for g, p in counted if getattr(p, "tp_sharded", False)]),
                        sum_sq([g for g, p in counted if not getattr(p, "tp_sharded", False)])])
    if dp_sharded and mesh.size("dp") > 1:
        all_reduce(sums, mesh.group("dp"), mesh.comm)
    sharded, replicated = sums[0], sums[1]
    if mesh.size("tp") > 1:
        all_reduce(sharded, mesh.group("tp"), mesh.comm)
    total = sharded + replicated
    if mesh.size("pp") > 1:
        all_reduce(total, mesh.group("pp"), mesh.comm)
    norm = total.sqrt()
    if max_norm > 0:
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g, _ in parts:
            g.mul_(coef.to(g.dtype))
    return norm


def adamw(groups: list[dict], **kwargs) -> torch.optim.AdamW:
    """AdamW; on a GPU its fused kernel (one launch per step for all tensors, against several per
    tensor list for the default foreach one). The update is the same arithmetic."""
    on_gpu = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=True if on_gpu else None, **kwargs)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class LossScaler:
    """Dynamic loss scaling for fp16 (Micikevicius et al. 2018): multiply the loss by `scale`;
    on an overflow skip the step and halve it, after `window` good steps double it."""

    def __init__(self, enabled: bool, init: float = 2.0**16, window: int = 1000):
        self.scale = init if enabled else 1.0
        self.enabled, self.window, self.good = enabled, window, 0

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good = max(self.scale / 2, 1.0), 0
        else:
            self.good += 1
            if self.good % self.window == 0:
                self.scale *= 2
