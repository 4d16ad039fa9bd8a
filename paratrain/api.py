"""The Python API: bring your own model, loss and data to the one Trainer.

    import paratrain
    from paratrain.data import DatasetLoader

    mesh = paratrain.init(dp=2)                       # under torchrun, or in one plain process
    data = DatasetLoader(train_set, global_batch=64, seed=0)   # step k's batch: f(seed, k)
    trainer = paratrain.Trainer(model, mesh, loss_fn, data=data, zero=3, precision="bf16",
                                lr=3e-4, steps=1000, warmup_steps=100, min_lr_ratio=0.1,
                                metrics="run.jsonl", checkpoint_dir="ck", checkpoint_every=100)
    trainer.fit()                                     # or: loss = trainer.step(inputs, targets)

`paratrain.Trainer` is the class `paratrain train` runs (train.py); its settings are the names of
the CLI's settings. `parallelize(model, mesh, ...)` applies the strategies alone, for a loop of
your own (parallel/parallelize.py).
"""

from __future__ import annotations

import torch.nn as nn

from paratrain.group import init
from paratrain.parallel.parallelize import parallelize
from paratrain.parallel.zero import ZeroDataParallel
from paratrain.train import Trainer

__all__ = ["Trainer", "init", "optimizer_params", "parallelize"]


def optimizer_params(wrapped: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups (matrices decay, vectors do not) for a loop of your own: the fp32
    master shards under ZeRO / mixed precision, the parameters otherwise."""
    if isinstance(wrapped, ZeroDataParallel):
        decay, no_decay = wrapped.master_params(True), wrapped.master_params(False)
    else:
        ps = [p for p in wrapped.parameters() if p.requires_grad]
        decay, no_decay = [p for p in ps if p.dim() >= 2], [p for p in ps if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
