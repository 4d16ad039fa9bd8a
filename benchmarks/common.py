"""What the benchmark scripts share: spawning gloo ranks, and the speed table with its ratio."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from typing import Callable


def peer_parser(doc: str, global_batch: int = 16, warmup: int = 2, steps: int = 10,
                rounds: int = 3) -> argparse.ArgumentParser:
    """The options every ours-against-a-peer speed benchmark takes."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--global-batch", type=int, default=global_batch)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=warmup, help="untimed steps per round")
    p.add_argument("--steps", type=int, default=steps, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=rounds, help="alternating rounds per contender")
    p.add_argument("--json", help="also write the figures to this file")
    return p


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
