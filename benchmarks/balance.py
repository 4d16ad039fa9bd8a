"""Load balancing with one slow rank: `--balance even` against `--balance dynamic` and asynchronous
parameter servers, on a simulated slow rank and on a node with less CPU, measured in the same run.

Every contender trains the same preset from the same seed on the same global batches (the same
steps x global batch tokens) with dp = 2, rank 1 `--slowdown` F times slower than rank 0:

- `local` (simulated): two local processes (paratrain.launch), `--simulate-slowdown 1:F` (rank 1's
  forward and backward take F times as long).
- `cluster` (real): the harness (paratrain.cluster), 2 nodes x 1 rank, node 0 pinned to CPU 0 with
  a quota of 1 CPU, node 1 pinned to CPU 1 with a quota of 1/F CPU (cgroups), so one core against
  a part of one. The parameter servers need a third rank: a 3-node cluster whose node 2 (the
  server) is pinned to CPU 1 without a quota, where it takes what node 1 leaves.

Contenders: `even` (`--balance even`), `dynamic` (`--balance dynamic`), `ps` (`--sync ps
--servers 1 --staleness -1`). After the cases with the slow rank, `even` and `dynamic` run again
with no slowdown (F = 1; `--no-overhead` leaves them out): what dynamic costs where there is
nothing to balance. From each metrics file:

- tokens/s over the steps after `--warmup` (tokens over the sum of their step times; for the
  servers, the time between applied steps), and the median of those steps' own tokens/s;
- the final loss (the last step's) and its distance from even's of the same round;
- `other s`: the median over those steps of the step time less the slowest replica's compute (its
  forward and backward less its waits): the optimizer, the exposed gradient all-reduce, the
  metrics gather; what no share can hide;
- for `dynamic` the shares of the last step and the step from which they held; for `even` the
  speeds its balancer measured (sequences/s of compute per replica), whose ratio F' is the
  slowdown actually seen (on the cluster it is the quota's, not exactly F).

The limit: with rank 1 F times slower, the balanced step takes 2F / (F + 1) of the fast rank's
half of the batch, so dynamic can reach (F + 1) / 2 x even (1.5x for F = 2; 1x with no
slowdown). Printed against F (`of limit`) and, in the header, against the measured F'. With
`--rounds R` every contender runs R times in rotated order; medians are printed, every round's
figure beside them. Before each run the benchmark waits (20 s at a time, `--max-wait` at most)
while other paratrain or pytest processes run on the machine, and prints the load average.

    python benchmarks/balance.py --where local
    flock /tmp/paratrain-harness.lock python benchmarks/balance.py --where both --json balance.json
    flock /tmp/paratrain-harness.lock python benchmarks/balance.py --where cluster --contenders even,dynamic

`cluster` is root only (network namespaces, cgroups). Exit status 1 if a run failed, 2 on bad options.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CONTENDERS = {"even": ["--balance", "even"], "dynamic": ["--balance", "dynamic"],
              "ps": ["--sync", "ps", "--servers", "1", "--staleness", "-1"]}
OTHERS = re.compile(r"pytest|paratrain")  # processes that would disturb the timing


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--where", choices=("local", "cluster", "both"), default="both")
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="steps left out of tokens/s (dynamic moves in them)")
    p.add_argument("--global-batch", type=int, default=24)
    p.add_argument("--microbatches", type=int, default=6, help="per replica: shares move in 1 / (2 x this)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--slowdown", type=float, default=2.0, help="rank 1 is this many times slower")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, of " + ", ".join(CONTENDERS))
    p.add_argument("--no-overhead", dest="overhead", action="store_false",
                   help="leave out even and dynamic with no slowdown")
    p.add_argument("--rounds", type=int, default=2, help="runs per contender, in rotated order; medians printed")
    p.add_argument("--rate", default="1gbit", help="cluster: tc rate of each node's link (none: unlimited)")
    p.add_argument("--timeout", type=float, default=900, help="cluster: seconds per run")
    p.add_argument("--max-wait", type=float, default=1800, help="seconds to wait for other processes per run")
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    a.contenders = [c.strip() for c in a.contenders.split(",") if c.strip()]
    bad = [c for c in a.contenders if c not in CONTENDERS]
    problem = (f"--contenders: {bad[0]!r} is not one of {', '.join(CONTENDERS)}" if bad or not a.contenders else
               "--rounds: at least 1; --warmup: at least 0 and below --steps" if a.rounds < 1 or
               not 0 <= a.warmup < a.steps else "--slowdown: above 1, at most 100" if not 1 < a.slowdown <= 100
               else None)
    if problem:
        print(f"balance.py: {problem}", file=sys.stderr)
        sys.exit(2)
    a.rate = None if a.rate == "none" else a.rate
    return a


def train_flags(args: argparse.Namespace, contender: str, metrics: str) -> list[str]:
    """`paratrain train` flags of one run (without the slowdown)."""
    return ["--model", args.model, "--dp", "2", "--steps", str(args.steps), "--global-batch", str(args.global_batch),
            "--microbatches", str(args.microbatches), "--seq-len", str(args.seq_len), "--seed", "1", "--no-progress",
            "--metrics", metrics, *CONTENDERS[contender]]


def run_local(args: argparse.Namespace, contender: str, slowdown: float, metrics: str) -> dict:
    """One run on local processes, rank 1 slowed by --simulate-slowdown."""
    from paratrain.cli import build_parser, config_from_args
    from paratrain.config import validate
    from paratrain.launch import launch
    from paratrain.sources import prepare_data

    flags = train_flags(args, contender, metrics)
    if slowdown > 1:
        flags += ["--simulate-slowdown", f"1:{slowdown:g}"]
    cfg = config_from_args(build_parser().parse_args(["train", *flags]))
    validate(cfg)
    prepare_data(cfg)
    launch(cfg)
    return {}


def cluster_of(args: argparse.Namespace, slowdown: float, servers: bool):
    """The harness for a run: node 0 one CPU, node 1 1/F of one; a third node (the server) pinned
    with node 1, taking what it leaves."""
    from paratrain.cluster import Cluster

    quota, pin = {0: 1.0, 1: 1.0 / slowdown}, {0: [0], 1: [1 % len(os.sched_getaffinity(0))]}
    if servers:
        pin[2] = pin[1]
    return Cluster(3 if servers else 2, 1, args.rate, name_prefix="ptbalps" if servers else "ptbal",
                   cpu_quota=quota, pin=pin)


def run_cluster(args: argparse.Namespace, contender: str, slowdown: float, metrics: str) -> dict:
    """One run on the harness (a cluster of its own, torn down after it); node 1's cpu.stat."""
    with cluster_of(args, slowdown, contender == "ps") as cluster:
        run = cluster.run(["train", *train_flags(args, contender, metrics)], timeout=args.timeout)
        stat = cluster.cpu_stat(1)
    if not run.ok:
        print(f"balance.py: {contender} on the cluster failed\n{run.summary()}", file=sys.stderr)
        sys.exit(1)
    throttled_s = stat.get("throttled_usec", stat.get("throttled_time", 0) / 1000) / 1e6
    return {"node1_periods": stat.get("nr_periods"), "node1_throttled": stat.get("nr_throttled"),
            "node1_throttled_s": throttled_s}


def read_run(path: str, warmup: int) -> dict:
    """The figures of one metrics file (see the module)."""
    records = [json.loads(line) for line in open(path) if line.strip()]
    steps = [r for r in records if "event" not in r]
    end = next((r for r in records if r.get("event") == "end"), {})
    timed = steps[warmup:]
    out = {"tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
           "median_tokens_per_s": statistics.median(r["tokens"] / r["step_time_s"] for r in timed),
           "trainer_tokens_per_s": end.get("tokens_per_s"), "final_loss": steps[-1]["loss"], "steps": len(steps),
           "step_s": statistics.median(r["step_time_s"] for r in timed)}
    if timed and timed[0].get("compute_s"):
        out["other_s"] = statistics.median(r["step_time_s"] - max(r["compute_s"]) for r in timed)
        out["compute_s"] = [statistics.median(r["compute_s"][k] for r in timed) for k in range(2)]
    if "shares" in steps[-1]:
        final = steps[-1]["shares"]
        out["shares"] = final
        out["settled_at"] = next(r["step"] for k, r in enumerate(steps) if all(s["shares"] == final for s in steps[k:]))
    if "balance" in end:
        out["balance"] = end["balance"]
    return out


def _tree(pid: int, parent: dict[int, int]) -> set[int]:
    """`pid`, its ancestors and its descendants."""
    up, p = {pid}, pid
    while p in parent and parent[p] not in up:
        p = parent[p]
        up.add(p)
    down, grew = {pid}, True
    while grew:
        kids = {c for c, q in parent.items() if q in down} - down
        grew, down = bool(kids), down | kids
    return up | down


def others() -> list[str]:
    """Python processes of other paratrain runs or tests (not this one's ancestors or children).
    Shells and `flock` waiting for the harness lock this benchmark may hold do not count."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid=,comm=,args="], capture_output=True, text=True).stdout
    parent, found = {}, []
    for line in table.splitlines():
        pid, ppid, comm, cmd = (line.split(None, 3) + [""])[:4]
        parent[int(pid)] = int(ppid)
        if comm.startswith(("python", "pytest", "pt_")) and OTHERS.search(cmd):
            found.append((int(pid), cmd))
    mine = _tree(os.getpid(), parent)
    return [f"{pid} {cmd[:100]}" for pid, cmd in found if pid not in mine]


def wait_quiet(max_wait: float) -> dict:
    """Wait while other runs are there; the seconds waited, the load average, and whether it
    gave up waiting."""
    t0, seen = time.monotonic(), others()
    while seen and time.monotonic() - t0 < max_wait:
        print(f"  waiting for {len(seen)} other process(es): {seen[0]}", flush=True)
        time.sleep(20)
        seen = others()
    return {"waited_s": round(time.monotonic() - t0), "load": os.getloadavg()[0], "disturbed": bool(seen)}


def cases(args: argparse.Namespace, wheres: list[str]) -> list[tuple[str, float, list[str]]]:
    """(where, slowdown, contenders) of each table."""
    out = []
    for where in wheres:
        out.append((where, args.slowdown, args.contenders))
        plain = [c for c in args.contenders if c != "ps"]
        if args.overhead and plain:
            out.append((where, 1.0, plain))
    return out


def measure(args: argparse.Namespace, where: str, slowdown: float, names: list[str], tmp: str) -> dict:
    """Every contender `args.rounds` times (in rotated order); per contender its rounds' figures."""
    runner = run_local if where == "local" else run_cluster
    runs = {c: [] for c in names}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            path = os.path.join(tmp, f"{where}-{slowdown:g}-{name}-{r}.jsonl")
            quiet = wait_quiet(args.max_wait)
            started = time.monotonic()
            extra = runner(args, name, slowdown, path)
            runs[name].append({**read_run(path, args.warmup), **extra, **quiet, "wall_s": time.monotonic() - started})
            x = runs[name][-1]
            print(f"{where}, slowdown {slowdown:g}, round {r + 1}, {name}: {x['tokens_per_s']:,.0f} tokens/s "
                  f"(median step {x['median_tokens_per_s']:,.0f}), final loss {x['final_loss']:.5f}, shares "
                  f"{x.get('shares')}, wall {x['wall_s']:.0f} s, load before {quiet['load']:.2f}"
                  f"{', waited %d s' % quiet['waited_s'] if quiet['waited_s'] else ''}"
                  f"{', DISTURBED' if quiet['disturbed'] else ''}", flush=True)
    return runs


def _med(rs: list[dict], key: str):
    vals = [x[key] for x in rs if x.get(key) is not None]
    return statistics.median(vals) if vals else None


def print_table(where: str, slowdown: float, runs: dict, args: argparse.Namespace) -> None:
    """One case's table: medians over the rounds, and every round's tokens/s."""
    limit = (slowdown + 1) / 2
    how = ("no slowdown" if slowdown == 1 else f"--simulate-slowdown 1:{slowdown:g}" if where == "local" else
           f"node 0 1 CPU, node 1 {1 / slowdown:.2f} CPU (cgroup quota)")
    even = runs.get("even")
    seen = ""
    if even and even[0].get("balance", {}).get("seq_per_s", [None])[-1]:
        ratios = [x["balance"]["seq_per_s"][0] / x["balance"]["seq_per_s"][1] for x in even]
        seen = f"; even measured F' = {statistics.median(ratios):.2f} (limit {(statistics.median(ratios) + 1) / 2:.2f}x)"
    print(f"\n{where}: {args.model}, dp=2, {how}; {args.steps} steps of {args.global_batch} x {args.seq_len} tokens, "
          f"{args.microbatches} micro-batches per replica; steps {args.warmup + 1}..{args.steps} timed, median of "
          f"{args.rounds} rounds; limit {limit:.2f}x even{seen}")
    print(f"{'contender':<9} {'tokens/s':>9} {'median':>8} {'vs even':>8} {'of limit':>8} {'step s':>7} "
          f"{'other s':>7} {'final loss':>10} {'vs even':>9}  rounds (tokens/s); shares")
    base = _med(even, "tokens_per_s") if even else None
    for name, rs in runs.items():
        tps, loss = _med(rs, "tokens_per_s"), _med(rs, "final_loss")
        speed = tps / base if base else float("nan")
        dloss = max((abs(x["final_loss"] - e["final_loss"]) for x, e in zip(rs, even)), default=0) if even else 0
        other = _med(rs, "other_s")
        note = " / ".join(f"{x['tokens_per_s']:,.0f}" for x in rs)
        if name == "dynamic" and "shares" in rs[0]:
            note += "; " + ", ".join(f"{'/'.join(map(str, x['shares']))} from step {x['settled_at']}" for x in rs)
            note += f"; moves {[x.get('balance', {}).get('moves') for x in rs]}"
        if where == "cluster" and rs[0].get("node1_throttled") is not None:
            note += f"; node 1 throttled {_med(rs, 'node1_throttled_s'):.1f} s"
        print(f"{name:<9} {tps:>9,.0f} {_med(rs, 'median_tokens_per_s'):>8,.0f} {speed:>7.3f}x {speed / limit:>7.1%} "
              f"{_med(rs, 'step_s'):>7.3f} {'-' if other is None else f'{other:.3f}':>7} {loss:>10.5f} "
              f"{dloss:>9.2e}  {note}")


def cluster_problem() -> str | None:
    """Why the cluster cases cannot run here, or None."""
    from paratrain.cgroups import CgroupError, cpu_root
    from paratrain.cluster import available

    reason = available()
    if reason:
        return reason
    try:
        cpu_root()
    except CgroupError as e:
        return str(e)
    return None


def main() -> None:
    args = parse()
    wheres = ["local", "cluster"] if args.where == "both" else [args.where]
    if "cluster" in wheres and (reason := cluster_problem()):
        print(f"balance.py: --where cluster: {reason}", file=sys.stderr)
        sys.exit(2)
    started, results = time.monotonic(), []
    with tempfile.TemporaryDirectory() as tmp:
        for where, slowdown, names in cases(args, wheres):
            results.append((where, slowdown, measure(args, where, slowdown, names, tmp)))
    for where, slowdown, runs in results:
        print_table(where, slowdown, runs, args)
    print(f"\nvs even: median tokens/s over even's; final loss vs even: the largest |difference| of a round; "
          f"wall time {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": [{"where": w, "slowdown": s, "runs": r}
                                                       for w, s, r in results]}, fh, indent=1)


if __name__ == "__main__":
    main()
