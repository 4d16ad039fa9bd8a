"""Tensor (intra-layer) model parallelism, Megatron-LM style (Shoeybi et al. 2019).

A block's first linear of each pair is split by output features (column parallel) and the second
by input features (row parallel), so the pair needs one all-reduce in forward (after the row
linear) and one in backward (before the column linear): two per block each way, for attention
and MLP. Attention heads follow the column split of q, k and v. The embedding and the output
head are split by vocabulary and the cross-entropy is computed on the vocabulary shards without
ever gathering the logits.

With sequence parallelism (Korthikanti et al. 2022) the regions between the pairs (layer norms,
dropout, residuals) hold a 1/tp slice of the sequence instead of a full copy, and each
all-reduce becomes a reduce-scatter plus an all-gather, same bytes, less activation memory.

The model stays vanilla: `parallelize_tensor(model, mesh, plan)` swaps modules from outside by
a plan {module path pattern: style}. The region operators below are named as in Megatron, each
an autograd function whose backward is its conjugate.
"""

from __future__ import annotations

import fnmatch
import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from paratrain.comm import CommStats, all_gather, all_reduce, reduce_scatter
from paratrain.mesh import Mesh
from paratrain.parallel.roles import role_of, set_role


@dataclass(frozen=True)
class TPGroup:
    group: dist.ProcessGroup
    size: int
    rank: int
    stats: CommStats

    @classmethod
    def from_mesh(cls, mesh: Mesh) -> "TPGroup":
        return cls(mesh.group("tp"), mesh.size("tp"), mesh.coord("tp"), mesh.comm)


# ---------------------------------------------------------------- region operators
class _CopyToRegion(torch.autograd.Function):
    """Forward: identity (the input is replicated). Backward: all-reduce the partial gradients."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup):
        ctx.tp = tp
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        all_reduce(g, ctx.tp.group, ctx.tp.stats)
        return g, None


class _ReduceFromRegion(torch.autograd.Function):
    """Forward: all-reduce the partial sums. Backward: identity."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup):
        x = x.contiguous().clone()
        all_reduce(x, tp.group, tp.stats)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherFromRegion(torch.autograd.Function):
    """Forward: concatenate the shards along `dim` (the last: features; 1: the sequence, for a
    replicated module after sequence parallelism). Backward: keep this rank's shard."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup, dim: int = -1):
        ctx.tp, ctx.dim = tp, dim
        return all_gather(x, tp.group, tp.stats, dim=dim)

    @staticmethod
    def backward(ctx, g):
        return g.chunk(ctx.tp.size, dim=ctx.dim)[ctx.tp.rank].contiguous(), None, None


class _ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's last-dim shard. Backward: all-gather the shards."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup):
        ctx.tp = tp
        return x.chunk(tp.size, dim=-1)[tp.rank].contiguous()

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.tp.group, ctx.tp.stats, dim=-1), None


class _GatherFromSequence(torch.autograd.Function):
    """Sequence parallel: all-gather the sequence shards (dim 1); backward reduce-scatters."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup):
        ctx.tp = tp
        return all_gather(x, tp.group, tp.stats, dim=1)

    @staticmethod
    def backward(ctx, g):
        return reduce_scatter(g, ctx.tp.group, ctx.tp.stats, dim=1), None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Sequence parallel: sum partial results and keep this rank's sequence shard."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup):
        ctx.tp = tp
        return reduce_scatter(x, tp.group, tp.stats, dim=1)

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.tp.group, ctx.tp.stats, dim=1), None


class _ScatterToSequence(torch.autograd.Function):
    """Sequence parallel: keep this rank's sequence shard of a replicated tensor."""

    @staticmethod
    def forward(ctx, x, tp: TPGroup):
        ctx.tp = tp
        return x.chunk(tp.size, dim=1)[tp.rank].contiguous()

    @staticmethod
    def backward(ctx, g):
        return all_gather(g, ctx.tp.group, ctx.tp.stats, dim=1), None


def copy_to_region(x, tp: TPGroup):
    return _CopyToRegion.apply(x, tp)


def reduce_from_region(x, tp: TPGroup):
    return _ReduceFromRegion.apply(x, tp)


def gather_from_region(x, tp: TPGroup):
    return _GatherFromRegion.apply(x, tp)


def scatter_to_region(x, tp: TPGroup):
    return _ScatterToRegion.apply(x, tp)


def gather_from_sequence(x, tp: TPGroup):
    return _GatherFromSequence.apply(x, tp)


def reduce_scatter_to_sequence(x, tp: TPGroup):
    return _ReduceScatterToSequence.apply(x, tp)


def scatter_to_sequence(x, tp: TPGroup):
    return _ScatterToSequence.apply(x, tp)


def enter_region(x, tp: TPGroup, sequence_parallel: bool):
    """The input of a column-parallel region: replicated copy, or all-gathered sequence shards."""
    return gather_from_sequence(x, tp) if sequence_parallel else copy_to_region(x, tp)


def _shard(t: torch.Tensor, tp: TPGroup, dim: int) -> nn.Parameter:
    if t.shape[dim] % tp.size:
        raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by tp={tp.size}")
    p = nn.Parameter(t.detach().chunk(tp.size, dim=dim)[tp.rank].clone())
    set_role(p, tp_dim=dim)  # its norm sums over tp; a checkpoint puts the shards in place
    return p


# ---------------------------------------------------------------- layers
class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by rows (output features): each rank computes its slice of y."""

    def __init__(self, linear: nn.Linear, tp: TPGroup, copy_input: bool = True,
                 sequence_parallel: bool = False, gather_output: bool = False):
        super().__init__()
        self.tp, self.copy_input, self.sequence_parallel = tp, copy_input, sequence_parallel
        self.gather_output = gather_output
        self.in_features, self.out_features = linear.in_features, linear.out_features // tp.size
        self.weight = _shard(linear.weight, tp, 0)
        self.bias = _shard(linear.bias, tp, 0) if linear.bias is not None else None

    def forward(self, x):
        if self.copy_input:
            x = enter_region(x, self.tp, self.sequence_parallel)
        y = F.linear(x, self.weight, self.bias)
        return gather_from_region(y, self.tp) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by columns (input features): partial sums, reduced across tp."""

    def __init__(self, linear: nn.Linear, tp: TPGroup, sequence_parallel: bool = False):
        super().__init__()
        self.tp, self.sequence_parallel = tp, sequence_parallel
        self.in_features, self.out_features = linear.in_features // tp.size, linear.out_features
        self.weight = _shard(linear.weight, tp, 1)
        self.bias = None
        if linear.bias is not None:  # replicated, added once after the reduction
            self.bias = nn.Parameter(linear.bias.detach().clone())
            set_role(self.bias, sequence_parallel=sequence_parallel)  # sees a slice of the tokens under SP

    def forward(self, x):
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sequence(y, self.tp) if self.sequence_parallel else reduce_from_region(y, self.tp)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (vocabulary) are split across ranks; lookups outside a rank's
    range give zeros, and the all-reduce assembles the full embedding."""

    def __init__(self, emb: nn.Embedding, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.weight = _shard(emb.weight, tp, 0)
        self.vocab_start = tp.rank * self.weight.shape[0]

    def forward(self, ids):
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return reduce_from_region(out.masked_fill(outside.unsqueeze(-1), 0.0), self.tp)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocabulary-sharded logits: two small all-reduces of (B, T)
    tensors (the max, then the target logit and the sum of exponentials), never the logits."""

    @staticmethod
    def forward(ctx, logits, targets, tp: TPGroup):
        logits = logits.float()
        v_local = logits.shape[-1]
        m = logits.max(dim=-1).values
        all_reduce(m, tp.group, tp.stats, op=dist.ReduceOp.MAX)
        shifted = logits - m.unsqueeze(-1)
        local_t = targets - tp.rank * v_local
        outside = (local_t < 0) | (local_t >= v_local)
        local_t = local_t.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        both = torch.stack([target_logit, exp.sum(dim=-1)])
        all_reduce(both, tp.group, tp.stats)
        target_logit, sum_exp = both
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local_t, outside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax.clone()
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -(~outside).unsqueeze(-1).to(grad.dtype))
        return grad * g.unsqueeze(-1), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Per-token losses (same shape as `targets`) from logits split along the vocabulary."""
    return _VocabParallelCrossEntropy.apply(logits, targets, tp)


# ---------------------------------------------------------------- random state
class TensorParallelRNG:
    """Megatron's RNG tracker: the default generator is seeded alike on every tp rank, so
    dropout on replicated activations agrees across ranks; inside `fork()` a second state, seeded
    per tp rank, drives dropout on sharded activations (heads, sequence slices), which must differ.
    """

    OFFSET = 2718

    def __init__(self, seed: int, tp_rank: int, device: torch.device):
        self.device = device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + self.OFFSET + tp_rank)
            self.state = self._get()

    def _get(self):
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else torch.get_rng_state()

    def _set(self, state) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    @contextmanager
    def fork(self):
        saved = self._get()
        self._set(self.state)
        try:
            yield
        finally:
            self.state = self._get()
            self._set(saved)


def _run_forked(forward, rng: TensorParallelRNG, *args, **kwargs):
    with rng.fork():
        return forward(*args, **kwargs)


# ---------------------------------------------------------------- the plan
# Styles of a tensor-parallel plan, by module path pattern (fnmatch):
#   colwise      ColumnParallelLinear (enters the region itself unless inside a `region`)
#   rowwise      RowParallelLinear (leaves the region: all-reduce, or reduce-scatter under SP)
#   region       a module whose input enters the region once for all its colwise children (one
#                all-reduce in backward for q, k and v together); runs under the tp RNG fork
#   vocab        VocabParallelEmbedding
#   vocab_head   ColumnParallelLinear over the vocabulary, logits left sharded for the loss
#   norm         replicated; under SP runs on sequence shards, gradients summed over tp
#   sequence_start  under SP, the input is split along the sequence here
#   sequence_dropout  under SP, dropout on sequence shards: runs under the tp RNG fork
#   sequence_end  under SP, a replicated module after the last norm (a head the plan leaves
#                whole) gets the whole sequence
# and Hugging Face's names for the same layers (`model.tp_plan`, `config.base_model_tp_plan`):
#   embedding_rowwise          an embedding split by vocabulary rows: `vocab`
#   colwise_gather_output      ColumnParallelLinear whose output is all-gathered (full logits)
#   replicated_with_grad_allreduce  replicated; its gradients are summed over tp (a norm over the
#                              head dimension sees this rank's heads only)
GPT_PLAN: dict[str, str] = {
    "wte": "vocab",
    "blocks.0": "sequence_start",
    "blocks.*.ln[12]": "norm",
    "blocks.*.attn": "region",
    "blocks.*.attn.[qkv]": "colwise",
    "blocks.*.attn.proj": "rowwise",
    "blocks.*.mlp.fc": "colwise",
    "blocks.*.mlp.proj": "rowwise",
    "blocks.*.drop": "sequence_dropout",
    "ln_f": "norm",
    "head": "vocab_head",
}
STYLES = {"colwise", "rowwise", "region", "vocab", "vocab_head", "norm", "sequence_start", "sequence_dropout",
          "sequence_end", "embedding_rowwise", "colwise_gather_output", "replicated_with_grad_allreduce"}


def _style_of(name: str, plan: dict[str, str]) -> str | None:
    styles = [style for pattern, style in plan.items() if fnmatch.fnmatchcase(name, pattern)]
    if len(styles) > 1:
        raise ValueError(f"tensor-parallel plan: module {name!r} matches more than one pattern")
    return styles[0] if styles else None


def parallelize_tensor(model: nn.Module, mesh: Mesh, plan: dict[str, str] = GPT_PLAN,
                       sequence_parallel: bool = False, seed: int = 0,
                       device: torch.device | None = None) -> nn.Module:
    """Convert `model`'s modules in place by `plan` for the mesh's tp group; returns the model.

    Weights are sliced from the full module, so a model built alike on every rank (same seed)
    starts exactly where the single-process model starts. Tied weights stay tied.
    """
    tp = TPGroup.from_mesh(mesh)
    if tp.size == 1:
        return model
    unknown = set(plan.values()) - STYLES
    if unknown:
        raise ValueError(f"tensor-parallel plan: unknown style {sorted(unknown)}; known: {sorted(STYLES)}")
    rng = TensorParallelRNG(seed, tp.rank, device or next(model.parameters()).device)
    named = dict(model.named_modules())
    plan = under_base_model(model, plan, named)
    ties = _shared_parameters(model)
    used: set[str] = set()
    regions = [n for n in named if _style_of(n, plan) == "region"]
    for name, module in list(named.items()):
        style = _style_of(name, plan)
        if style is None:
            continue
        used.update(p for p in plan if fnmatch.fnmatchcase(name, p))
        in_region = any(name.startswith(r + ".") for r in regions)
        new = _convert(module, style, tp, sequence_parallel, in_region, rng, name)
        if new is not module:
            _set_submodule(model, name, new)
    missing = set(plan) - used
    if missing:
        raise ValueError(f"tensor-parallel plan: no module matches {sorted(missing)}")
    for first, others in ties.items():  # re-tie weights that the conversion split into copies
        shared = model.get_parameter(first)
        for other in others:
            owner, _, attr = other.rpartition(".")
            setattr(model.get_submodule(owner), attr, shared)
    return model


def under_base_model(model: nn.Module, plan: dict[str, str], named: dict[str, nn.Module]) -> dict[str, str]:
    """A plan written for the base model (Hugging Face's `config.base_model_tp_plan`, `layers.*...`)
    applies under the model's `base_model_prefix` (`model.layers.*...`) where it matches nothing."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or prefix not in named:
        return plan
    out = {}
    for pattern, style in plan.items():
        bare = any(fnmatch.fnmatchcase(n, pattern) for n in named)
        out[pattern if bare else f"{prefix}.{pattern}"] = style
    return out


def _hidden_states_hook(fn):
    """A forward pre-hook that maps a module's first input, positional or `hidden_states=`."""
    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        return args, {**kwargs, key: fn(kwargs[key])}
    return hook


def _convert(m: nn.Module, style: str, tp: TPGroup, sp: bool, in_region: bool,
             rng: TensorParallelRNG, name: str) -> nn.Module:
    def need(kind):
        if not isinstance(m, kind):
            raise ValueError(f"tensor-parallel plan: {name} is {type(m).__name__}, style {style} needs {kind.__name__}")

    if style in ("colwise", "colwise_gather_output"):
        need(nn.Linear)
        _check_divisible(name, "output features", m.out_features, tp.size)
        return ColumnParallelLinear(m, tp, copy_input=not in_region, sequence_parallel=sp,
                                    gather_output=style == "colwise_gather_output")
    if style == "rowwise":
        need(nn.Linear)
        _check_divisible(name, "input features", m.in_features, tp.size)
        return RowParallelLinear(m, tp, sequence_parallel=sp)
    if style in ("vocab", "embedding_rowwise"):
        need(nn.Embedding)
        _check_divisible(name, "vocabulary", m.num_embeddings, tp.size)
        return VocabParallelEmbedding(m, tp)
    if style == "vocab_head":
        need(nn.Linear)
        _check_divisible(name, "vocabulary", m.out_features, tp.size)
        return ColumnParallelLinear(m, tp, copy_input=True, sequence_parallel=sp)
    if style == "region":
        m.register_forward_pre_hook(_hidden_states_hook(lambda x: enter_region(x, tp, sp)), with_kwargs=True)
        m.forward = functools.partial(_run_forked, m.forward, rng)
    elif (style == "norm" and sp) or style == "replicated_with_grad_allreduce":
        for p in m.parameters():  # gradients summed over tp (the role's reduction, optim.apply_update)
            set_role(p, sequence_parallel=True)
    elif style == "sequence_start" and sp:
        m.register_forward_pre_hook(_hidden_states_hook(lambda x: scatter_to_sequence(x, tp)), with_kwargs=True)
    elif style == "sequence_end" and sp:
        m.register_forward_pre_hook(
            _hidden_states_hook(lambda x: _GatherFromRegion.apply(x, tp, 1)), with_kwargs=True)
    elif style == "sequence_dropout" and sp:
        m.forward = functools.partial(_run_forked, m.forward, rng)
    return m


def _check_divisible(name: str, what: str, n: int, tp: int) -> None:
    if n % tp:
        raise ValueError(f"tensor parallel: {name} has {n} {what}, not divisible by tp={tp}")


def _shared_parameters(model: nn.Module) -> dict[str, list[str]]:
    """{first name: [other names]} for parameters registered under several names (tied)."""
    first_of: dict[int, str] = {}
    ties: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first_of:
            ties.setdefault(first_of[id(p)], []).append(name)
        else:
            first_of[id(p)] = name
    return ties


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, new)


def sync_sequence_parallel_grads(model: nn.Module, mesh: Mesh) -> None:
    """Under SP, replicated parameters (norms, row biases) saw only a slice of the sequence on
    each tp rank: sum their gradients over the tp group (one flat all-reduce)."""
    grads = [p.grad for p in model.parameters() if role_of(p).sequence_parallel and p.grad is not None]
    if not grads or mesh.size("tp") == 1:
        return
    flat = torch.cat([g.flatten() for g in grads])
    all_reduce(flat, mesh.group("tp"), mesh.comm)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
