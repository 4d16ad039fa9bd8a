"""Split a model's layers into pipeline stages balanced by modelled cost, and build the stages.

The cost of a stage is the forward FLOPs per token of what it holds: a block costs
24 d^2 (q, k, v, projection and the two MLP matrices) + 4 T d (attention scores and values);
the first stage adds the embedding (a lookup: counted as d) and the last stage the output head
(2 d V), which for a large vocabulary is worth several blocks. A short dynamic program over
contiguous block ranges (as in Alpa's stage construction) minimises the most expensive stage.
Any other model given as a sequence of layers (the Python API) is split the same way, each layer
costing its parameter count unless the caller gives the split points.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from paratrain.models.gpt import GPT, GPTConfig


def block_cost(cfg: GPTConfig, seq_len: int) -> float:
    return 24 * cfg.d_model**2 + 4 * seq_len * cfg.d_model


def head_cost(cfg: GPTConfig) -> float:
    return 2 * cfg.d_model * cfg.vocab_size


def balanced_partition(costs: list[float], n_stages: int) -> list[range]:
    """Contiguous ranges of layers with costs `costs`, one per stage (each non-empty), minimising
    the largest stage cost; among equal maxima, the most even split."""
    n = len(costs)
    if n_stages > n:
        raise ValueError(f"{n} blocks cannot fill {n_stages} pipeline stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    @functools.lru_cache(maxsize=None)
    def best(stage: int, lo: int) -> tuple[float, float, tuple[int, ...]]:
        """(max cost, sum of squared costs, ends) for stages `stage..` over layers `lo..`."""
        if stage == n_stages - 1:
            c = prefix[n] - prefix[lo]
            return c, c * c, (n,)
        options = []
        for hi in range(lo + 1, n - (n_stages - stage - 1) + 1):
            c = prefix[hi] - prefix[lo]
            worst, squares, ends = best(stage + 1, hi)
            options.append((max(c, worst), c * c + squares, (hi, *ends)))
        return min(options)

    *_, ends = best(0, 0)
    starts = (0, *ends[:-1])
    return [range(a, b) for a, b in zip(starts, ends)]


def balanced_split(n_blocks: int, n_stages: int, block: float, first_extra: float, last_extra: float) -> list[range]:
    """Blocks of equal cost; the first stage also holds something costing `first_extra` (the
    embedding), the last `last_extra` (the head): counted with the first and the last block."""
    costs = [block] * n_blocks
    if n_blocks:
        costs[0] += first_extra
        costs[-1] += last_extra
    return balanced_partition(costs, n_stages)


def split_gpt(cfg: GPTConfig, seq_len: int, n_stages: int) -> list[range]:
    return balanced_split(cfg.n_layer, n_stages, block_cost(cfg, seq_len), cfg.d_model, head_cost(cfg))


class PipelineStage(nn.Module):
    """One stage of the vanilla GPT: the embedding (first stage), a range of blocks, the final
    norm and head (last stage). Submodules keep the full model's names (`blocks.5.attn.q`), so
    parameter names, and so checkpoints, do not depend on the split."""

    def __init__(self, model: GPT, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first:
            self.wte, self.wpe, self.drop = model.wte, model.wpe, model.drop
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        if last:
            self.ln_f, self.head = model.ln_f, model.head

    def forward(self, x):
        if self.first:
            x = GPT.embed(self, x)  # same names, same code as the full model
        for block in self.blocks.values():
            x = block(x)
        return GPT.output(self, x) if self.last else x


class SequentialStage(nn.Module):
    """A contiguous run of a sequential model's layers: `forward` applies them in order. The
    layers keep their names in the sequence (`5`, as in an `nn.Sequential`); `blocks` makes each
    layer a ZeRO-3 unit."""

    def __init__(self, layers: list[nn.Module], indices: range, first: bool, last: bool,
                 names: list[str] | None = None):
        super().__init__()
        self.first, self.last = first, last
        self.blocks = nn.ModuleDict({names[i] if names else str(i): layers[i] for i in indices})

    def forward(self, x):
        for layer in self.blocks.values():
            x = layer(x)
        return x


def sequential_stages(model: nn.Module, n: int, layers: list[nn.Module] | None,
                      split: list[int] | list[str] | None) -> list[nn.Module]:
    """A sequence of layers cut into n contiguous stages (balanced by parameter count, or at
    `split`); each layer keeps its name in the sequence (an index for `layers=[...]`)."""
    if layers is None:
        if not isinstance(model, nn.Sequential):
            raise ValueError("parallelize: pipeline parallelism needs the model as a sequence of layers: "
                             "pass an nn.Sequential, or layers=[...] (each layer takes the previous one's output)")
        names, layers = list(model._modules), list(model)  # (named_children would skip a repeated layer)
    else:
        names = [str(i) for i in range(len(layers))]
    if split is None:  # balanced by parameter count (a layer without parameters costs little)
        ranges = balanced_partition([1 + sum(x.numel() for x in layer.parameters()) for layer in layers], n)
    else:
        starts = [names.index(str(x)) if str(x) in names else -1 for x in split]
        if len(starts) != n - 1 or starts != sorted(set(starts)) or not all(0 < a < len(layers) for a in starts):
            raise ValueError(f"parallelize: pp_split must name {n - 1} increasing layers where stages 2..{n} begin "
                             f"(indices 1..{len(layers) - 1} or names {names[1:5]}...), got {split!r}")
        bounds = [0, *starts, len(layers)]
        ranges = [range(a, b) for a, b in zip(bounds, bounds[1:])]
    return [SequentialStage(layers, r, s == 0, s == n - 1, names) for s, r in enumerate(ranges)]


def build_stages(model: GPT, splits: list[range], pp_rank: int, pp: int) -> list[PipelineStage]:
    """This rank's stages: chunk c holds global stage c * pp + pp_rank (interleaved when v > 1)."""
    n = len(splits)
    return [PipelineStage(model, splits[s], s == 0, s == n - 1) for s in range(pp_rank, n, pp)]
