"""Activation checkpointing (Chen et al. 2016): keep each transformer block's input only and
recompute the block in backward, trading about one more forward for the block's activations."""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from paratrain.parallel.zero import blocks_of


def checkpoint_blocks(tops: list[torch.nn.Module], blocks: list[torch.nn.Module] | None = None) -> None:
    """Activation checkpointing per block: keep only each block's input, recompute the rest in
    backward. Applied last, around whatever the block's forward has become (ZeRO-3's gather
    then runs inside the recomputation too)."""
    for block in blocks or [b for top in tops for b in blocks_of(top)]:
        block.forward = partial(checkpoint, block.forward, use_reentrant=False)
