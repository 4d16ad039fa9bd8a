"""`--pp-split auto-measured`: the pipeline's stages cut by each layer's measured time.

Before the stages are cut, every rank times each layer's forward and backward on the run's first
micro-batch (of step 1, from its dp rank's slice: the shape every step has), chained as the model
runs them (a layer's input is the previous one's output, detached), the last layer with the loss:
WARMUP rounds of the chain, then the median of REPEATS. The times are all-reduced (MAX: a stage
runs as fast as its slowest replica) over the world, so every rank cuts alike, and
`balanced_partition` splits the units the spec lets a split fall between (paratrain's GPT: the
blocks, the embedding counted with the first and the final norm and head with the last; a
sequential model: its layers) into stages minimising the slowest (the bottleneck of a pipeline's
steady state, as in PipeDream's profiled partitioning). Nothing of the measurement stays:
gradients are cleared, buffers (running statistics) restored, and the random streams forked
(dropout draws the same in training). Timed eagerly, before compile, activation checkpointing
and ZeRO wrap the layers: their cost is taken as proportional.
"""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from paratrain.comm import all_reduce
from paratrain.data import as_pair, split_batch, to_device
from paratrain.parallel.pipeline.partition import PipelineStage, balanced_partition, build_stages
from paratrain.parallel.tensor import TPGroup

WARMUP, REPEATS = 2, 5
# what a spec's `pp_units(model)` lists: per unit a split may cut between, the name its stage module
# gives it (the `blocks` key) and the (name, callable) layers timed in it, in the model's order
Units = list[tuple[str, list[tuple[str, Callable]]]]


def gpt_units(model: nn.Module) -> Units:
    """paratrain's GPT or Llama: the embedding, each block, the final norm and head; the units are
    the blocks, the first holding the embedding and the last the head (as in `split_gpt`)."""
    n = len(model.blocks)
    units: Units = [(str(i), [(f"block {i}", block)]) for i, block in enumerate(model.blocks)]
    units[0][1].insert(0, ("embedding", model.embed))
    units[n - 1][1].append(("norm + head", model.output))
    return units


def gpt_stages_at(model: nn.Module, ranges: list[range]) -> list[nn.Module]:
    return build_stages(model, ranges, 0, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layers(
    layers: list[Callable],
    x,
    finish: Callable | None,
    device: torch.device,
    warmup: int = WARMUP,
    repeats: int = REPEATS,
) -> list[float]:
    """Milliseconds of each layer's forward and backward, each on the previous one's output;
    `finish(y)` turns the last output into the loss (else its sum). The chain runs `warmup` times,
    then `repeats` times timed, and each layer keeps its median: a burst of other work on the
    machine falls on one round of many layers rather than on every round of one."""
    rounds = [_chain(layers, x, finish, device) for _ in range(warmup + repeats)][warmup:]
    return [statistics.median(r[i] for r in rounds) for i in range(len(layers))]


def _chain(layers: list[Callable], x, finish: Callable | None, device: torch.device) -> list[float]:
    """One timed forward and backward of every layer in turn."""
    out = []
    for i, layer in enumerate(layers):
        x_in = x.detach().requires_grad_(x.is_floating_point()) if torch.is_tensor(x) else x
        _sync(device)
        t0 = time.perf_counter()
        y = layer(x_in)
        z = (finish(y) if finish else y.float().sum()) if i == len(layers) - 1 else y
        if torch.is_tensor(z) and z.requires_grad:
            z.backward(None if z.dim() == 0 else torch.ones_like(z))
        _sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
        x = y.detach() if torch.is_tensor(y) else y
    return out


def measure_units(model: nn.Module, units: Units, x, finish: Callable | None, device: torch.device) -> list[float]:
    """Each layer's time (time_layers) in model order, with nothing of the measurement kept."""
    buffers = [b.detach().clone() for b in model.buffers()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ms = time_layers([fn for _, layers in units for _, fn in layers], x, finish, device)
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers):
            b.copy_(saved)
    for p in model.parameters():
        p.grad = None
    return ms


KEEP_MODELLED = 0.05  # the modelled split stays unless the measured one's slowest stage is this much faster


def stage_spans(stages: list[nn.Module], keys: list[str]) -> list[range]:
    """The units each stage module holds (by the names of its `blocks`)."""
    spans = []
    for s in stages:
        held = [keys.index(k) for k in getattr(s, "blocks", {}).keys()]
        spans.append(range(min(held), max(held) + 1) if held else range(0))
    return spans


def measured_split(
    spec, model: nn.Module, n: int, x, finish: Callable | None, device: torch.device, mesh=None
) -> tuple[list[nn.Module], dict]:
    """The n stages of `model` cut by measured time, and the record of it: per layer and per stage
    milliseconds, the stages' units (first, last), and the split by modelled cost beside them."""
    if spec.pp_units is None or spec.stages_at is None:
        raise ValueError(f"--pp-split auto-measured: model {spec.name} names no layers to time; use --pp-split auto")
    units = spec.pp_units(model)
    if n > len(units):
        raise ValueError(f"{len(units)} layers cannot fill {n} pipeline stages")
    ms = measure_units(model, units, x, finish, device)
    if mesh is not None and dist.is_initialized() and dist.get_world_size(mesh.world_group) > 1:
        t = torch.tensor(ms, dtype=torch.float64, device=device)
        all_reduce(t, mesh.world_group, mesh.comm, op=dist.ReduceOp.MAX)  # every rank cuts alike
        ms = t.cpu().tolist()
    counts = [len(layers) for _, layers in units]
    starts = [sum(counts[:i]) for i in range(len(units))]
    unit_ms = [sum(ms[a : a + c]) for a, c in zip(starts, counts)]
    ranges = balanced_partition(unit_ms, n)
    keys = [k for k, _ in units]
    modelled = stage_spans(spec.stages(model, n), keys)
    best, kept = max(sum(unit_ms[i] for i in r) for r in ranges), max(sum(unit_ms[i] for i in r) for r in modelled)
    if kept <= (1 + KEEP_MODELLED) * best:  # near a tie the noise of the timing would choose: keep the model's
        ranges = [r for r in modelled]
    record = {
        "layer_ms": ms,
        "layer_names": [name for _, layers in units for name, _ in layers],
        "stages": [[r.start, r.stop - 1] for r in ranges],
        "stage_ms": [sum(unit_ms[i] for i in r) for r in ranges],
        "modelled_stages": [[r.start, r.stop - 1] for r in modelled],
        "modelled_stage_ms": [sum(unit_ms[i] for i in r) for r in modelled],
    }
    return spec.stages_at(model, ranges), record


def describe(record: dict, keys: list[str], word: str) -> list[str]:
    """The two lines rank 0 prints: each layer's time, and the split chosen beside the modelled."""
    names, ms, parts = record["layer_names"], record["layer_ms"], []
    for name, t in zip(names, ms):
        if name.startswith("block ") and parts and parts[-1][0] == "blocks":
            parts[-1][1].append(t)
        else:
            parts.append(("blocks" if name.startswith("block ") else name, [t]))
    layers = ", ".join(f"{name} {' '.join(f'{t:.3g}' for t in ts)}" for name, ts in parts)
    span = lambda a, b: keys[a] if a == b else f"{keys[a]}-{keys[b]}"  # noqa: E731
    chosen = ", ".join(
        f"stage {s} {word} {span(a, b)} ({t:.1f} ms)"
        for s, ((a, b), t) in enumerate(zip(record["stages"], record["stage_ms"]))
    )
    if record["modelled_stages"] == record["stages"]:
        other = f"the same (kept where the measured best is not {KEEP_MODELLED:.0%} faster)"
    else:
        other = " / ".join(
            f"{span(a, b)} ({t:.1f} ms)" for (a, b), t in zip(record["modelled_stages"], record["modelled_stage_ms"])
        )
    return [
        f"paratrain: measured forward + backward per layer (ms, median of {REPEATS}, max over ranks): {layers}",
        f"paratrain: pp split by measured time: {chosen}; by modelled cost it would be {other}",
    ]


def pp_stages(t) -> Callable | None:
    """The `stages(model, n)` the Trainer `t` cuts its pipeline with: the spec's (modelled cost),
    or under `pp_split = "auto-measured"` one that times the layers on the first micro-batch of
    `t.data`, prints the two lines on rank 0 and leaves the record in `t.pp_split_measured`."""
    lay = t.cfg.layout
    if lay.pp_split != "auto-measured" or t.mesh.size("pp") < 2:
        return t.spec.stages

    def stages(model: nn.Module, n: int) -> list[nn.Module]:
        if t.data is None:
            raise ValueError(
                "pp_split auto-measured: times each layer on the first micro-batch of the data; give data="
            )
        inputs, targets = as_pair(t.data.local_batch(1, t.dp_rank, t.dp))
        x = to_device(split_batch(inputs, lay.microbatches)[0], t.device)
        target = to_device(split_batch(targets, lay.microbatches)[0], t.device) if targets is not None else None
        loss = t.spec.loss
        if t.mesh.size("tp") > 1 and t.spec.tp_loss:  # the head's logits stay sharded over the vocabulary
            loss = partial(t.spec.tp_loss, tp=TPGroup.from_mesh(t.mesh))
        finish = (lambda y: loss(y, target).float()) if target is not None else None
        out, record = measured_split(t.spec, model, n, x, finish, t.device, t.mesh)
        t.pp_split_measured = {k: record[k] for k in ("layer_ms", "stages", "stage_ms")}
        t.pp_split_measured.update(modelled_stages=record["modelled_stages"])
        if t.rank == 0:
            keys = [k for k, _ in t.spec.pp_units(model)]
            word = "blocks" if isinstance(out[0], PipelineStage) else "layers"
            print("\n".join(describe(record, keys, word)), flush=True)
        return out

    return stages
