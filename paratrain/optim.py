"""The optimizer step of every engine: the learning-rate schedule (linear warm-up, cosine
decay), clipping on the global gradient norm across every parallel dimension, dynamic loss
scaling for fp16, the update itself (`apply_update`) and the optimizer it steps.
"""

from __future__ import annotations

import math

import torch

from paratrain.comm import all_reduce
from paratrain.mesh import Mesh
from paratrain.parallel.roles import role_of
from paratrain.parallel.tensor import sync_sequence_parallel_grads
from paratrain.parallel.zero import ZeroDataParallel


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

    `parts` are (gradient, parameter carrying the role). Gradients are dp-reduced already: dp
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

    counted = [(g, role_of(p)) for g, p in parts if not role_of(p).pp_duplicate]
    sums = torch.stack([sum_sq([g for g, r in counted if r.tp_sharded]),
                        sum_sq([g for g, r in counted if not r.tp_sharded])])
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
        self.skipped_in_row = 0  # overflowed steps since the last good one (not saved)

    def update(self, overflow: bool) -> None:
        if not self.enabled:
            return
        if overflow:
            self.scale, self.good = max(self.scale / 2, 1.0), 0
            self.skipped_in_row += 1
        else:
            self.good += 1
            self.skipped_in_row = 0
            if self.good % self.window == 0:
                self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good": self.good}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good = float(state["scale"]), int(state["good"])


class NonFiniteNorm(ArithmeticError):
    """The global gradient norm is NaN or inf (alike on every rank): the update was not applied."""

    def __init__(self, norm: float):
        super().__init__(f"non-finite gradient norm ({norm})")
        self.norm = norm


def check_finite(norm: torch.Tensor) -> None:
    """NonFiniteNorm unless `norm` is finite. Reading it waits for the device, once per step: the
    price of never stepping on a NaN; the norm is global, so every rank decides alike."""
    if not bool(torch.isfinite(norm)):
        raise NonFiniteNorm(float(norm))


def apply_update(engine, optimizer: torch.optim.Optimizer, scaler: LossScaler, mesh: Mesh, grad_clip: float,
                 tied: list[torch.nn.Parameter]) -> tuple[torch.Tensor | float, bool]:
    """The one update step of every engine, after backward: finish the dp gradient sync, sum the
    gradients that tensor or pipeline parallelism left partial (sequence-parallel norms over tp,
    a tied embedding over its first and last stage), unscale (fp16), clip on the global norm,
    step, and publish the new parameters to compute. Returns (gradient norm, skipped): an fp16
    overflow skips the step, the norm is then nan. A non-finite norm otherwise raises
    NonFiniteNorm before the step: the parameters and optimizer state stay the last good ones."""
    engine.finish_grad_sync()
    zero = isinstance(engine, ZeroDataParallel)
    if tied and mesh.embedding_group is not None:
        if zero:
            engine.all_reduce_grads("pp_tied", mesh.embedding_group)
        else:
            for p in tied:
                all_reduce(p.grad, mesh.embedding_group, mesh.comm)
    if not zero:
        sync_sequence_parallel_grads(engine, mesh)
        norm = clip_grad_norm([(p.grad, p) for p in engine.parameters() if p.grad is not None], mesh, grad_clip)
        check_finite(norm)
        optimizer.step()
        return norm, False
    if mesh.size("tp") > 1:
        engine.all_reduce_grads("sequence_parallel", mesh.group("tp"))
    skipped = engine.unscale_grads(scaler.scale)
    scaler.update(skipped)
    if skipped:  # fp16 overflow: no update, a smaller scale next step
        return float("nan"), True
    norm = clip_grad_norm(engine.grad_parts(), mesh, grad_clip, engine.stage > 0)
    check_finite(norm)
    optimizer.step()
    engine.publish()
    return norm, False


def param_groups(engine, weight_decay: float) -> list[dict]:
    """AdamW's parameter groups (matrices decay, vectors do not): the fp32 master shards under
    ZeRO and mixed precision, the trainable parameters otherwise."""
    if isinstance(engine, ZeroDataParallel):
        decay, no_decay = engine.master_params(True), engine.master_params(False)
    else:
        ps = [p for p in engine.parameters() if p.requires_grad]
        decay, no_decay = [p for p in ps if p.dim() >= 2], [p for p in ps if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(params: list[dict], optimizer, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """The optimizer over `params` (groups of the parameters, or of ZeRO's fp32 master shards):
    paratrain's AdamW with the groups' weight decay (matrices decay, vectors do not); or the
    user's, as a class or factory called with one group of everything and keeping its own
    hyper-parameters; or an instance, rebuilt the same over these parameters. Each group's
    `initial_lr` is what the schedule scales."""
    if optimizer is None:
        opt = adamw(params, lr=lr, betas=betas)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = rebuild_optimizer(optimizer, [p for g in params for p in g["params"]])
    elif callable(optimizer):
        opt = optimizer([{"params": [p for g in params for p in g["params"]]}])
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"Trainer: optimizer= returned {type(opt).__name__}, not a torch.optim.Optimizer")
    else:
        raise TypeError(f"Trainer: optimizer= takes an optimizer class, a factory or an instance, "
                        f"got {type(optimizer).__name__}")
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


def rebuild_optimizer(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The user's optimizer instance over the parameters the strategies train (sharded, or ZeRO's
    masters): the same class and hyper-parameters. Kept as it is when it already holds exactly
    those parameters (no tensor parallelism, no ZeRO)."""
    mine = [p for g in opt.param_groups for p in g["params"]]
    if {id(p) for p in mine} == {id(p) for p in params} and not opt.state:
        return opt
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError("Trainer: the optimizer's parameter groups differ in their settings, and the strategies "
                         "replace its parameters; pass a factory instead, e.g. optimizer=lambda groups: "
                         f"torch.optim.{type(opt).__name__}(groups, ...)")
    return type(opt)([{"params": params, **settings[0]}])
