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


def run_peer(p: argparse.ArgumentParser, worker: Callable, ours: str, peer: str, detail: Callable) -> None:
    """Check the shared options, run `worker` on --world ranks, print the speeds, the ratio
    ours / peer (with `detail(args)` after it) and whether the first-step losses agree; write
    --json; exit non-zero when they do not agree (the contenders compute different things)."""
    import math

    import torch

    args = p.parse_args()
    if args.global_batch % args.world:
        p.error(f"--global-batch {args.global_batch} must be a multiple of --world {args.world}")
    if min(args.warmup, args.steps, args.rounds) < 1:
        p.error("--warmup, --steps and --rounds must be at least 1 (the loss check uses the first warm-up step)")
    res = spawn_ranks(worker, args.world, args)
    ratio = print_speed(res, ours, peer)
    a, b = res["first_loss"][ours], res["first_loss"][peer]
    agree = math.isclose(a, b, rel_tol=1e-5)
    print(f"first-step loss: {ours} {a:.6f}, {peer} {b:.6f}: {'agree' if agree else 'DIFFER'}")
    print(f"ratio {ours}/{peer} tokens/s: {ratio:.2f}x ({detail(args)}, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "ratio": ratio, "first_loss_agree": agree, "args": vars(args)}, fh, indent=1)
    if not agree:
        raise SystemExit("the contenders disagree on the first-step loss: they do not compute the same thing")
