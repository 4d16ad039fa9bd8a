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

from paratrain.group import init
from paratrain.optim import param_groups as optimizer_params  # for a loop of your own
from paratrain.parallel.parallelize import parallelize
from paratrain.train import Trainer

__all__ = ["Trainer", "init", "optimizer_params", "parallelize"]
