"""Bus bandwidth of each all-reduce algorithm across nodes, by message size, against the link's limit.

Builds a cluster on one machine (paratrain.cluster: `--nodes` network namespaces of
`--ranks-per-node` ranks, `--rate` tbf links between them) and runs this same file as the worker
under torchrun on every node (`--worker`). Every worker builds the world group's `Hierarchy` with
node_size = LOCAL_WORLD_SIZE, measures the links, then times gloo's own all-reduce (`backend`),
our ring, tree and hierarchical ones, and `auto`, at each size from `--min-kb` to `--max-mb`
(times `--factor`): in each of a number of samples (fewer for big sizes) every algorithm runs once,
in an order rotated by sample, each call started from a barrier and timed on the slowest rank, so
that every algorithm sees the same share of the machine's other load; the median sample is kept.
Bus bandwidth as nccl-tests define it: algbw = S / t times 2(n-1)/n for n ranks, the per-rank
bytes of a bandwidth-optimal all-reduce over its time.

The limit. Traffic inside a node is free here (loopback), so count only the node links: with each
node one party, an all-reduce over N parties moves at least 2(N-1) S bytes between them in all
(each element's N-1 outside contributions must travel to wherever it is first fully summed, and
the sum must reach the N-1 other parties again), so the busiest node sends at least 2(N-1)/N S
through its link (and receives as much: the links are full duplex), which the ring over nodes
attains (Patarasuk & Yuan 2009). The link-bound time is t_min = 2(N-1)/N S / B for a node link of
B bytes/s, and as a bus bandwidth S / t_min * 2(n-1)/n = B (2(n-1)/n) / (2(N-1)/N): 1.5 B for
2 nodes x 2 ranks. gloo's flat ring sends 2(n-1)/n S = 1.5 S through each node link (every ring
step crosses it), so its bus bandwidth is at most B; Horovod's hierarchical scheme sends 2(N-1)/N S,
the limit, plus its steps inside the node.

`auto` is what `paratrain train --allreduce auto` runs (comm/tuning.py): at each size the Tuner
times every candidate on the group before the samples and keeps the fastest; its calls are timed
with the others. Beside it, what the alpha-beta model (`choose("auto", ...)`, the planner's) picks
with links measured in the same run. A link is measured by one-way transfers (send / recv) from rank 0: intra to rank 1
(node 0), inter to the first rank of node 1; alpha is the transfer time at the smallest size, beta
the extra bytes over the extra time at the largest (16 MiB at least). One way, because gloo
carries the two directions between one pair of ranks at about half the rate each (an exchange
between ranks 0 and 2: 59 MB/s each way at 1 Gbit/s, where plain TCP sockets reach 115 MB/s both
ways); the limit takes B from the same measurement.

    python benchmarks/allreduce.py                       # 2 nodes x 2 ranks, 1 Gbit/s, 1 KiB .. 64 MiB
    python benchmarks/allreduce.py --max-mb 16 --size-s 1 --json allreduce.json

Root only (network namespaces). Exit status 1 if the cluster run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time

ALGOS = ("backend", "ring", "tree", "hierarchical", "auto")
FIXED = ALGOS[:-1]
LINK_BYTES = 16 << 20  # beta comes from a transfer at least this large, whatever --max-mb


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--rate", default="1gbit", help="tc rate of every node link")
    p.add_argument("--min-kb", type=float, default=1, help="smallest message, KiB")
    p.add_argument("--max-mb", type=float, default=64, help="largest message, MiB")
    p.add_argument("--factor", type=int, default=4, help="ratio of successive sizes")
    p.add_argument("--size-s", type=float, default=3.0, help="aim for this many seconds per size (sets the samples)")
    p.add_argument("--max-samples", type=int, default=30, help="samples per size and algorithm at most (at least 5)")
    p.add_argument("--timeout", type=float, default=900, help="seconds for the whole cluster run")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)  # inside the cluster: rank 0 writes OUT
    return p.parse_args(argv)


def check(args: argparse.Namespace) -> str | None:
    """One line on what is wrong with the flags, else None."""
    if args.nodes < 2 or args.ranks_per_node < 2:
        return "--nodes and --ranks-per-node: at least 2 each (the hierarchical algorithm needs two levels)"
    if not re.fullmatch(r"\d+(\.\d+)?[kmgt]?(bit|bps)", args.rate):
        return f"--rate: a tc rate such as 1gbit, 100mbit or 125mbps, not {args.rate!r}"
    if args.factor < 2 or args.min_kb <= 0 or args.min_kb * 1024 > args.max_mb * 2**20:
        return "--factor: at least 2; --min-kb: above 0 and at most --max-mb"
    return None


def sizes(args: argparse.Namespace) -> list[int]:
    """Message sizes in bytes, multiples of 4 (fp32 elements)."""
    out, s = [], int(args.min_kb * 1024)
    while s <= args.max_mb * 2**20:
        out.append(s - s % 4)
        s *= args.factor
    return out


def samples_for(nbytes: int, args: argparse.Namespace) -> int:
    """Samples at this size: about `size_s` seconds for all five algorithms at a guessed
    2 ms + S / 80 MB/s per call, between 5 and `max_samples`."""
    return max(5, min(args.max_samples, round(args.size_s / (len(ALGOS) * (2e-3 + nbytes / 8e7)))))


# ------------------------------------------------------------------ inside the cluster
def _slowest(seconds: list[float]) -> list[float]:
    """Elementwise, the largest of every rank's `seconds` (a rank outside a measurement gives 0s)."""
    import torch
    import torch.distributed as dist

    x = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()


def transfer_time(src: int, dst: int, nbytes: int, rounds: int, reps: int) -> float:
    """Seconds to send `nbytes` from rank `src` to rank `dst`, on the slower of the two: the mean
    over `reps` in a row, the best of `rounds` (after one round of warm-up)."""
    import torch
    import torch.distributed as dist

    me = dist.get_rank()
    buf = torch.zeros(nbytes // 4)
    seen = []
    for _ in range(rounds + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps if me in (src, dst) else 0):
            if me == src:
                dist.send(buf, dst)
            else:
                dist.recv(buf, src)
        seen.append((time.perf_counter() - t0) / reps if me in (src, dst) else 0.0)
    return min(_slowest(seen)[1:])


def measure_links(node_size: int, small: int, large: int) -> dict[str, tuple[float, float]]:
    """{"intra": (alpha, beta), "inter": (alpha, beta)}: alpha the time of a one-way transfer of
    `small` bytes, beta the extra bytes over the extra time at `large`."""
    links = {}
    for name, dst in (("intra", 1), ("inter", node_size)):
        t_small = transfer_time(0, dst, small, 5, 10)
        t_large = transfer_time(0, dst, large, 3, 1)
        links[name] = (t_small, (large - small) / max(t_large - t_small, 1e-9))
    return links


def time_size(calls: dict, samples: int) -> dict[str, float]:
    """Median seconds of each of `calls` (name -> function): `samples` rounds that take every call
    once, in an order rotated by round, each call started from a barrier and timed on the slowest
    rank. Interleaving gives every algorithm the same share of the machine's other load."""
    import torch.distributed as dist

    names = list(calls)
    for name in names:
        calls[name]()  # warm-up: first use of this size and algorithm
    seen = {name: [] for name in names}
    for r in range(samples):
        for name in names[r % len(names):] + names[:r % len(names)]:
            dist.barrier()
            t0 = time.perf_counter()
            calls[name]()
            seen[name].append(time.perf_counter() - t0)
    flat = _slowest([x for name in names for x in seen[name]])
    return {name: statistics.median(flat[i * samples:(i + 1) * samples]) for i, name in enumerate(names)}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from paratrain.comm.algorithms import Hierarchy, all_reduce_with, choose
    from paratrain.comm.collectives import CommStats
    from paratrain.comm.tuning import Tuner

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    n, node_size = dist.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"])
    Hierarchy.build(None, node_size)  # the node groups, before any timing
    stats = CommStats(node_size=node_size)
    all_sizes = sizes(args)
    links = measure_links(node_size, all_sizes[0], max(all_sizes[-1], LINK_BYTES))
    times = {a: {} for a in ALGOS}
    chosen, modelled = {}, {}
    tuner = Tuner(dist.group.WORLD, node_size, CommStats())
    for s in all_sizes:
        t = torch.zeros(s // 4)  # zeros stay zeros: no overflow however often they are summed
        chosen[s] = tuner.pick("all_reduce", t)
        modelled[s] = choose("auto", s, n, node_size, links)
        calls = {a: (lambda algo=(chosen[s] if a == "auto" else a): all_reduce_with(t, None, stats, algo, node_size))
                 for a in ALGOS}
        got = time_size(calls, samples_for(s, args))
        stats.reset()
        for a in ALGOS:
            times[a][s] = got[a]
        if dist.get_rank() == 0:
            print(f"{s:>10} B  " + "  ".join(f"{a} {got[a] * 1e3:.2f} ms" for a in ALGOS), flush=True)
    if dist.get_rank() == 0:
        with open(args.worker, "w") as fh:
            json.dump({"n": n, "node_size": node_size, "links": links, "sizes": all_sizes, "chosen": chosen, "modelled": modelled,
                       "times": {a: {str(s): v for s, v in d.items()} for a, d in times.items()}}, fh)
    dist.destroy_process_group()


# ------------------------------------------------------------------ the parent
def busbw(nbytes: int, seconds: float, n: int) -> float:
    """nccl-tests' bus bandwidth, bytes/s."""
    return nbytes / seconds * 2 * (n - 1) / n


def limit_seconds(nbytes: int, nodes: int, beta_inter: float) -> float:
    """The time the node link needs for the bytes that must cross it: 2(N-1)/N S / B."""
    return 2 * (nodes - 1) / nodes * nbytes / beta_inter


def label(nbytes: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


def tc_rate(rate: str) -> float:
    """Bytes/s of a tc rate ("1gbit", "100mbit", "125mbps")."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)", rate)
    value = float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " ")
    return value / 8 if m.group(3) == "bit" else value


def table(res: dict, nodes: int) -> list[dict]:
    """One row per size: bus bandwidths (MB/s), the limit, the ratios. `choice/best` is the time of
    the algorithm auto chose, measured as that fixed choice, over the best fixed choice (how good
    the choice is); `auto/best` times auto's own calls (the choice plus the noise between calls)."""
    n, beta = res["n"], res["links"]["inter"][1]
    rows = []
    for s in res["sizes"]:
        t = {a: res["times"][a][str(s)] for a in ALGOS}
        best, pick = min(FIXED, key=t.get), res["chosen"][str(s)]
        lim = limit_seconds(s, nodes, beta)
        rows.append({"bytes": s, "busbw_MBps": {a: busbw(s, t[a], n) / 1e6 for a in ALGOS},
                     "seconds": t, "limit_MBps": busbw(s, lim, n) / 1e6,
                     "hier_vs_limit": lim / t["hierarchical"], "hier_vs_gloo": t["backend"] / t["hierarchical"],
                     "auto_chose": pick, "best_fixed": best, "choice_vs_best": t[pick] / t[best],
                     "auto_vs_best": t["auto"] / t[best], "model_chooses": res["modelled"][str(s)],
                     "model_vs_best": t[res["modelled"][str(s)]] / t[best]})
    return rows


def print_table(rows: list[dict], res: dict, args: argparse.Namespace) -> None:
    (ai, bi), (ax, bx) = res["links"]["intra"], res["links"]["inter"]
    nominal = tc_rate(args.rate)
    print(f"\n{args.nodes} nodes x {args.ranks_per_node} ranks, tbf {args.rate} ({nominal / 1e6:,.0f} MB/s); links "
          f"measured (one-way send/recv): intra alpha {ai * 1e6:.0f} us, beta {bi / 1e6:,.0f} MB/s; "
          f"inter alpha {ax * 1e6:.0f} us, beta {bx / 1e6:,.1f} MB/s ({bx * 8 / 1e9:.3f} Gbit/s)")
    print("bus bandwidth in MB/s, median sample; limit: 2(N-1)/N S through the measured inter link")
    print(f"{'size':>9} " + " ".join(f"{a:>12}" for a in ALGOS) + f" {'limit':>8} {'hier/limit':>10} "
          f"{'hier/gloo':>9} {'auto chose':>12} {'best fixed':>12} {'choice/best':>11} {'auto/best':>9}")
    for r in rows:
        bw = r["busbw_MBps"]
        print(f"{label(r['bytes']):>9} " + " ".join(f"{bw[a]:>12.1f}" for a in ALGOS)
              + f" {r['limit_MBps']:>8.1f} {r['hier_vs_limit']:>10.2f} {r['hier_vs_gloo']:>8.2f}x"
              f" {r['auto_chose']:>12} {r['best_fixed']:>12} {r['choice_vs_best']:>11.3f} {r['auto_vs_best']:>9.3f}")
    big = rows[-1]
    nominal_ratio = busbw(big["bytes"], limit_seconds(big["bytes"], args.nodes, nominal), res["n"]) / 1e6
    print(f"\nlargest size ({label(big['bytes'])}): hierarchical at {big['hier_vs_limit']:.0%} of the limit "
          f"(goal >= 85%; {big['busbw_MBps']['hierarchical'] / nominal_ratio:.0%} of the limit at the nominal rate), "
          f"{big['hier_vs_gloo']:.2f}x gloo (goal >= 1.3x)")
    print(f"auto against the best fixed choice, worst size: choice {max(r['choice_vs_best'] for r in rows) - 1:+.1%}, "
          f"auto's own calls {max(r['auto_vs_best'] for r in rows) - 1:+.1%} (goal <= +5%)")
    picks = [f"{r['model_chooses']} at {label(r['bytes'])} ({r['model_vs_best']:.2f}x best)" for r in rows]
    print(f"the alpha-beta model with the measured links (the planner's) would choose: {', '.join(picks)}")


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    from paratrain.cluster import Cluster, available

    reason = check(args) or available()
    if reason:
        print(f"allreduce.py: {reason}", file=sys.stderr)
        sys.exit(2)
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp, Cluster(args.nodes, args.ranks_per_node, args.rate,
                                                      name_prefix="ptbench") as cluster:
        out = os.path.join(tmp, "result.json")
        forwarded = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k in ("min_kb", "max_mb", "factor", "size_s", "max_samples")]
        run = cluster.run([os.path.abspath(__file__), "--worker", out, *forwarded], timeout=args.timeout, module=None)
        if not run.ok:
            print(run.summary(), file=sys.stderr)
            sys.exit(1)
        print(run.nodes[0].stdout, end="")
        with open(out) as fh:
            res = json.load(fh)
    rows = table(res, args.nodes)
    print_table(rows, res, args)
    print(f"wall time {time.monotonic() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "links": res["links"], "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
