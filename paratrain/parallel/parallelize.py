"""`parallelize()`: the strategies applied to any model from outside, in one fixed order.

Tensor parallel (a plan of module path pattern -> style, `parallel/tensor.py`), then the pipeline
split (the spec's `stages`), then compile of each block's own forward, then ZeRO or data
parallelism (with fp32 master weights for mixed precision), then activation checkpointing around
each block as ZeRO-3 wrapped it (torchtitan's composability). Global names are taken from the
vanilla model before the split, so checkpoints name every parameter and buffer the same in
every layout; tied parameters (a head sharing the embedding) are kept once, the other names as
aliases.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from paratrain.comm import Compressor
from paratrain.mesh import Mesh
from paratrain.models.catalog import user_spec
from paratrain.optim import DTYPES
from paratrain.parallel.activation import checkpoint_blocks
from paratrain.parallel.batchnorm import convert_sync_batchnorm
from paratrain.parallel.data import DataParallel
from paratrain.parallel.pipeline.stages import Pipeline
from paratrain.parallel.tensor import parallelize_tensor
from paratrain.parallel.zero import ZeroDataParallel, blocks_of


@dataclass
class Parallel:
    """The result: the engine to call and optimise, and what checkpoints and the step need."""

    engine: nn.Module  # DataParallel or ZeroDataParallel (under pp: over this rank's chunks)
    pipeline: Pipeline | None
    tops: list[nn.Module]  # the modules whose forward is a whole model or a pipeline chunk
    names: dict[int, str] = field(default_factory=dict)  # id(parameter) -> global name
    buffer_names: dict[int, str] = field(default_factory=dict)  # id(buffer) -> global name
    aliases: dict[str, str] = field(default_factory=dict)  # tied name -> the name it is kept under

    @property
    def zero(self) -> bool:
        return isinstance(self.engine, ZeroDataParallel)


def global_names(model: nn.Module) -> tuple[dict[int, str], dict[int, str], dict[str, str]]:
    """(parameter names, buffer names, aliases) of the vanilla model: the first name of a tied
    parameter is the one it is kept under."""
    names: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        kept = names.setdefault(id(p), name)
        if kept != name:
            aliases[name] = kept
    buffers = {id(b): name for name, b in model.named_buffers()}
    return names, buffers, aliases


def apply_strategies(model: nn.Module, mesh: Mesh, *, zero: int = 0, precision: str = "fp32",
                     tp_plan: dict[str, str] | None = None, sequence_parallel: bool = False,
                     activation_checkpointing: bool = False, blocks: Callable | None = None,
                     stages: Callable | None = None, bucket_mb: float = 25.0, compressor: Compressor | None = None,
                     seed: int = 0, schedule: str = "1f1b", microbatches: int = 1, virtual_stages: int = 2,
                     compile: bool = False, broadcast_buffers: bool = True, sync_batchnorm: bool = False,
                     device: torch.device | None = None, allreduce: str = "backend") -> Parallel:
    """`model` (built alike on every rank) under the mesh's strategies. `blocks(module)`: the
    repeated layers of a model or stage (default: its `blocks`, or its longest ModuleList of one
    type); `stages(model, n)`: the n pipeline stage modules."""
    device = device or next(model.parameters()).device
    if sync_batchnorm and mesh.size("dp") > 1:
        model = convert_sync_batchnorm(model, mesh)
    if tp_plan is not None and mesh.size("tp") > 1:
        plan = tp_plan(model) if callable(tp_plan) else tp_plan
        model = parallelize_tensor(model, mesh, plan, sequence_parallel, seed)
    names, buffer_names, aliases = global_names(model)
    pipeline = None
    if mesh.size("pp") > 1:
        if stages is None:
            raise ValueError("parallelize: this model has no pipeline split; give its stages")
        n = mesh.size("pp") * (virtual_stages if schedule == "interleaved" else 1)
        pipeline = Pipeline(stages(model, n), mesh, schedule, microbatches, virtual_stages, device)
        model, tops = pipeline.chunks, list(pipeline.chunks)
    else:
        tops = [model]

    def find_blocks(top: nn.Module) -> list[nn.Module]:
        return (blocks(top) if blocks is not None else None) or blocks_of(top)

    if compile:  # each block's own computation, before the strategies wrap it (ZeRO-3's gathers
        for top in tops:  # stay outside the graphs); a model without blocks is compiled whole
            for m in find_blocks(top) or [top]:
                m.forward = torch.compile(m.forward)
    dtype = DTYPES[precision]
    if zero > 0 or dtype != torch.float32:  # ZeRO's stage 0 keeps fp32 masters for mixed precision
        engine: nn.Module = ZeroDataParallel(model, mesh, zero, dtype, tops, activation_checkpointing,
                                             compressor=compressor, names=names, find_blocks=find_blocks,
                                             broadcast_buffers=broadcast_buffers, allreduce=allreduce)
    else:
        engine = DataParallel(model, mesh, bucket_mb=bucket_mb, compressor=compressor,
                              broadcast_buffers=broadcast_buffers, allreduce=allreduce)
    if activation_checkpointing:
        checkpoint_blocks(tops, [b for top in tops for b in find_blocks(top)])
    if pipeline is not None:
        pipeline.executor.no_sync = engine.no_sync
        pipeline.executor.act_dtype = dtype
    return Parallel(engine, pipeline, tops, names, buffer_names, aliases)


def parallelize(model: nn.Module, mesh: Mesh, *, zero: int = 0, precision: str = "fp32",
                tp_plan: dict[str, str] | None = None, sequence_parallel: bool = False,
                activation_checkpointing: bool = False, blocks: list[nn.Module] | None = None,
                bucket_mb: float = 25.0, compressor: Compressor | None = None, seed: int = 0,
                layers: list[nn.Module] | None = None, pp_split: list[int] | list[str] | None = None,
                schedule: str = "1f1b", microbatches: int | None = None, virtual_stages: int = 2,
                compile: bool = False, broadcast_buffers: bool = True, sync_batchnorm: bool = False) -> nn.Module:
    """`model` under the mesh's strategies; returns the wrapper to call and to optimise (see
    `optimizer_params`), with `.pipeline` under pp (this rank's stages and their schedule). All
    ranks must build `model` alike (same seed). For a whole training loop use `paratrain.Trainer`."""
    spec = user_spec(model, None, tp_plan=tp_plan, blocks=blocks, layers=layers, pp_split=pp_split)
    par = apply_strategies(
        model, mesh, zero=zero, precision=precision, tp_plan=spec.tp_plan, sequence_parallel=sequence_parallel,
        activation_checkpointing=activation_checkpointing, blocks=spec.blocks, stages=spec.stages,
        bucket_mb=bucket_mb, compressor=compressor,
        seed=seed, schedule=schedule, microbatches=microbatches or mesh.size("pp"), virtual_stages=virtual_stages,
        compile=compile, broadcast_buffers=broadcast_buffers, sync_batchnorm=sync_batchnorm)
    par.engine.pipeline = par.pipeline
    par.engine.parallel = par
    return par.engine
