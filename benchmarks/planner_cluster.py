"""Does the planner predict a cluster? On a cluster of this machine (paratrain.cluster: 2 nodes of 2
ranks, 1 Gbit/s between them), calibrate the links for `cpu-cluster`, train `small` in layouts whose
groups cross nodes, and compare predicted with measured step time.

    python benchmarks/planner_cluster.py [--steps 12] [--rounds 2] [--rate 1gbit] [--no-calibrate] [--algorithms]
                                         [--json out.json] [--measured out.json]

Root only (network namespaces); run it under the harness lock (`flock /tmp/paratrain-harness.lock ...`).
Compute is priced by cpu-local's calibration (measured first when there is none) and the cluster's
reference step; the links by the cluster's calibration, measured here in the same cluster as the
runs. Measured time: the median `step_time_s` over steps 3.. of every round (the first two steps of
a run pay for warm-up); `--rounds` runs every layout once per round, round after round.
The layouts: dp=4 with the backend's all-reduce and ZeRO-1/2/3, dp=2 x tp=2 (tp inside a node,
with and without sequence parallelism), tp=4 (across nodes), dp=2 x pp=2 (dp across nodes), tp=2 x
pp=2 (pp across nodes), and dp=4 with our ring, tree and hierarchical all-reduce (`--allreduce`),
which the planner prices by comm/algorithms.py's model; all counted. `--algorithms` adds dp=4 with
`--allreduce auto`, shown, not counted: `paratrain train` makes that choice at run time by its own
means (comm/), which the planner does not reproduce; the planner's `auto` is the cheapest by the model. Every node
runs on this machine's cores, so machines shared with other jobs are noisy: the load average is printed.
`--measured FILE` prices the runs of an earlier `--json FILE` again (after a recalibration or a
change to the planner) without running anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from paratrain.cluster import Cluster, available  # noqa: E402
from paratrain.models.gpt import PRESETS  # noqa: E402
from paratrain.planner.calibrate import calibrate, calibrate_cluster  # noqa: E402
from paratrain.planner.cost import Candidate, estimate  # noqa: E402
from paratrain.planner.hardware import cpu_cluster, cpu_local  # noqa: E402

MODEL, GLOBAL_BATCH, SEQ = "small", 8, 128
NODES, RANKS_PER_NODE = 2, 2

# (flags for `paratrain train`, the same layout for the planner, counted in the error)
LAYOUTS = [
    (["--dp", "4"], Candidate(dp=4), True),
    (["--dp", "4", "--zero", "1"], Candidate(dp=4, zero=1), True),
    (["--dp", "4", "--zero", "2"], Candidate(dp=4, zero=2), True),
    (["--dp", "4", "--zero", "3"], Candidate(dp=4, zero=3), True),
    (["--dp", "2", "--tp", "2"], Candidate(dp=2, tp=2), True),
    (["--dp", "2", "--tp", "2", "--sequence-parallel"], Candidate(dp=2, tp=2, sequence_parallel=True), True),
    (["--tp", "4"], Candidate(tp=4), True),
    (["--dp", "2", "--pp", "2", "--schedule", "1f1b", "--microbatches", "2"],
     Candidate(dp=2, pp=2, schedule="1f1b", microbatches=2), True),
    (["--tp", "2", "--pp", "2", "--schedule", "1f1b", "--microbatches", "4"],
     Candidate(tp=2, pp=2, schedule="1f1b", microbatches=4), True),
    (["--dp", "4", "--allreduce", "ring"], Candidate(dp=4, allreduce="ring"), True),
    (["--dp", "4", "--allreduce", "tree"], Candidate(dp=4, allreduce="tree"), True),
    (["--dp", "4", "--allreduce", "hierarchical"], Candidate(dp=4, allreduce="hierarchical"), True),
]
# `paratrain train --allreduce auto` chooses at run time by its own means (comm/), the planner's `auto` by the
# model's cheapest: shown, not counted
ALGORITHM_LAYOUTS = [
    (["--dp", "4", "--allreduce", "auto"], Candidate(dp=4, allreduce="auto"), False),
]


def describe(flags: list[str]) -> str:
    """The layout as its flags say it, short: dp=2 tp=2 SP, tp=2 pp=2 1f1b m=4, dp=4 allreduce=ring."""
    out, it = [], iter(flags)
    for flag in it:
        name = flag.lstrip("-")
        if name == "sequence-parallel":
            out.append("SP")
        else:
            value = next(it)
            out.append({"microbatches": f"m={value}", "schedule": value}.get(name, f"{name}={value}"))
    return " ".join(out)


def measure(cluster: Cluster, flags: list[str], steps: int) -> tuple[float, list[float], float, float | None]:
    """(median step seconds over steps 3.., every step's seconds, bytes sent between nodes per step, the
    pipeline's measured idle fraction or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.jsonl")  # the namespaces share the file system
        args = ["train", "--model", MODEL, "--steps", str(steps), "--global-batch", str(GLOBAL_BATCH), "--seq-len",
                str(SEQ), "--device", "cpu", "--metrics", path, "--no-progress", *flags]
        result = cluster.run(args, timeout=900)
        if not result.ok:
            raise RuntimeError(f"{' '.join(flags)} failed: {result.summary()}")
        records = [json.loads(line) for line in open(path) if line.strip()]
    steps_ = [r for r in records if "step" in r and "event" not in r and "step_time_s" in r]
    times = [r["step_time_s"] for r in steps_ if r["step"] >= 3]
    inter = statistics.median(r.get("comm_bytes_inter_node") or 0 for r in steps_)
    idle = [r["pipeline_idle"] for r in steps_ if r["step"] >= 3 and "pipeline_idle" in r]
    return statistics.median(times), times, inter, statistics.median(idle) if idle else None


def run_layouts(args, log) -> tuple[list[dict], object]:
    """Calibrate (unless --no-calibrate), then train every layout on the cluster: (measured rows, hardware)."""
    if not args.no_calibrate and not cpu_local().calibrated:
        calibrate(log=log)
    layouts = LAYOUTS + (ALGORITHM_LAYOUTS if args.algorithms else [])
    rows = [{"layout": describe(flags), "counted": counted, "steps_s": [], "round_s": []}
            for flags, _, counted in layouts]
    with Cluster(NODES, RANKS_PER_NODE, args.rate, name_prefix="ptbench") as cluster:
        hw = cpu_cluster() if args.no_calibrate else calibrate_cluster(cluster=cluster, log=log)
        for k in range(args.rounds):  # rounds, not repeats in a row: a change of load falls on every layout
            for row, (flags, _, _) in zip(rows, layouts):
                t, times, row["inter_node_bytes"], idle = measure(cluster, flags, args.steps)
                if idle is not None:
                    row.setdefault("pipeline_idle", []).append(idle)
                row["steps_s"] += times
                row["round_s"].append(t)
                log(f"  round {k + 1}: {row['layout']:<32} {t:.3f} s (steps {min(times):.3f}-{max(times):.3f})")
    for row in rows:
        row["meas_s"] = statistics.median(row["steps_s"])
    return rows, hw


def price(rows: list[dict], hw) -> None:
    """Add the planner's prediction on `hw` to every measured row."""
    cands = {describe(flags): cand for flags, cand, _ in LAYOUTS + ALGORITHM_LAYOUTS}
    for r in rows:
        e = estimate(PRESETS[MODEL], SEQ, GLOBAL_BATCH, cands[r["layout"]], hw, gpus_per_node=RANKS_PER_NODE)
        r["pred_s"], r["breakdown"] = e.step_time_s, e.as_dict()["time_breakdown_s"]


def report(rows: list[dict], rate: str) -> float:
    """Print the table; return the median absolute relative error of the counted rows."""
    print(f"{MODEL}, global batch {GLOBAL_BATCH} x {SEQ}, {NODES} nodes x {RANKS_PER_NODE} ranks at {rate}")
    parts = ("compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s", "other_s")
    print(f"{'layout':<32} {'pred s':>7} {'meas s':>7} {'err':>6}  {'rounds':<17} {'MB/step':>7}   predicted: "
          + " ".join(f"{k[:-2].replace('_comm', ''):>7}" for k in parts))
    errors = []
    for r in rows:
        err = (r["pred_s"] - r["meas_s"]) / r["meas_s"]
        if r["counted"]:
            errors.append(abs(err))
        rounds = "/".join(f"{t:.3f}" for t in r.get("round_s", [r["meas_s"]]))
        print(f"{r['layout']:<32} {r['pred_s']:>7.3f} {r['meas_s']:>7.3f} {err:>+6.0%}{' ' if r['counted'] else '*'}"
              f" {rounds:<17} {r['inter_node_bytes'] / 1e6:>7.1f}              "
              + " ".join(f"{r['breakdown'][k]:>7.3f}" for k in parts))
    median = statistics.median(errors)
    print()
    print(f"median |error| of step time over {len(errors)} layouts: {median:.1%} (goal: within 20%)"
          + ("; * not counted (see the docstring)" if len(errors) < len(rows) else ""))
    print("meas s: the median over every round's steps; rounds: each round's median; MB/step: bytes sent "
          "between nodes per step, as the ranks count them (all ranks)")
    return median


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2, help="runs of every layout, one round after another")
    ap.add_argument("--rate", default="1gbit", help="each node's link, as tc says it")
    ap.add_argument("--no-calibrate", action="store_true", help="use the saved cpu-local and cpu-cluster calibrations")
    ap.add_argument("--algorithms", action="store_true", help="also dp=4 with --allreduce auto (not counted)")
    ap.add_argument("--measured", help="re-price the measured rows of an earlier --json file (runs nothing)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.measured:
        with open(args.measured) as fh:
            saved = json.load(fh)
        rows, hw, args.rate = saved["rows"], cpu_cluster(), saved["rate"]
    else:
        why = available()
        if why:
            print(f"planner_cluster: {why}", file=sys.stderr)
            return 2
        log(f"load average before: {os.getloadavg()[0]:.1f}; {len(os.sched_getaffinity(0))} cores")
        rows, hw = run_layouts(args, log)
        log(f"load average after: {os.getloadavg()[0]:.1f}")
    log(f"{hw.name}: {hw.note}\n")
    price(rows, hw)
    median = report(rows, args.rate)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "median_time_error": median, "rate": args.rate, "note": hw.note}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
