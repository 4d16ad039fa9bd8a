"""Synchronous all-reduce against parameter servers (synchronous, stale-synchronous, asynchronous)
when one worker is a straggler, measured in the same run.

Every contender trains the same preset from the same seed on the same global batches, with
worker 1 sleeping `--delay` seconds every step (`--simulate-straggler 1:DELAY`). All-reduce and
the synchronous parameter server wait for the straggler at every step; with staleness K the
fast worker may run up to K clocks ahead, and fully asynchronous servers apply every push as it
arrives, so the fast worker does more of the work. All runs process the same number of tokens
(steps x global batch). Printed: tokens/s (all-reduce: the trainer's steady-state figure over
steps 2..N; parameter servers: tokens over the workers' wall time, first step included), the
final loss (mean of the last 5 steps) and its distance from the synchronous all-reduce run.

    python benchmarks/sync_vs_async.py
    python benchmarks/sync_vs_async.py --model small --steps 60 --delay 0.3 --json sync_vs_async.json
"""

from __future__ import annotations

import argparse
import json
import statistics

from paratrain.config import RunConfig, validate
from paratrain.launch import launch


def run(args: argparse.Namespace, **settings) -> dict:
    cfg = RunConfig()
    cfg.model.name = args.model
    cfg.layout.dp = args.workers
    tr = cfg.train
    tr.steps, tr.global_batch, tr.seq_len, tr.seed, tr.progress = args.steps, args.global_batch, args.seq_len, 1, False
    tr.simulate_straggler = f"1:{args.delay}"
    for key, value in settings.items():
        setattr(tr, key, value)
    validate(cfg)
    return launch(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the straggler (worker 1) sleeps per step")
    parser.add_argument("--staleness", type=int, default=4, help="K of the stale-synchronous contender")
    parser.add_argument("--json")
    args = parser.parse_args()

    contenders = {
        "all-reduce": {},
        "ps sync": dict(sync="ps", servers=1, staleness=0),
        f"ps ssp K={args.staleness}": dict(sync="ps", servers=1, staleness=args.staleness),
        "ps async": dict(sync="ps", servers=1, staleness=-1),
    }
    results = {name: run(args, **settings) for name, settings in contenders.items()}
    base = results["all-reduce"]
    tail = lambda r: statistics.mean(r["losses"][-5:])  # noqa: E731
    print(f"\n{args.model}, {args.workers} workers, worker 1 sleeps {args.delay} s per step, {args.steps} steps of "
          f"{args.global_batch} x {args.seq_len} tokens")
    print(f"{'contender':<16} {'tokens/s':>9} {'vs all-reduce':>14} {'final loss':>11} {'vs sync':>8}  "
          f"{'max lead':>8} {'max staleness':>13} {'worker 0 steps':>14}")
    table = {}
    for name, r in results.items():
        row = {"tokens_per_s": r["tokens_per_s"], "speedup": r["tokens_per_s"] / base["tokens_per_s"],
               "final_loss": tail(r), "loss_vs_sync": tail(r) / tail(base) - 1,
               "max_clock_lead": r.get("ps_max_clock_gap"), "max_version_staleness": r.get("ps_max_version_staleness"),
               "worker0_steps": r.get("worker0_clocks", args.steps)}
        table[name] = row
        lead = "-" if row["max_clock_lead"] is None else row["max_clock_lead"]
        stale = "-" if row["max_version_staleness"] is None else row["max_version_staleness"]
        print(f"{name:<16} {row['tokens_per_s']:>9,.0f} {row['speedup']:>13.2f}x {row['final_loss']:>11.4f} "
              f"{row['loss_vs_sync']:>+7.1%}  {lead:>8} {stale:>13} {row['worker0_steps']:>14}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": table}, fh, indent=1)


if __name__ == "__main__":
    main()
