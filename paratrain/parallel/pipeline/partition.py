"""Split a model's layers into pipeline stages balanced by modelled cost, and build the stages.

The cost of a stage is the forward FLOPs per token of what it holds: a block costs two FLOPs
per weight of its matrices (GPT: q, k, v, projection and the two MLP matrices, 24 d^2; Llama:
k and v of n_kv_head heads, and the gated MLP's three matrices) + 4 T d (attention scores and
values); the first stage adds the embedding (a lookup: counted as d) and the last stage the output
head (2 d V), which for a large vocabulary is worth several blocks. The split minimises the most
expensive stage (a bisection on it), then evens the rest out with a short dynamic program over
contiguous block ranges (as in Alpa's stage construction): near-linear in the layers.
Any other model given as a sequence of layers (the Python API) is split the same way, each layer
costing its parameter count unless the caller gives the split points.
"""

from __future__ import annotations

import bisect
import itertools
import struct

import torch.nn as nn

from paratrain.models.gpt import GPT, GPTConfig


def block_weights(cfg) -> int:
    """Weights in one block's matrix products, for a GPTConfig or a models/llama.py LlamaConfig:
    q and the output projection h x h, k and v h x (n_kv_head * head_dim), the MLP two (GELU) or
    three (gated) h x d_mlp matrices. GPT: 12 h^2."""
    h = cfg.d_model
    kv = cfg.n_kv_head * (h // cfg.n_head)
    return 2 * h * h + 2 * h * kv + (3 if cfg.gated_mlp else 2) * h * cfg.d_mlp


def block_cost(cfg: GPTConfig, seq_len: int) -> float:
    return 2 * block_weights(cfg) + 4 * seq_len * cfg.d_model


def head_cost(cfg: GPTConfig) -> float:
    return 2 * cfg.d_model * cfg.vocab_size


def balanced_partition(costs: list[float], n_stages: int) -> list[range]:
    """Contiguous ranges of layers with costs `costs` (each >= 0), one per stage (each non-empty),
    minimising the largest stage cost; among equal maxima, the most even split.

    The optimal bottleneck comes from a bisection with a greedy check (O(k log n) per probe); the
    stage ends then range over short windows (those leaving every stage under it), where the
    dynamic program of Alpa's stage construction runs exactly. Past EXACT_WORK (many stages, or
    very uneven costs) the slack is spread evenly instead, still at the optimal bottleneck."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"{n} blocks cannot fill {n_stages} pipeline stages")
    if min(costs) < 0:
        raise ValueError(f"layer costs must be at least 0, got {min(costs)}")
    prefix = list(itertools.accumulate(costs, initial=0.0))
    limit = _bottleneck(prefix, n_stages)
    windows = _end_windows(prefix, n_stages, limit)
    work = sum(len(a) * len(b) for a, b in zip(windows, windows[1:]))
    ends = (_exact_ends if work <= EXACT_WORK else _even_ends)(prefix, windows, limit)
    starts = (0, *ends[:-1])
    return [range(a, b) for a, b in zip(starts, ends)]


EXACT_WORK = 250_000  # (start, end) pairs the exact dynamic program may visit


def _reach(prefix: list[float], lo: int, limit: float, guess: int = 0) -> int:
    """The furthest end hi >= lo of a stage starting at `lo` that costs at most `limit`; `guess`
    (the previous stage's length) starts a galloping search that is short when stages are alike."""
    base, end = prefix[lo], len(prefix)
    a = lo + guess if guess and lo + guess < end and prefix[lo + guess] - base <= limit else lo
    step = 1
    while a + step < end and prefix[a + step] - base <= limit:
        a, step = a + step, step * 2
    return bisect.bisect_right(prefix, limit, a, min(a + step, end), key=lambda p: p - base) - 1


def _reach_back(prefix: list[float], hi: int, limit: float) -> int:
    """The earliest start lo <= hi of a stage ending at `hi` that costs at most `limit`
    (p - base is exactly -(base - p), so this is the same test as _reach's)."""
    base = prefix[hi]
    return bisect.bisect_left(prefix, -limit, 0, hi, key=lambda p: p - base)


def _stages_needed(prefix: list[float], limit: float, k: int) -> int:
    """Stages the greedy split under `limit` needs (more than k: stops counting)."""
    lo, n, count, size = 0, len(prefix) - 1, 0, 0
    while lo < n and count <= k:
        hi = _reach(prefix, lo, limit, size)
        lo, size, count = (hi, hi - lo, count + 1) if hi > lo else (n, 0, k + 1)
    return count


def _bottleneck(prefix: list[float], k: int) -> float:
    """The smallest largest-stage cost of any split into k stages, exactly as the stage costs
    prefix[hi] - prefix[lo] round: a bisection over the bit patterns of non-negative doubles
    (ordered as the numbers are), each probe checked by the greedy split."""
    def bits(x: float) -> int:
        return struct.unpack("<q", struct.pack("<d", x))[0]

    low = max(b - a for a, b in zip(prefix, prefix[1:]))  # the costliest layer is in some stage
    lo, hi = bits(low), bits(prefix[-1] - prefix[0])
    while lo < hi:
        mid = (lo + hi) // 2
        if _stages_needed(prefix, struct.unpack("<d", struct.pack("<q", mid))[0], k) <= k:
            hi = mid
        else:
            lo = mid + 1
    return struct.unpack("<d", struct.pack("<q", lo))[0]


def _end_windows(prefix: list[float], k: int, limit: float) -> list[range]:
    """Per stage, the ends it may have in a split into k non-empty stages of cost <= `limit`:
    no further than the greedy split from the left reaches, no earlier than the one from the right."""
    n = len(prefix) - 1
    latest, earliest = [0] * k, [n] * k
    for j in range(k):
        start = latest[j - 1] if j else 0
        latest[j] = min(_reach(prefix, start, limit, start - latest[j - 2] if j > 1 else 0), n - (k - 1 - j))
    for j in range(k - 2, -1, -1):
        earliest[j] = max(_reach_back(prefix, earliest[j + 1], limit), j + 1)
    return [range(a, b + 1) for a, b in zip(earliest, latest)]


def _exact_ends(prefix: list[float], windows: list[range], limit: float) -> tuple[int, ...]:
    """Ends minimising (largest cost, sum of squared costs, ends) stage by stage from the last,
    as the full dynamic program over every range would: its choices all lie in the windows."""
    k, n = len(windows), len(prefix) - 1
    best = [dict() for _ in range(k)]  # stage j: {start: (max cost, squares, end)} of stages j..k-1
    for lo in (windows[k - 2] if k > 1 else (0,)):
        c = prefix[n] - prefix[lo]
        best[k - 1][lo] = (c, c * c, n)
    for j in range(k - 2, -1, -1):
        nxt = best[j + 1]
        for lo in (windows[j - 1] if j else (0,)):
            options = []
            for hi in range(max(lo + 1, windows[j].start), min(_reach(prefix, lo, limit), windows[j].stop - 1) + 1):
                c = prefix[hi] - prefix[lo]
                worst, squares, _ = nxt[hi]
                options.append((max(c, worst), c * c + squares, hi))
            if options:
                best[j][lo] = min(options)
    ends, lo = [], 0
    for j in range(k):
        lo = best[j][lo][2]
        ends.append(lo)
    return tuple(ends)


def _even_ends(prefix: list[float], windows: list[range], limit: float) -> tuple[int, ...]:
    """Ends in the windows, each stage as near as it may be to an even share of what is left."""
    k, n, lo, ends = len(windows), len(prefix) - 1, 0, []
    for j in range(k - 1):
        target = prefix[lo] + (prefix[n] - prefix[lo]) / (k - j)
        first, last = max(lo + 1, windows[j].start), min(_reach(prefix, lo, limit), windows[j].stop - 1)
        hi = min(max(bisect.bisect_left(prefix, target, first, last + 1), first), last)
        if hi > first and target - prefix[hi - 1] <= prefix[hi] - target:
            hi -= 1
        ends.append(hi)
        lo = hi
    return (*ends, n)


def balanced_split(n_blocks: int, n_stages: int, block: float, first_extra: float, last_extra: float) -> list[range]:
    """Blocks of equal cost; the first stage also holds something costing `first_extra` (the
    embedding), the last `last_extra` (the head): counted with the first and the last block."""
    costs = [block] * n_blocks
    if n_blocks:
        costs[0] += first_extra
        costs[-1] += last_extra
    return balanced_partition(costs, n_stages)


def split_gpt(cfg: GPTConfig, seq_len: int, n_stages: int) -> list[range]:
    """The blocks of each stage of a GPT or a Llama (any config with the fields block_weights reads)."""
    return balanced_split(cfg.n_layer, n_stages, block_cost(cfg, seq_len), cfg.d_model, head_cost(cfg))


class PipelineStage(nn.Module):
    """One stage of the vanilla GPT (or Llama): the embedding (first stage), a range of blocks, the
    final norm and head (last stage). Submodules keep the full model's names (`blocks.5.attn.q`), so
    parameter names, and so checkpoints, do not depend on the split. The model's class names what
    its two ends hold (EMBED_MODULES, OUTPUT_MODULES; GPT's by default) and runs them (`embed`,
    `output`)."""

    def __init__(self, model: GPT, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last, self.family = first, last, type(model)
        for name in getattr(self.family, "EMBED_MODULES", ("wte", "wpe", "drop")) if first else ():
            setattr(self, name, getattr(model, name))
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in blocks})
        for name in getattr(self.family, "OUTPUT_MODULES", ("ln_f", "head")) if last else ():
            setattr(self, name, getattr(model, name))

    def forward(self, x):
        if self.first:
            x = self.family.embed(self, x)  # same names, same code as the full model
        for block in self.blocks.values():
            x = block(x)
        return self.family.output(self, x) if self.last else x


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


def sequence_of(model: nn.Module, layers: list[nn.Module] | None) -> tuple[list[str], list[nn.Module]]:
    """(names, layers) of a model given as a sequence: an `nn.Sequential`'s children under their
    names, or `layers=[...]` under their indices."""
    if layers is None:
        if not isinstance(model, nn.Sequential):
            raise ValueError("parallelize: pipeline parallelism needs the model as a sequence of layers: "
                             "pass an nn.Sequential, or layers=[...] (each layer takes the previous one's output)")
        return list(model._modules), list(model)  # (named_children would skip a repeated layer)
    return [str(i) for i in range(len(layers))], list(layers)


def sequential_stages(model: nn.Module, n: int, layers: list[nn.Module] | None,
                      split: list[int] | list[str] | None, ranges: list[range] | None = None) -> list[nn.Module]:
    """A sequence of layers cut into n contiguous stages (balanced by parameter count, at `split`,
    or as `ranges` of the layers say); each layer keeps its name in the sequence (an index for
    `layers=[...]`)."""
    names, layers = sequence_of(model, layers)
    if ranges is None and split is None:  # balanced by parameter count (a layer without parameters costs little)
        ranges = balanced_partition([1 + sum(x.numel() for x in layer.parameters()) for layer in layers], n)
    elif ranges is None:
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
