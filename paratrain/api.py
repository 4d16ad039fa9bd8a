"""The Python API: bring your own model, loss and data.

    import paratrain
    mesh = paratrain.init(dp=2)                       # under torchrun, or any initialised group
    trainer = paratrain.Trainer(model, mesh, loss_fn, zero=3, precision="bf16", lr=3e-4)
    for inputs, targets in loader:                    # each rank its own shard of the data
        loss = trainer.step(inputs, targets)          # the global mean loss, the same on every rank

`parallelize(model, mesh, ...)` applies the strategies to any `nn.Module` in the fixed order of
DESIGN.md: a tensor-parallel plan (module path pattern -> style, as in
`paratrain.parallel.tensor.GPT_PLAN`), then data parallelism or ZeRO (with fp32 master weights
for mixed precision; ZeRO-3 gathers per layer, the layers found by `zero.blocks_of` or given as
`blocks`), then activation checkpointing of those layers. Pipeline parallelism of arbitrary
models is not offered here: a pipeline needs the model as a sequence of stages with one
activation shape between them, which paratrain's GPT provides (`paratrain train --pp`).
"""

from __future__ import annotations

import os
import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.comm import all_reduce
from paratrain.mesh import Mesh
from paratrain.parallel.data import DataParallel
from paratrain.parallel.tensor import parallelize_tensor
from paratrain.parallel.zero import ZeroDataParallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def init(dp: int | None = None, tp: int = 1, pp: int = 1, backend: str | None = None) -> Mesh:
    """Join the process group (from torchrun's environment, unless already initialised) and lay
    the ranks out as pp x dp x tp; dp defaults to world / (tp * pp)."""
    if not dist.is_initialized():
        from paratrain.launch import init_process_group

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        init_process_group(backend or ("nccl" if cuda else "gloo"))
    world = dist.get_world_size()
    dp = dp or world // (tp * pp)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return Mesh.build(dp, tp, pp, device_type=device)


def parallelize(model: nn.Module, mesh: Mesh, *, zero: int = 0, precision: str = "fp32",
                tp_plan: dict[str, str] | None = None, sequence_parallel: bool = False,
                activation_checkpointing: bool = False, blocks: list[nn.Module] | None = None,
                bucket_mb: float = 25.0, compressor=None, seed: int = 0) -> nn.Module:
    """`model` under the mesh's strategies; returns the wrapper to call and to optimise (see
    `optimizer_params`). All ranks must build `model` alike (same seed)."""
    if mesh.size("pp") > 1:
        raise ValueError("parallelize: pipeline parallelism needs stages; use paratrain train --pp for the GPT")
    if tp_plan is not None and mesh.size("tp") > 1:
        model = parallelize_tensor(model, mesh, tp_plan, sequence_parallel, seed)
    dtype = DTYPES[precision]
    if zero > 0 or dtype != torch.float32:
        if blocks is not None:  # the caller's layers are the units
            model.blocks = nn.ModuleList(blocks) if not hasattr(model, "blocks") else model.blocks
        wrapped: nn.Module = ZeroDataParallel(model, mesh, zero, dtype, [model], activation_checkpointing,
                                              compressor=compressor)
    else:
        wrapped = DataParallel(model, mesh, bucket_mb=bucket_mb, compressor=compressor)
    if activation_checkpointing:
        from paratrain.train import checkpoint_blocks

        checkpoint_blocks([model], blocks)
    return wrapped


def optimizer_params(wrapped: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups (matrices decay, vectors do not): the fp32 master shards under
    ZeRO / mixed precision, the parameters otherwise."""
    if isinstance(wrapped, ZeroDataParallel):
        decay, no_decay = wrapped.master_params(True), wrapped.master_params(False)
    else:
        ps = [p for p in wrapped.parameters() if p.requires_grad]
        decay, no_decay = [p for p in ps if p.dim() >= 2], [p for p in ps if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """A training step for any model: `loss_fn(model(inputs), targets)` is each rank's mean loss
    on its own batch; the step takes the gradient of the mean over ranks, clips it on the global
    norm, and applies AdamW (or `optimizer(param_groups)`)."""

    def __init__(self, model: nn.Module, mesh: Mesh, loss_fn, *, lr: float = 1e-3, weight_decay: float = 0.0,
                 grad_clip: float = 1.0, optimizer=None, **parallel):
        from paratrain.train import LossScaler

        self.mesh, self.loss_fn, self.grad_clip = mesh, loss_fn, grad_clip
        self.model = parallelize(model, mesh, **parallel)
        groups = optimizer_params(self.model, weight_decay)
        self.optimizer = optimizer(groups) if optimizer else torch.optim.AdamW(groups, lr=lr)
        self.zero = isinstance(self.model, ZeroDataParallel)
        self.scaler = LossScaler(parallel.get("precision") == "fp16")
        self.dp = mesh.size("dp")

    def step(self, inputs, targets) -> float:
        from paratrain.train import clip_grad_norm

        self.model.train()
        self.model.zero_grad()
        if getattr(self.model, "compressor", None) is not None:
            self.model.compressor.begin_step()  # numbers the steps for its warm-up
        loss = self.loss_fn(self.model(inputs), targets)
        (loss.float() * (self.scaler.scale / self.dp)).backward()  # engines sum over dp: the mean
        self.model.finish_grad_sync()
        if self.zero:
            skipped = self.model.unscale_grads(self.scaler.scale)
            self.scaler.update(skipped)
            if not skipped:
                clip_grad_norm(self.model.grad_parts(), self.mesh, self.grad_clip, self.model.stage > 0)
                self.optimizer.step()
            self.model.publish()
        else:
            clip_grad_norm([(p.grad, p) for p in self.model.parameters()], self.mesh, self.grad_clip)
            self.optimizer.step()
        mean = loss.detach().float() / self.dp
        all_reduce(mean, self.mesh.group("dp"), self.mesh.comm)
        return float(mean)

    def fit(self, batches, steps: int, log_every: int = 10) -> list[float]:
        """Run `steps` steps over an iterable of (inputs, targets); rank 0 prints every `log_every`."""
        losses = []
        for step, (inputs, targets) in zip(range(1, steps + 1), batches):
            losses.append(self.step(inputs, targets))
            if dist.get_rank() == 0 and log_every and step % log_every == 0:
                print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
        return losses
