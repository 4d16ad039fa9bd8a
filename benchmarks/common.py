"""What the benchmark scripts share: spawning gloo ranks, and the speed table with its ratio."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from typing import Callable


def spawn_ranks(worker: Callable, nprocs: int, args: argparse.Namespace) -> dict:
    """Run `worker(rank, nprocs, init_file, args, out)` on `nprocs` processes; return the JSON
    that rank 0 wrote to `out`."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(worker, args=(nprocs, os.path.join(tmp, "init"), args, out), nprocs=nprocs)
        with open(out) as fh:
            return json.load(fh)


def print_speed(res: dict, ours: str, peer: str) -> float:
    """Print tokens/s (median, min, max over rounds) and first-step loss; return ours / peer."""
    print(f"{'contender':<10} {'tokens/s median':>16} {'min':>9} {'max':>9}   first-step loss")
    for name, tps in res["tokens_per_s"].items():
        print(f"{name:<10} {statistics.median(tps):>16,.0f} {min(tps):>9,.0f} {max(tps):>9,.0f}"
              f"   {res['first_loss'][name]:.6f}")
    return statistics.median(res["tokens_per_s"][ours]) / statistics.median(res["tokens_per_s"][peer])
