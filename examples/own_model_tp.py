"""Your own model and loop with paratrain's pieces: a tensor-parallel plan for an MLP, then
data parallelism, with the step written out by hand.

    torchrun --standalone --nproc-per-node 4 examples/own_model_tp.py     # dp=2 x tp=2
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import paratrain
from paratrain.api import optimizer_params


class MLP(nn.Module):
    def __init__(self, d: int = 64, hidden: int = 256, classes: int = 10):
        super().__init__()
        self.up, self.down, self.out = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, classes)

    def forward(self, x):
        return self.out(x + self.down(F.gelu(self.up(x))))


def main() -> None:
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else None
    mesh = paratrain.init(tp=2 if (world or int(__import__("os").environ.get("WORLD_SIZE", 1))) % 2 == 0 else 1)
    torch.manual_seed(0)
    model = paratrain.parallelize(MLP(), mesh, tp_plan={"up": "colwise", "down": "rowwise"})
    opt = torch.optim.AdamW(optimizer_params(model, 0.0), lr=3e-3)
    gen = torch.Generator().manual_seed(1 + mesh.coord("dp"))  # each dp rank its own data
    teacher = torch.nn.Linear(64, 10).requires_grad_(False)
    for step in range(1, 201):
        x = torch.randn(32, 64, generator=gen)
        y = teacher(x).argmax(-1)
        model.zero_grad()
        loss = F.cross_entropy(model(x), y) / mesh.size("dp")  # gradients are summed over dp
        loss.backward()
        model.finish_grad_sync()
        opt.step()
        if mesh.rank == 0 and step % 50 == 0:
            print(f"step {step}: loss {loss.item() * mesh.size('dp'):.3f} ({mesh.shape})", flush=True)


if __name__ == "__main__":
    main()
