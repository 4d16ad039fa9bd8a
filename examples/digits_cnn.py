"""A small CNN with BatchNorm on real data: scikit-learn's handwritten digits (1,797 8x8 images,
shipped with the library, nothing downloaded), trained by paratrain's one Trainer.

    python examples/digits_cnn.py                                            # one process
    torchrun --standalone --nproc-per-node 2 examples/digits_cnn.py --zero 3 # data parallel, ZeRO-3
    torchrun --standalone --nproc-per-node 2 examples/digits_cnn.py --sync-batchnorm --checkpoint-dir ck

Each step's global batch of 64 images is a function of (seed, step), split over the dp ranks;
BatchNorm's running statistics are rank 0's before every forward, as DDP keeps them (or summed
over the ranks with --sync-batchnorm). At the end rank 0 gathers the whole model
(`trainer.state_dict()`, whatever the layout) into a fresh CNN and measures its accuracy.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F

import paratrain
from paratrain.data import DatasetLoader


def build(seed: int = 0) -> nn.Module:
    """conv -> BN -> ReLU, twice, then a linear classifier; the same weights on every rank."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))


def digits() -> tuple[list, list]:
    """(training, held-out) lists of (image 1x8x8 in [0, 1], label): the last 297 images held out."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    items = list(zip(images, torch.tensor(y)))
    return items[:1500], items[1500:]


@torch.no_grad()
def accuracy(model: nn.Module, items: list) -> float:
    model.eval()
    x, y = torch.stack([i for i, _ in items]), torch.stack([t for _, t in items])
    return float((model(x).argmax(-1) == y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zero", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--sync-batchnorm", action="store_true")
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--metrics")
    args = ap.parse_args()
    train, held_out = digits()
    mesh = paratrain.init()
    trainer = paratrain.Trainer(
        build(), mesh, F.cross_entropy, data=DatasetLoader(train, 64, seed=0),
        eval_data=DatasetLoader(held_out, 64, shuffle=False), zero=args.zero, sync_batchnorm=args.sync_batchnorm,
        lr=3e-3, steps=args.steps, warmup_steps=10, min_lr_ratio=0.1, eval_every=50, metrics=args.metrics,
        checkpoint_dir=args.checkpoint_dir, checkpoint_every=50 if args.checkpoint_dir else 0, resume=False)
    trainer.fit()
    state = trainer.state_dict()  # every rank takes part; rank 0 receives the whole model
    if state is not None:
        model = build()
        model.load_state_dict(state)
        print(f"held-out accuracy {accuracy(model, held_out):.1%} ({len(held_out)} images)")


if __name__ == "__main__":
    main()
