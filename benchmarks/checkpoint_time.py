"""Checkpoint save time, and the training time it blocks, with and without asynchronous save.

Trains each model for a few steps on `--dp` ranks and saves every `--every` steps through
`paratrain train`'s own path (`--checkpoint-dir`, `--checkpoint-every`, `--async-checkpoint`),
then reads the end record's per-save figures: `blocked_s` (how long the training loop waited:
the whole save when synchronous; staging to host memory plus any final wait when asynchronous)
and `total_s` (from the start of the save until its folder was published, manifest and CRC-32
included). The size on disk is that of one published checkpoint (weights + Adam moments, fp32).

    python benchmarks/checkpoint_time.py
    python benchmarks/checkpoint_time.py --models small --steps 9 --every 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from paratrain.checkpoint import checkpoints
from paratrain.config import RunConfig, validate
from paratrain.launch import launch


def run(model: str, async_save: bool, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        cfg = RunConfig()
        cfg.model.name = model
        cfg.layout.dp = args.dp
        cfg.train.steps, cfg.train.global_batch, cfg.train.seq_len = args.steps, args.dp * 2, args.seq_len
        cfg.train.progress, cfg.train.eval_batches = False, 1
        cfg.checkpoint.dir, cfg.checkpoint.every, cfg.checkpoint.keep = folder, args.every, 1
        cfg.checkpoint.async_save = async_save
        validate(cfg)
        result = launch(cfg)
        newest = checkpoints(folder)[0]
        size = sum(os.path.getsize(os.path.join(newest, f)) for f in os.listdir(newest))
    saves = result["checkpoints"]
    return {"saves": len(saves), "blocked_s": statistics.median(s["blocked_s"] for s in saves),
            "total_s": statistics.median(s["total_s"] for s in saves), "bytes": size,
            "step_s": cfg.train.global_batch * cfg.train.seq_len / result["tokens_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["small", "gpt2"])
    parser.add_argument("--dp", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--every", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--dir", default=None, help="where the checkpoints go (default: the system temp dir)")
    args = parser.parse_args()
    rows = []
    for model in args.models:
        for async_save in (False, True):
            rows.append((model, async_save, run(model, async_save, args)))
    print(f"\n{'model':<8} {'save':<6} {'size MB':>9} {'saves':>6} {'blocked s':>10} {'total s':>8} {'step s':>7}")
    for model, async_save, r in rows:
        print(f"{model:<8} {'async' if async_save else 'sync':<6} {r['bytes'] / 1e6:>9,.1f} {r['saves']:>6} "
              f"{r['blocked_s']:>10.3f} {r['total_s']:>8.3f} {r['step_s']:>7.3f}")


if __name__ == "__main__":
    main()
