"""A model spec: what the one Trainer needs to know of a model, given as data.

The Trainer builds, parallelises and trains every model the same way; what differs between
models is here: how to build it (the same weights on every rank), its loss, its tensor-parallel
plan, how to cut it into pipeline stages, its repeated layers (ZeRO-3's units, activation
checkpointing's and compile's blocks), and what a checkpoint must match. paratrain's GPT is one
spec (`gpt_spec`); any `nn.Module` with a loss function is another (`module_spec`).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from paratrain.data import ByteTokenizer
from paratrain.models.gpt import PRESETS, GPTConfig, build_model
from paratrain.parallel.pipeline.measure import gpt_stages_at, gpt_units
from paratrain.parallel.pipeline.partition import build_stages, sequence_of, sequential_stages, split_gpt
from paratrain.parallel.tensor import GPT_PLAN, ColumnParallelLinear, TPGroup, vocab_parallel_cross_entropy
from paratrain.planner.cost import flops_per_token


@dataclass
class ModelSpec:
    """`loss(outputs, targets)` is the mean loss of one micro-batch (the Trainer weighs the
    micro-batches of all dp ranks into the global mean); `tp_loss(outputs, targets, tp)` replaces
    it under tensor parallelism when the outputs stay sharded (a vocabulary-parallel head).
    `stages(model, n)` cuts the (tensor-parallel) model into n pipeline stage modules whose
    parameters keep the full model's names. `blocks(module)` lists the repeated layers of a model
    or a stage. `identity` is what a checkpoint must match to load. For `--pp-split auto-measured`
    (parallel/pipeline/measure.py), `pp_units(model)` lists the units a split may cut between with
    the layers timed in each, and `stages_at(model, ranges)` builds the stages of a split of them."""

    name: str
    build: Callable[[], nn.Module]
    loss: Callable[[Any, Any], torch.Tensor]
    tp_loss: Callable[[Any, Any, TPGroup], torch.Tensor] | None = None
    tp_plan: dict[str, str] | Callable[[nn.Module], dict[str, str]] | None = None  # a callable reads the built model
    stages: Callable[[nn.Module, int], list[nn.Module]] | None = None
    blocks: Callable[[nn.Module], list[nn.Module]] | None = None
    identity: dict = field(default_factory=dict)
    flops_per_token: float | None = None  # training FLOPs per token (MFU); None when unknown
    sample: Callable | None = None  # sample(model, device, seed) -> text, for the summary
    source: str | None = None  # the --model it came from (a folder, MODULE:FUNCTION): checkpoints record it
    pp_units: Callable[[nn.Module], list] | None = None
    stages_at: Callable[[nn.Module, list[range]], list[nn.Module]] | None = None


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def vocab_parallel_loss(logits: torch.Tensor, targets: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    return vocab_parallel_cross_entropy(logits.float(), targets, tp).mean()


def gpt_spec(name: str, seed: int, seq_len: int, dropout: float = 0.0, tie_embeddings: bool = True,
             vocab_size: int | None = None) -> ModelSpec:
    """paratrain's GPT preset `name` (models/gpt.py): Megatron's plan, stages balanced by
    modelled cost (the head weighs on the last stage), blocks as ZeRO-3's units."""
    preset = PRESETS[name]
    if vocab_size:
        preset = GPTConfig(**{**preset.__dict__, "vocab_size": vocab_size})
    return ModelSpec(
        name=name,
        build=lambda: build_model(name, seed, dropout, tie_embeddings, vocab_size),
        loss=token_cross_entropy,
        tp_loss=vocab_parallel_loss,
        tp_plan=GPT_PLAN,
        stages=lambda model, n: build_stages(model, split_gpt(preset, seq_len, n), 0, 1),
        blocks=None,  # the GPT and its stages hold `blocks`
        identity=gpt_identity(name, tie_embeddings, vocab_size),
        flops_per_token=flops_per_token(preset, seq_len),
        sample=sample_text,
        pp_units=gpt_units,
        stages_at=gpt_stages_at,
    )


def gpt_identity(name: str, tie_embeddings: bool = True, vocab_size: int | None = None) -> dict:
    """What must match between a checkpoint of a GPT preset and the run that loads it."""
    p = PRESETS[name]
    return {"name": name, "n_layer": p.n_layer, "d_model": p.d_model, "n_head": p.n_head,
            "vocab_size": vocab_size or p.vocab_size, "tie_embeddings": tie_embeddings}


def module_identity(model: nn.Module) -> dict:
    """A user's model: its class, and a digest of every parameter's name and shape."""
    shapes = ";".join(f"{n}:{tuple(p.shape)}" for n, p in model.named_parameters())
    return {"name": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters()),
            "shapes_crc32": zlib.crc32(shapes.encode())}


def module_spec(model: nn.Module, loss_fn: Callable, *, tp_plan: dict[str, str] | None = None,
                blocks: list[nn.Module] | None = None, layers: list[nn.Module] | None = None,
                pp_split: list[int] | list[str] | None = None) -> ModelSpec:
    """A model the user built (the same weights on every rank). Under pipeline parallelism it is
    cut between `layers` (default: an `nn.Sequential`'s children), balanced by parameter count or
    at `pp_split` (the indices, or child names, where stages 2, 3, ... begin)."""
    chosen = list(blocks) if blocks is not None else None
    return ModelSpec(
        name=type(model).__name__,
        build=lambda: model,
        loss=loss_fn,
        tp_plan=tp_plan,
        stages=lambda m, n: sequential_stages(m, n, layers, pp_split),
        blocks=(lambda m: chosen if m is model else None) if chosen is not None else None,
        identity=module_identity(model),
        pp_units=lambda m: sequence_units(m, layers, pp_split),
        stages_at=lambda m, ranges: sequential_stages(m, len(ranges), layers, None, ranges),
    )


def sequence_units(model: nn.Module, layers: list[nn.Module] | None, split) -> list:
    """A sequential model's layers as the units of a measured split (each its own unit)."""
    if split is not None:
        raise ValueError(f"pp_split: the split points {split!r} are given and auto-measured would choose them; "
                         "give one or the other")
    if layers is None and not isinstance(model, nn.Sequential):
        raise ValueError(f"pp_split: auto-measured times the layers of an nn.Sequential or layers=[...], not a "
                         f"{type(model).__name__}; use pp_split='auto'")
    return [(name, [(name, layer)]) for name, layer in zip(*sequence_of(model, layers))]


@torch.no_grad()
def sample_text(model: nn.Module, device: torch.device, seed: int, tokenizer=None, prompt: str = "def ",
                n_new: int = 120) -> str:
    """A few generated tokens from paratrain's GPT (or Llama), decoded by the run's tokenizer
    (bytes by default). Under tp every rank of the tp group takes part (the head gathers its
    vocabulary shards)."""
    tok = tokenizer or ByteTokenizer()
    idx = torch.tensor([tok.encode(prompt)], device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    model.eval()
    head = model.head if isinstance(model.head, ColumnParallelLinear) else None
    if head is not None:
        head.gather_output = True
    try:
        out = model.generate(idx, n_new, generator=gen)
    finally:
        if head is not None:
            head.gather_output = False
    return tok.decode(out[0].tolist())
