"""Your own model, cut into pipeline stages: any `nn.Sequential` (or a list of layers, each taking
the previous one's output) trains under pp, and under dp x pp with ZeRO, through the Trainer.

    torchrun --standalone --nproc-per-node 2 examples/own_model_pp.py                  # pp=2, 1F1B
    torchrun --standalone --nproc-per-node 4 examples/own_model_pp.py --dp 2 --zero 1  # dp=2 x pp=2
    torchrun --standalone --nproc-per-node 2 examples/own_model_pp.py --schedule interleaved
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import paratrain
from paratrain.data import DatasetLoader

VOCAB, D, SEQ = 64, 48, 16


class Block(nn.Module):
    """A residual MLP block on (batch, sequence, d) activations."""

    def __init__(self, d: int = D):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def build(n_blocks: int = 6, seed: int = 0) -> nn.Sequential:
    """Tokens -> embedding -> blocks -> logits; the same weights on every rank."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(VOCAB, D), *[Block() for _ in range(n_blocks)], nn.LayerNorm(D),
                         nn.Linear(D, VOCAB))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def data(n: int = 512, global_batch: int = 16, seed: int = 1) -> DatasetLoader:
    """A learnable task (the next token is the current one plus one) as a data set; global batch k
    is a function of (seed, k), each dp rank its slice, the same on every rank of one pipeline."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    return DatasetLoader(list(zip(x, (x + 1) % VOCAB)), global_batch, seed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dp", type=int, default=1)
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved"])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    mesh = paratrain.init(dp=args.dp, pp=int(__import__("os").environ.get("WORLD_SIZE", 2)) // args.dp)
    trainer = paratrain.Trainer(build(), mesh, loss_fn, data=data(), lr=3e-3, zero=args.zero, schedule=args.schedule,
                                microbatches=4, steps=args.steps)
    trainer.fit()  # prints the stages' layers at the start


if __name__ == "__main__":
    main()
