"""Elastic runs across nodes: the time from losing a node to the first step after recovery, and the steps redone.

Builds a cluster on one machine (paratrain.cluster: 2 network namespaces of 2 ranks, 1 Gbit/s
tbf links) and runs, once per kill,

    torchrun --nnodes 1:2 --max-restarts 3 --rdzv-conf <FAST_RDZV>  (one agent per node)
        paratrain train --model tiny --dp auto --steps N --global-batch 8 --seq-len 32 \\
                        --checkpoint-dir D --checkpoint-every 5 --metrics FILE

SIGKILLs node 1 (its agent and workers) once the metrics file shows step K at dp=4, and lets
node 0 finish at dp=2. From the metrics file and the kill's wall time: the restart record's time
(detection, re-rendezvous, new workers up, checkpoint loaded) and the first step record after the
kill (recovery), both from the kill; the last step recorded before it, the step resumed from and
the steps redone. `--plain` also times torchrun's plain restart at the same size for comparison:
`--nnodes 2` fixed, `--dp 4`, one worker process of node 1 SIGKILLed at the same steps (the
agents restart every worker at 4 ranks).

    python benchmarks/elastic.py                        # 3 kills, elastic and plain, about 3 minutes
    python benchmarks/elastic.py --kills 5 --json elastic.json

Root only (network namespaces); run under `flock /tmp/paratrain-harness.lock`. Exit status 1 if a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=3, help="runs per mode, one kill each")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=1, help="draws the kill steps (after the first checkpoint)")
    p.add_argument("--plain", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torchrun's plain restart at the same size")
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args()


def one_kill(cluster, tmp: str, kill_at: int, elastic: bool, args: argparse.Namespace) -> dict:
    """One run, one kill at step `kill_at`; the figures of its recovery."""
    from paratrain.cluster import ELASTIC_ENV, FAST_RDZV, read_records

    path, ck = os.path.join(tmp, f"m-{elastic}-{kill_at}.jsonl"), os.path.join(tmp, f"ck-{elastic}-{kill_at}")
    argv = ["train", "--model", "tiny", "--dp", "auto" if elastic else "4", "--steps", str(args.steps),
            "--global-batch", "8", "--seq-len", "32", "--seed", "5", "--no-progress", "--metrics", path,
            "--checkpoint-dir", ck, "--checkpoint-every", str(args.checkpoint_every)]
    nnodes = "1:2" if elastic else "2"
    launch = cluster.start(argv, launcher_args=["--nnodes", nnodes, "--max-restarts", "3"], rdzv_conf=FAST_RDZV,
                           env=ELASTIC_ENV)
    steps = lambda: [r for r in read_records(path) if "event" not in r]  # noqa: E731
    if not launch.wait_until(lambda: any(r["step"] >= kill_at for r in steps()), args.timeout):
        return {"failed": launch.wait(1).summary()}
    last = max(r["step"] for r in steps())
    if elastic:
        killed = launch.kill_node(1)
    else:  # one worker of node 1: every pid of the namespace but its agent's
        worker = next(p for p in cluster.pids(1) if p != launch.procs[1].pid)
        killed = time.time()
        os.kill(worker, signal.SIGKILL)
    result = launch.wait(args.timeout)
    if not result.ok:
        return {"failed": result.summary()}
    records = read_records(path)
    restart = next(r for r in records if r.get("event") == "restart")
    first = min((r for r in records if "event" not in r and r["time"] > killed), key=lambda r: r["time"])
    end = records[-1]
    return {"kill_at": kill_at, "last_step_before": last, "resumed_from": restart["resumed_from_step"],
            "steps_redone": restart.get("steps_redone"), "restart_record_s": restart["time"] - killed,
            "first_step_s": first["time"] - killed, "first_step": first["step"],
            "layout_after": end["layout"], "final_loss": end["final_loss"],
            "membership_changes": end.get("membership_changes")}


def print_table(rows: dict) -> None:
    print(f"\n{'mode':<8} {'kill after':>10} {'resumed from':>12} {'redone':>6} {'restart record (s)':>18} "
          f"{'first step (s)':>14}  layout after, final loss")
    for mode, runs in rows.items():
        for r in runs:
            print(f"{mode:<8} {r['last_step_before']:>10} {r['resumed_from']:>12} {r['steps_redone']:>6} "
                  f"{r['restart_record_s']:>18.2f} {r['first_step_s']:>14.2f}  {r['layout_after']}, "
                  f"{r['final_loss']:.6f}")
    for mode, runs in rows.items():
        med = statistics.median(r["first_step_s"] for r in runs)
        print(f"{mode}: median kill -> first step {med:.2f} s over {len(runs)} kills, "
              f"steps redone {[r['steps_redone'] for r in runs]}")


def main() -> None:
    args = parse()
    sys.path.insert(0, ROOT)
    from paratrain.cluster import Cluster, available

    reason = available()
    if reason:
        print(f"elastic.py: {reason}", file=sys.stderr)
        sys.exit(2)
    if args.kills < 1 or args.steps < 2 * args.checkpoint_every + 4:
        print("elastic.py: --kills: at least 1; --steps: at least 2 x --checkpoint-every + 4", file=sys.stderr)
        sys.exit(2)
    draw = random.Random(args.seed)
    kill_steps = [draw.randint(args.checkpoint_every + 1, args.steps - args.checkpoint_every - 2)
                  for _ in range(args.kills)]
    modes = ["elastic", "plain"] if args.plain else ["elastic"]
    rows = {m: [] for m in modes}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, Cluster(2, 2, "1gbit", name_prefix="ptelbench") as cluster:
        for kill_at in kill_steps:
            for mode in modes:
                r = one_kill(cluster, tmp, kill_at, mode == "elastic", args)
                if "failed" in r:
                    print(f"elastic.py: {mode} run killed at step {kill_at} failed\n{r['failed']}", file=sys.stderr)
                    sys.exit(1)
                rows[mode].append(r)
                print(f"{mode}, kill after step {r['last_step_before']}: first step {r['first_step_s']:.2f} s "
                      f"after the kill, {r['steps_redone']} redone", flush=True)
    print_table(rows)
    print(f"load average {os.getloadavg()[0]:.1f}, wall time {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "kill_steps": kill_steps, "runs": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
