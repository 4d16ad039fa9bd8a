"""Training across nodes, end to end: step time and inter-node bytes per `--allreduce` and `--compress` mode.

Builds a cluster on one machine (paratrain.cluster: `--nodes` network namespaces of
`--ranks-per-node` ranks, `--rate` tbf links) and runs `paratrain train` under torchrun on it once
per contender, the same model, seed, batches and layout (dp = every rank) each time:

    paratrain train --model small --dp 4 --steps N --global-batch 16 --seq-len 128 --metrics FILE [contender's flags]

From each metrics file: the step time (median of the step records' `step_time_s` after
`--warmup` steps: the slowest rank's time of the step), `comm_bytes` and `comm_bytes_inter_node`
per step (summed over ranks; medians after the warm-up too) and the last step's loss. With
`--rounds R` every contender runs R times, in an order rotated by round, and the steps of its runs
are pooled. Printed with each contender's step time against `--allreduce backend` (gloo's own
ring). The compressed contenders run with `--compress-warmup 0` (compressed from step 1;
`--allreduce` stays backend: the compressors run their own collectives); after so few steps their
loss only shows that the run trained.

    python benchmarks/cluster_train.py                       # 2 nodes x 2 ranks, 1 Gbit/s, about 4 minutes
    python benchmarks/cluster_train.py --rounds 2            # twice each, alternating
    python benchmarks/cluster_train.py --steps 12 --contenders backend,auto,powersgd:4 --json cluster_train.json

Root only (network namespaces). Exit status 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

CONTENDERS = ("backend", "auto", "ring", "hierarchical", "powersgd:4", "topk:0.01")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="tc rate of every node link")
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the medians")
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--contenders", default=",".join(CONTENDERS),
                   help="comma-separated: an --allreduce algorithm, or a --compress mode (backend all-reduce)")
    p.add_argument("--rounds", type=int, default=1, help="runs per contender, in alternating order; steps pooled")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run")
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args()


def flags_of(contender: str) -> list[str]:
    """`paratrain train` flags of a contender: an all-reduce algorithm, or a compression mode."""
    from paratrain.comm.algorithms import ALGORITHMS

    if contender in ALGORITHMS or contender == "auto":
        return ["--allreduce", contender]
    return ["--compress", contender, "--compress-warmup", "0"]


def read_metrics(paths: list[str], warmup: int) -> dict:
    """Medians over the step records after the warm-up of every metrics file of a contender (one
    per round), and the last loss of the first."""
    runs = [[r for r in map(json.loads, filter(str.strip, open(p))) if "event" not in r] for p in paths]
    timed = [r for steps in runs for r in (steps[warmup:] or steps)]
    median = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    per_run = [statistics.median(r["step_time_s"] for r in (steps[warmup:] or steps)) for steps in runs]
    return {"steps": len(runs[0]), "step_time_s": median("step_time_s"), "per_run_s": per_run,
            "step_times": [[r["step_time_s"] for r in steps] for steps in runs],
            "comm_bytes": median("comm_bytes"), "comm_bytes_inter_node": median("comm_bytes_inter_node"),
            "last_loss": runs[0][-1]["loss"]}


def auto_choices(path: str) -> str:
    """What `--allreduce auto` measured fastest, from the end record of a run's metrics file."""
    end = [r for r in map(json.loads, filter(str.strip, open(path))) if r.get("event") == "end"]
    picks = end[0].get("allreduce_auto", []) if end else []
    return ", ".join(f"{p['chose']} for the {p['bytes'] / 1e6:.1f} MB {p['op']}" for p in picks) or "nothing recorded"


def run_all(args: argparse.Namespace, contenders: list[str]) -> dict:
    from paratrain.cluster import Cluster

    base = ["train", "--model", args.model, "--dp", str(args.nodes * args.ranks_per_node), "--steps", str(args.steps),
            "--global-batch", str(args.global_batch), "--seq-len", str(args.seq_len), "--no-progress", "--seed", "1"]
    paths = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory() as tmp, Cluster(args.nodes, args.ranks_per_node, args.rate,
                                                      name_prefix="ptbench") as cluster:
        for r in range(args.rounds):  # round r starts at contender r: each sees the machine's other load alike
            for name in contenders[r % len(contenders):] + contenders[:r % len(contenders)]:
                path = os.path.join(tmp, f"{name.replace(':', '_')}-{r}.jsonl")  # the namespaces share the file system
                run = cluster.run([*base, *flags_of(name), "--metrics", path], timeout=args.timeout)
                if not run.ok:
                    print(f"cluster_train.py: {name} failed\n{run.summary()}", file=sys.stderr)
                    sys.exit(1)
                paths[name].append(path)
                print(f"round {r + 1}, {name}: {read_metrics([path], args.warmup)['step_time_s']:.3f} s/step, "
                      f"wall {run.wall_s:.0f} s", flush=True)
        results = {name: read_metrics(paths[name], args.warmup) for name in contenders}
        if "auto" in paths:
            results["auto"]["auto_chose"] = auto_choices(paths["auto"][0])
        return results


def print_table(results: dict, args: argparse.Namespace) -> None:
    ref = results.get("backend")
    print(f"\n{args.model}, dp={args.nodes * args.ranks_per_node} on {args.nodes} nodes x {args.ranks_per_node} ranks, "
          f"tbf {args.rate}; {args.steps} steps of {args.global_batch} x {args.seq_len} tokens, medians over steps "
          f"{args.warmup + 1}..{args.steps} of {args.rounds} run(s) each")
    print(f"{'contender':<14} {'s/step':>7} {'backend/this':>12} {'comm bytes/step':>16} {'inter-node/step':>16} "
          f"{'inter vs backend':>16} {'last loss':>9}  each run's s/step")
    for name, r in results.items():
        speed = ref["step_time_s"] / r["step_time_s"] if ref else float("nan")
        inter = r["comm_bytes_inter_node"] / ref["comm_bytes_inter_node"] if ref else float("nan")
        print(f"{name:<14} {r['step_time_s']:>7.3f} {speed:>11.2f}x {r['comm_bytes']:>16,.0f} "
              f"{r['comm_bytes_inter_node']:>16,.0f} {inter:>15.3f}x {r['last_loss']:>9.4f}  "
              + ", ".join(f"{x:.3f}" for x in r["per_run_s"]))
    if "auto" in results:
        print(f"--allreduce auto measured and chose: {results['auto']['auto_chose']}")


def main() -> None:
    args = parse()
    from paratrain.cluster import available

    reason = available()
    if reason:
        print(f"cluster_train.py: {reason}", file=sys.stderr)
        sys.exit(2)
    from paratrain.comm.algorithms import ALGORITHMS
    from paratrain.comm.compress import parse_compress

    if args.rounds < 1 or not 0 <= args.warmup < args.steps:
        print("cluster_train.py: --rounds: at least 1; --warmup: at least 0 and below --steps", file=sys.stderr)
        sys.exit(2)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    for name in contenders:
        if name not in (*ALGORITHMS, "auto"):
            try:
                parse_compress(name)
            except ValueError as e:
                print(f"cluster_train.py: --contenders: {name!r} is neither an --allreduce algorithm nor a "
                      f"--compress mode: {e}", file=sys.stderr)
                sys.exit(2)
    started = time.monotonic()
    results = run_all(args, contenders)
    print_table(results, args)
    print(f"wall time {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
