"""Elastic runs across nodes: the time from losing a node to the first step after recovery, and the steps redone.

Builds a cluster on one machine (paratrain.cluster: 2 network namespaces of 2 ranks, 1 Gbit/s
tbf links) and runs, once per kill,

    torchrun --nnodes 1:2 --max-restarts 3 --rdzv-conf <FAST_RDZV>  (one agent per node)
        paratrain train --model tiny --dp auto --steps N --global-batch 8 --seq-len 32 \\
                        --checkpoint-dir D --checkpoint-every 5 --metrics FILE

SIGKILLs node 1 (its agent and workers) once the metrics file shows step K at dp=4, and lets
node 0 finish at dp=2. From the metrics file and the kill's wall time: the restart record's time
(detection, re-rendezvous, new workers up, checkpoint loaded) and the first step record after the
kill (recovery), and the first past the last step recorded before the kill (caught up: the redone
steps' cost too), all from the kill; the step resumed from and the steps redone. Three modes,
each at the same kill steps: `elastic` as above; `snapshot` the same with `--snapshot-every 1`
(the survivor restores the in-memory snapshot of the last step before the kill instead of the
disk checkpoint); `plain`, torchrun's plain restart at the same size: `--nnodes 2` fixed, `--dp 4`, one worker process of node 1 SIGKILLed (the agents restart
every worker at 4 ranks from the disk checkpoint).

    python benchmarks/elastic.py                        # 3 kills, three modes, about 5 minutes
    python benchmarks/elastic.py --kills 5 --modes elastic,snapshot --json elastic.json

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
    p.add_argument(
        "--model",
        default="tiny",
        help="model preset (tiny: recovery is all start-up; small: the " "redone steps weigh)",
    )
    p.add_argument("--seq-len", type=int, default=32, help="longer sequences: dearer steps to redo")
    p.add_argument("--snapshot-every", type=int, default=1, help="the snapshot mode's --snapshot-every")
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=1, help="draws the kill steps (after the first checkpoint)")
    p.add_argument(
        "--modes",
        default="elastic,snapshot,plain",
        help="comma-separated: elastic, snapshot (elastic with --snapshot-every 1), plain",
    )
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument("--json", help="also write the figures to this file")
    return p.parse_args()


def one_kill(cluster, tmp: str, kill_at: int, mode: str, args: argparse.Namespace) -> dict:
    """One run, one kill at step `kill_at`; the figures of its recovery."""
    from paratrain.cluster import ELASTIC_ENV, FAST_RDZV, read_records

    elastic = mode != "plain"
    path, ck = os.path.join(tmp, f"m-{mode}-{kill_at}.jsonl"), os.path.join(tmp, f"ck-{mode}-{kill_at}")
    argv = [
        "train",
        "--model",
        args.model,
        "--dp",
        "auto" if elastic else "4",
        "--steps",
        str(args.steps),
        "--global-batch",
        "8",
        "--seq-len",
        str(args.seq_len),
        "--seed",
        "5",
        "--no-progress",
        "--metrics",
        path,
        "--checkpoint-dir",
        ck,
        "--checkpoint-every",
        str(args.checkpoint_every),
    ]
    argv += ["--snapshot-every", str(args.snapshot_every)] if mode == "snapshot" else []
    nnodes = "1:2" if elastic else "2"
    launch = cluster.start(
        argv, launcher_args=["--nnodes", nnodes, "--max-restarts", "3"], rdzv_conf=FAST_RDZV, env=ELASTIC_ENV
    )
    steps = lambda: [r for r in read_records(path) if "event" not in r]  # noqa: E731
    if not launch.wait_until(lambda: any(r["step"] >= kill_at for r in steps()), args.timeout):
        return {"failed": launch.wait(1).summary()}
    last = max(r["step"] for r in steps())
    if elastic:
        killed = launch.kill_node(1)
    else:  # one worker of node 1: every pid of the namespace but its agent's
        worker = next(p for p in cluster.pids(1) if parent(p) == launch.procs[1].pid)
        killed = time.time()
        os.kill(worker, signal.SIGKILL)
    result = launch.wait(args.timeout)
    if not result.ok:
        return {"failed": result.summary()}
    records = read_records(path)
    restart = next((r for r in records if r.get("event") == "restart"), None)
    if restart is None:
        return {"failed": f"no restart record in {path}: the kill at step {kill_at} did not stop a worker"}
    after = [r for r in records if "event" not in r and r["time"] > killed]
    first = min(after, key=lambda r: r["time"])
    caught_up = min((r["time"] for r in after if r["step"] > last), default=float("nan"))
    end = records[-1]
    return {
        "kill_at": kill_at,
        "last_step_before": last,
        "resumed_from": restart["resumed_from_step"],
        "steps_redone": restart.get("steps_redone"),
        "restart_record_s": restart["time"] - killed,
        "first_step_s": first["time"] - killed,
        "first_step": first["step"],
        "caught_up_s": caught_up - killed,
        "layout_after": end["layout"],
        "final_loss": end["final_loss"],
        "restored_from": restart.get("restored_from"),
        "membership_changes": end.get("membership_changes"),
        "time_lost_s": restart.get("time_lost_s"),
        "snapshot_s": statistics.median(s["s"] for s in end["snapshots"]) if end.get("snapshots") else None,
        "step_s": statistics.median(r["step_time_s"] for r in records if "event" not in r),
    }


def parent(pid: int) -> int | None:
    """The parent of `pid` (/proc), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def print_table(rows: dict) -> None:
    print(
        f"\n{'mode':<8} {'kill after':>10} {'resumed from':>12} {'redone':>6} {'restart record (s)':>18} "
        f"{'first step (s)':>14} {'caught up (s)':>13}  restored from, layout after, final loss"
    )
    for mode, runs in rows.items():
        for r in runs:
            print(
                f"{mode:<8} {r['last_step_before']:>10} {r['resumed_from']:>12} {r['steps_redone']:>6} "
                f"{r['restart_record_s']:>18.2f} {r['first_step_s']:>14.2f} {r['caught_up_s']:>13.2f}  "
                f"{r['restored_from']}, "
                f"{r['layout_after']}, {r['final_loss']:.6f}"
            )
    for mode, runs in rows.items():
        med = statistics.median(r["first_step_s"] for r in runs)
        up = statistics.median(r["caught_up_s"] for r in runs)
        snap = [r["snapshot_s"] for r in runs if r["snapshot_s"]]
        cost = f"; a snapshot takes {statistics.median(snap):.3f} s" if snap else ""
        print(
            f"{mode}: median kill -> first step {med:.2f} s, -> past the step reached before {up:.2f} s, over "
            f"{len(runs)} kills; steps redone "
            f"{[r['steps_redone'] for r in runs]}, median step {statistics.median(r['step_s'] for r in runs):.3f} s"
            f"{cost}"
        )


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
    kill_steps = [
        draw.randint(args.checkpoint_every + 1, args.steps - args.checkpoint_every - 2) for _ in range(args.kills)
    ]
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"elastic", "snapshot", "plain"}:
        print(f"elastic.py: --modes: elastic, snapshot or plain, got {args.modes!r}", file=sys.stderr)
        sys.exit(2)
    rows = {m: [] for m in modes}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp, Cluster(2, 2, "1gbit", name_prefix="ptelbench") as cluster:
        for kill_at in kill_steps:
            for mode in modes:
                r = one_kill(cluster, tmp, kill_at, mode, args)
                if "failed" in r:
                    print(f"elastic.py: {mode} run killed at step {kill_at} failed\n{r['failed']}", file=sys.stderr)
                    sys.exit(1)
                rows[mode].append(r)
                print(
                    f"{mode}, kill after step {r['last_step_before']}: first step {r['first_step_s']:.2f} s "
                    f"after the kill, {r['steps_redone']} redone",
                    flush=True,
                )
    print_table(rows)
    print(f"load average {os.getloadavg()[0]:.1f}, wall time {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "kill_steps": kill_steps, "runs": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
