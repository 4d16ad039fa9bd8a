"""Split a GPT's blocks into pipeline stages balanced by modelled cost, and build the stages.

The cost of a stage is the forward FLOPs per token of what it holds: a block costs
24 d^2 (q, k, v, projection and the two MLP matrices) + 4 T d (attention scores and values);
the first stage adds the embedding (a lookup: counted as d) and the last stage the output head
(2 d V), which for a large vocabulary is worth several blocks. A short dynamic program over
contiguous block ranges (as in Alpa's stage construction) minimises the most expensive stage.
"""

from __future__ import annotations

import functools

import torch.nn as nn

from paratrain.models.gpt import GPT, GPTConfig


def block_cost(cfg: GPTConfig, seq_len: int) -> float:
    return 24 * cfg.d_model**2 + 4 * seq_len * cfg.d_model


def head_cost(cfg: GPTConfig) -> float:
    return 2 * cfg.d_model * cfg.vocab_size


def balanced_split(n_blocks: int, n_stages: int, block: float, first_extra: float, last_extra: float) -> list[range]:
    """Contiguous block ranges, one per stage (each non-empty), minimising the largest stage cost."""
    if n_stages > n_blocks:
        raise ValueError(f"{n_blocks} blocks cannot fill {n_stages} pipeline stages")

    def cost(stage: int, lo: int, hi: int) -> float:
        extra = (first_extra if stage == 0 else 0.0) + (last_extra if stage == n_stages - 1 else 0.0)
        return (hi - lo) * block + extra

    @functools.lru_cache(maxsize=None)
    def best(stage: int, lo: int) -> tuple[float, float, tuple[int, ...]]:
        """(max cost, sum of squared costs, ends) for stages `stage..` over blocks `lo..`: the
        smallest maximum, and among equals the most even split."""
        if stage == n_stages - 1:
            c = cost(stage, lo, n_blocks)
            return c, c * c, (n_blocks,)
        options = []
        for hi in range(lo + 1, n_blocks - (n_stages - stage - 1) + 1):
            c = cost(stage, lo, hi)
            worst, squares, ends = best(stage + 1, hi)
            options.append((max(c, worst), c * c + squares, (hi, *ends)))
        return min(options)

    *_, ends = best(0, 0)
    starts = (0, *ends[:-1])
    return [range(a, b) for a, b in zip(starts, ends)]


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


def build_stages(model: GPT, splits: list[range], pp_rank: int, pp: int) -> list[PipelineStage]:
    """This rank's stages: chunk c holds global stage c * pp + pp_rank (interleaved when v > 1)."""
    n = len(splits)
    return [PipelineStage(model, splits[s], s == 0, s == n - 1) for s in range(pp_rank, n, pp)]
