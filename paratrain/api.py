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
`blocks`), then activation checkpointing of those layers. Every replica starts from dp rank 0's
parameters and buffers (broadcast once, as DDP does). Frozen parameters (`requires_grad=False`,
as in fine-tuning) are neither reduced, sharded nor optimised: each rank keeps them whole, in the
compute dtype under mixed precision.

Pipeline parallelism (a mesh with pp > 1) needs the model as a sequence of layers, each taking
the previous one's output: an `nn.Sequential`, or `layers=[...]`. The layers are cut into
pp x virtual-stages contiguous stages, balanced by parameter count or at the caller's `pp_split`
(the indices, or the `nn.Sequential`'s child names, where stages 2, 3, ... begin); each rank keeps
its own stages and `wrapped.pipeline.run(inputs, targets, loss_fn)` runs one batch through the
schedule (forward and backward; a bare forward is not offered). The shapes that cross stage
boundaries are found by one forward of a micro-batch without gradients, again whenever the
micro-batch shape changes. Ranks of one pipeline pass the same batch: the first stage reads the
inputs, the last the targets. Layers may not share parameters across stages.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.comm import all_reduce, isend, recv
from paratrain.mesh import Mesh
from paratrain.optim import LossScaler, adamw, clip_grad_norm
from paratrain.parallel.activation import checkpoint_blocks
from paratrain.parallel.data import DataParallel
from paratrain.parallel.pipeline.executor import PipelineExecutor
from paratrain.parallel.pipeline.partition import SequentialStage, balanced_partition
from paratrain.parallel.pipeline.schedule import build_schedule
from paratrain.parallel.tensor import parallelize_tensor
from paratrain.parallel.zero import ZeroDataParallel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def init(dp: int | None = None, tp: int = 1, pp: int = 1, backend: str | None = None) -> Mesh:
    """Join the process group (from torchrun's environment, unless already initialised) and lay
    the ranks out as pp x dp x tp; dp defaults to world / (tp * pp)."""
    if not dist.is_initialized():
        from paratrain.launch import init_process_group, leave_at_exit

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        init_process_group(backend or ("nccl" if cuda else "gloo"))
        leave_at_exit()  # a script's end need not destroy the group (torchrun's examples do not)
    world = dist.get_world_size()
    dp = dp or world // (tp * pp)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return Mesh.build(dp, tp, pp, device_type=device)


def parallelize(model: nn.Module, mesh: Mesh, *, zero: int = 0, precision: str = "fp32",
                tp_plan: dict[str, str] | None = None, sequence_parallel: bool = False,
                activation_checkpointing: bool = False, blocks: list[nn.Module] | None = None,
                bucket_mb: float = 25.0, compressor=None, seed: int = 0,
                layers: list[nn.Module] | None = None, pp_split: list[int] | list[str] | None = None,
                schedule: str = "1f1b", microbatches: int | None = None, virtual_stages: int = 2) -> nn.Module:
    """`model` under the mesh's strategies; returns the wrapper to call and to optimise (see
    `optimizer_params`); under pp, the wrapper of this rank's stages, with `.pipeline` to run.
    All ranks must build `model` alike (same seed)."""
    if tp_plan is not None and mesh.size("tp") > 1:
        model = parallelize_tensor(model, mesh, tp_plan, sequence_parallel, seed)
    pipeline = None
    if mesh.size("pp") > 1:
        pipeline = Pipeline(model, mesh, layers, pp_split, schedule, microbatches or mesh.size("pp"),
                            virtual_stages)
        model, tops = pipeline.chunks, list(pipeline.chunks)
    else:
        tops = [model]
    dtype = DTYPES[precision]
    if zero > 0 or dtype != torch.float32:
        if blocks is not None and pipeline is None:  # the caller's layers are the units
            model.blocks = nn.ModuleList(blocks) if not hasattr(model, "blocks") else model.blocks
        wrapped: nn.Module = ZeroDataParallel(model, mesh, zero, dtype, tops, activation_checkpointing,
                                              compressor=compressor)
    else:
        wrapped = DataParallel(model, mesh, bucket_mb=bucket_mb, compressor=compressor)
    if activation_checkpointing:
        checkpoint_blocks(tops, blocks if pipeline is None else None)
    if pipeline is not None:
        pipeline.executor.no_sync = wrapped.no_sync
        pipeline.executor.act_dtype = dtype
        wrapped.pipeline = pipeline
    return wrapped


class Pipeline:
    """A sequential model cut into stages; this rank's `chunks` run by a schedule's actions."""

    def __init__(self, model: nn.Module, mesh: Mesh, layers: list[nn.Module] | None,
                 split: list[int] | list[str] | None, schedule: str, microbatches: int, virtual_stages: int):
        if layers is None:
            if not isinstance(model, nn.Sequential):
                raise ValueError("parallelize: pipeline parallelism needs the model as a sequence of layers: "
                                 "pass an nn.Sequential, or layers=[...] (each layer takes the previous one's output)")
            names = list(model._modules)  # (named_children would skip a repeated layer)
            layers = list(model)
        else:
            names = [str(i) for i in range(len(layers))]
        self.mesh, self.microbatches = mesh, microbatches
        p, rank = mesh.size("pp"), mesh.coord("pp")
        v = virtual_stages if schedule == "interleaved" else 1
        n = p * v
        self.table = build_schedule(schedule, p, microbatches, v)  # refuses too few micro-batches
        if split is None:  # balanced by parameter count (a layer without parameters costs little)
            self.stages = balanced_partition([1 + sum(x.numel() for x in layer.parameters()) for layer in layers], n)
        else:
            starts = [names.index(str(x)) if str(x) in names else -1 for x in split]
            if len(starts) != n - 1 or starts != sorted(set(starts)) or not all(0 < a < len(layers) for a in starts):
                raise ValueError(f"parallelize: pp_split must name {n - 1} increasing layers where stages 2..{n} begin "
                                 f"(indices 1..{len(layers) - 1} or names {names[1:5]}...), got {split!r}")
            bounds = [0, *starts, len(layers)]
            self.stages = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        owner: dict[int, int] = {}
        for s, r in enumerate(self.stages):
            for i in r:
                for q in layers[i].parameters():
                    if owner.setdefault(id(q), s) != s:
                        raise ValueError(f"parallelize: layer {names[i]} shares a parameter with stage {owner[id(q)]}; "
                                         "pipeline stages may not share parameters (untie them, or split elsewhere)")
        self.chunks = nn.ModuleList([SequentialStage(layers, self.stages[s], s == 0, s == n - 1)
                                     for s in range(rank, n, p)])
        device = next(model.parameters()).device
        self.executor = PipelineExecutor(list(self.chunks), mesh, self.table[rank], n, [], device)
        self._probed: tuple | None = None

    def _probe_shapes(self, micro: torch.Tensor) -> None:
        """One forward of a micro-batch, stage after stage without gradients, to learn the shape
        each stage sends (a stage receives its input's shape from the one before)."""
        ex = self.executor
        shapes = [None] * (ex.n_stages - 1)
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
        ex.act_shape = shapes

    def run(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn, scale: float = 1.0) -> torch.Tensor:
        """Forward and backward of one batch in `microbatches` parts (split on dim 0); `loss_fn(
        outputs, targets)` is the mean loss of a part. Gradients are those of the batch's mean loss
        times `scale`; returns the batch's mean loss on every pipeline rank."""
        m = self.microbatches
        if inputs.shape[0] % m:
            raise ValueError(f"pipeline: a batch of {inputs.shape[0]} does not split into {m} micro-batches")
        xs, ts = inputs.chunk(m), targets.chunk(m)
        if self._probed != (tuple(xs[0].shape), xs[0].dtype):
            self._probe_shapes(xs[0])
            self._probed = (tuple(xs[0].shape), xs[0].dtype)
        total = self.executor.run(list(xs), lambda out, i: loss_fn(out, ts[i].to(out.device)).float() * (scale / m))
        all_reduce(total, self.mesh.group("pp"), self.mesh.comm)  # the last stage's, to every stage
        return total / scale


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
        self.mesh, self.loss_fn, self.grad_clip = mesh, loss_fn, grad_clip
        self.model = parallelize(model, mesh, **parallel)
        groups = optimizer_params(self.model, weight_decay)
        self.optimizer = optimizer(groups) if optimizer else adamw(groups, lr=lr)
        self.zero = isinstance(self.model, ZeroDataParallel)
        self.scaler = LossScaler(parallel.get("precision") == "fp16")
        self.dp = mesh.size("dp")

    def step(self, inputs, targets) -> float:
        self.model.train()
        self.model.zero_grad()
        if getattr(self.model, "compressor", None) is not None:
            self.model.compressor.begin_step()  # numbers the steps for its warm-up
        pipeline = getattr(self.model, "pipeline", None)
        if pipeline is not None:  # engines sum over dp: the mean
            loss = pipeline.run(inputs, targets, self.loss_fn, self.scaler.scale / self.dp)
        else:
            loss = self.loss_fn(self.model(inputs), targets)
            (loss.float() * (self.scaler.scale / self.dp)).backward()
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
