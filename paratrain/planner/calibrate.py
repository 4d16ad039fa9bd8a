"""`paratrain plan --calibrate`: measure this machine for the `cpu-local` hardware.

Measured, with the threads a paratrain worker gets (cores // workers):
- GEMM FLOP/s by GEMM size, running the three products of a linear layer in training on operands
  cycled over a working set larger than the caches; fused attention FLOP/s; seconds per element
  of GELU, layer norm and log-softmax (forward + backward); AdamW seconds per parameter; copy
  bandwidth; host time of one eager op;
- between two local gloo processes: all-reduce, reduce-scatter, all-gather and send/recv times
  for 4 B to 16 MiB, fitted to alpha-beta lines (gloo implements some collectives on top of
  others, so each gets its own line);
- the peak resident memory of a worker that has loaded everything but a model (interpreter,
  torch, paratrain, process groups, the optimizer's lazy imports, the default corpus);
- a framework efficiency: the op-by-op model leaves out what a real training step adds on a CPU
  (allocating and first-touching fresh activation memory, caches evicted between ops, autograd's
  bookkeeping). A reference GPT (2 layers, hidden 384, 6 heads, batch 8 x 128; a shape of none
  of the presets) is trained for a few steps, alone and as two concurrent workers, and the ratio
  of the model's prediction to the measured time is kept and applied to compute.
Results go to `cache_path()` as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time

from paratrain.planner.hardware import Hardware, _ram_bytes, cache_path, cpu_local, local_cores


def median_time(fn, repeat: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of one call of `fn` over `repeat` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# GEMM shapes (tokens, in, out) of GPT blocks from `tiny` to `gpt2` size, and attention shapes
# (batch, heads, sequence, head size)
GEMM_SHAPES = [(m, k, n) for m in (128, 512, 2048) for k, n in
               ((64, 64), (128, 128), (128, 512), (512, 128), (256, 256), (256, 1024), (1024, 256), (768, 768),
                (768, 3072), (3072, 768))]
ATTN_SHAPES = [(8, 4, 64, 16), (8, 8, 128, 32), (4, 8, 256, 32), (4, 12, 256, 64), (2, 12, 1024, 64)]
SIZES = [4, 1 << 12, 1 << 16, 1 << 18, 1 << 20, 4 << 20, 16 << 20]
REFERENCE = dict(n_layer=2, n_head=6, d_model=384, vocab_size=256, max_seq_len=128)
REFERENCE_BATCH, REFERENCE_SEQ = 8, 128


def _training_gemms(m: int, k: int, n: int):
    """The three products of a linear layer in training (y = x W^T, dx = dy W, dW = dy^T x) on
    operands cycled over a working set larger than the caches, as training touches fresh data."""
    import torch

    sets = max(1, min(8, (16 << 20) // (4 * (m * k + n * k + m * n))))
    ops = [(torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)) for _ in range(sets)]

    def run():
        for x, w, g in ops:
            torch.nn.functional.linear(x, w)
            torch.matmul(g, w)
            torch.matmul(g.t(), x)
    return run, 3 * 2.0 * m * k * n * sets


def measure_compute(threads: int, repeat: int = 5) -> dict:
    """At `threads`: GEMM FLOP/s by size, fused attention FLOP/s (forward + backward, causal),
    seconds per element of GELU, layer norm and log-softmax (forward + backward), seconds per
    parameter of an AdamW step, and copy bandwidth."""
    import torch
    import torch.nn.functional as F

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gemm = []
        for m, k, n in GEMM_SHAPES:
            run, flops = _training_gemms(m, k, n)
            gemm.append((2.0 * m * k * n, flops / median_time(run, repeat if flops < 3e9 else 3)))
        attn = []
        for b, heads, s, hd in ATTN_SHAPES:
            q, k_, v = (torch.randn(b, heads, s, hd, requires_grad=True) for _ in range(3))

            def sdpa():
                F.scaled_dot_product_attention(q, k_, v, is_causal=True).sum().backward()
            fwd = 4.0 * b * heads * s * s * hd
            attn.append((fwd, 3 * fwd / median_time(sdpa, repeat)))
        x = torch.randn(2048, 1024, requires_grad=True)
        gy = torch.randn(2048, 1024)
        elem = {"gelu": median_time(lambda: F.gelu(x, approximate="tanh").backward(gy), repeat) / x.numel()}
        ln = torch.nn.LayerNorm(1024)
        elem["layer_norm"] = median_time(lambda: ln(x).backward(gy), repeat) / x.numel()
        elem["softmax"] = median_time(lambda: F.log_softmax(x, -1).backward(gy), repeat) / x.numel()
        params = [torch.nn.Parameter(torch.randn(512, 512)) for _ in range(8)]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3)
        elem["adamw"] = median_time(opt.step, repeat) / sum(p.numel() for p in params)
        a, b_ = torch.randn(8 * 2**20), torch.randn(8 * 2**20)
        out = torch.empty_like(a)
        elem["bw"] = 3 * a.numel() * 4 / median_time(lambda: torch.add(a, b_, out=out), repeat)
    finally:
        torch.set_num_threads(previous)
    return {"gemm": gemm, "attn": attn, "elem": elem}


def measure_dispatch(repeat: int = 5) -> float:
    """Host seconds per eager op with autograd: a chain of tiny multiplies, forward and backward."""
    import torch

    w = torch.ones(4, requires_grad=True)

    def chain():
        z = w
        for _ in range(200):
            z = z * 1.0001
        z.sum().backward()

    return median_time(chain, repeat) / 400  # 200 forward ops, about as many backward nodes


def reference_step_time(steps: int = 6) -> float:
    """Median seconds of a training step of the reference GPT in this process (its threads as set):
    forward, loss, backward, gradient clipping, AdamW."""
    import torch
    import torch.nn.functional as F

    from paratrain.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**REFERENCE))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, REFERENCE["vocab_size"], (REFERENCE_BATCH, REFERENCE_SEQ + 1))
    tokens = REFERENCE_BATCH * REFERENCE_SEQ

    def step():
        model.zero_grad()
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="sum") / tokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
        opt.step()

    step()
    return median_time(step, steps)


def time_collectives(group, pair: tuple[int, int] | None, sizes: list[int] = SIZES) -> dict[str, dict[int, float]]:
    """Median seconds of all-reduce, reduce-scatter and all-gather over `group` (None: the world),
    and of one send/recv message between the global ranks `pair` (None: none), by bytes of the full
    tensor (all-gather's output, reduce-scatter's input). Every rank of the world calls it at once."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size(group)
    _all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    rank, (a, b) = dist.get_rank(), pair or (-1, -1)
    times: dict[str, dict[int, float]] = {"all_reduce": {}, "reduce_scatter": {}, "all_gather": {}}
    for s in sizes:
        count = max(n, s // 4 // n * n)
        full, shard = torch.zeros(count), torch.zeros(count // n)
        runs = {
            "all_reduce": lambda: dist.all_reduce(full, group=group),
            "reduce_scatter": lambda: _reduce_scatter(shard, full, group=group),
            "all_gather": lambda: _all_gather(full, shard, group=group),
        }
        repeat = 21 if s <= 1 << 20 else 7
        for op, fn in runs.items():
            dist.barrier()  # groups measured side by side start together
            times[op][s] = median_time(fn, repeat)

        def ping():  # a send and its receipt, then the same back: two messages
            if rank == a:
                dist.send(full, b)
                dist.recv(full, b)
            elif rank == b:
                dist.recv(full, a)
                dist.send(full, a)
        if pair:
            dist.barrier()
            times.setdefault("p2p", {})[s] = median_time(ping, repeat) / 2
    return times


def _gloo_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One of the calibration processes: the worker baseline, collective and send/recv timings,
    then the reference step run by all of them at once."""
    import resource

    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, local_cores() // world))  # as launch.threads_per_worker
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # what every paratrain worker holds before it builds a model (importing any paratrain module runs the
    # package's __init__, which loads the Trainer and the strategies)
    from paratrain.data import load_corpus
    from paratrain.mesh import Mesh

    Mesh.build(world, 1, 1, device_type="cpu")
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])
    load_corpus("stdlib")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dist.barrier()
    times = time_collectives(None, (0, 1))
    dist.barrier()
    step = reference_step_time()  # every worker at once, as data-parallel workers compute
    gathered = [None] * world
    dist.all_gather_object(gathered, (baseline, step))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"times": times, "baseline": max(b for b, _ in gathered),
                       "step": max(s for _, s in gathered)}, fh)
    dist.destroy_process_group()


def fit_alpha_beta(times: dict[int, float]) -> tuple[float, float]:
    """Least-squares line T(S) = a + slope S through the median times (seconds by bytes); the
    intercept is clamped to the range of the small-message times, the slope to be positive."""
    xs, ys = zip(*sorted(times.items()))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 1e-12)
    small = [y for x, y in zip(xs, ys) if x <= 1 << 16]
    a = min(max(my - slope * mx, min(small) / 2), max(small))
    return a, slope


def fit_links(times: dict[str, dict], n: int) -> dict[str, dict[str, float]]:
    """Per-step alpha and per-rank beta of each op measured over n ranks (`time_collectives`), by the
    ring convention, S the full tensor: all-reduce 2(n-1) alpha + 2(n-1)/n S / beta, reduce-scatter
    and all-gather (n-1) alpha + (n-1)/n S / beta, send alpha + S / beta."""
    links = {}
    for op, (steps, share) in {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n),
                               "reduce_scatter": (n - 1, (n - 1) / n), "all_gather": (n - 1, (n - 1) / n),
                               "p2p": (1, 1.0)}.items():
        if op not in times:
            continue
        a, slope = fit_alpha_beta({int(k): v for k, v in times[op].items()})
        links[op] = {"alpha": a / steps, "beta": share / slope}
    return links


def measure_gloo(world: int = 2) -> dict:
    """`world` local gloo processes: alpha and beta of each collective and of send/recv, worker
    baseline memory, and the reference step time with `world` workers busy at once."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gloo.json")
        mp.spawn(_gloo_worker, args=(world, os.path.join(tmp, "init"), out), nprocs=world)
        with open(out) as fh:
            raw = json.load(fh)
    return {"collectives": fit_links(raw["times"], world), "baseline_bytes": raw["baseline"],
            "reference_step_s": {str(world): raw["step"]}, "raw_times_s": raw["times"]}


def _reference_prediction(hw: Hardware, workers: int) -> float:
    """What the op-by-op model predicts for the reference step with `workers` busy workers."""
    from dataclasses import replace

    from paratrain.models.gpt import GPTConfig
    from paratrain.planner.cost import Candidate, estimate

    e = estimate(GPTConfig(**REFERENCE), REFERENCE_SEQ, REFERENCE_BATCH * workers, Candidate(dp=workers),
                 replace(hw, efficiency={}))
    return e.compute_s + e.other_s


def calibrate(path: str | None = None, log=print) -> Hardware:
    """Measure this machine (about a minute), save the JSON, return the calibrated cpu-local."""
    import torch

    cores = local_cores()
    # First, while this process is small: a child's peak resident set starts from its parent's
    # resident set when it is spawned (Linux carries ru_maxrss across fork and exec).
    log("calibrate: gloo collectives and send/recv between 2 local processes, worker baseline memory, "
        "reference step on 2 workers")
    gloo = measure_gloo(2)
    threads = sorted({max(1, cores // w) for w in (1, 2, 4, 8) if w <= max(cores, 4)})
    measured = {}
    for t in threads:
        log(f"calibrate: GEMMs, attention, elementwise ops and AdamW with {t} thread(s)")
        measured[t] = measure_compute(t)
    log("calibrate: eager op overhead, reference step on 1 worker")
    dispatch = measure_dispatch()
    previous = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        gloo["reference_step_s"]["1"] = reference_step_time()
    finally:
        torch.set_num_threads(previous)
    data = {
        "cores": cores,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.node(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "ram_bytes": _ram_bytes(),
        "threads": {str(t): m for t, m in measured.items()},
        "dispatch_s": dispatch,
        **gloo,
    }
    path = path or cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    hw = cpu_local(path)
    # framework efficiency per thread count: model / measured for the reference step
    eff = {}
    for workers, seconds in data["reference_step_s"].items():
        t = max(1, cores // int(workers))
        eff[str(t)] = min(1.0, _reference_prediction(hw, int(workers)) / seconds)
    data["efficiency"] = eff
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    hw = cpu_local(path)
    log(f"calibrate: saved {path}")
    for t, m in measured.items():
        e = m["elem"]
        log(f"  {t} thread(s): GEMM {min(r for _, r in m['gemm']) / 1e9:.0f}-{max(r for _, r in m['gemm']) / 1e9:.0f} "
            f"GFLOP/s, attention {min(r for _, r in m['attn']) / 1e9:.0f}-{max(r for _, r in m['attn']) / 1e9:.0f} "
            f"GFLOP/s; per element (fwd+bwd) GELU {e['gelu'] * 1e9:.1f} ns, layer norm {e['layer_norm'] * 1e9:.1f} ns, "
            f"log-softmax {e['softmax'] * 1e9:.1f} ns; AdamW {e['adamw'] * 1e9:.1f} ns/param; copy {e['bw'] / 1e9:.1f} GB/s; "
            f"framework efficiency {eff.get(str(t), 1.0):.2f}")
    c = gloo["collectives"]
    log(f"  eager op {dispatch * 1e6:.1f} us; gloo alpha/beta: " + ", ".join(
        f"{op} {v['alpha'] * 1e6:.0f} us {v['beta'] / 1e9:.2f} GB/s" for op, v in c.items())
        + f"; worker baseline {gloo['baseline_bytes'] / 2**20:.0f} MiB")
    return hw


# --------------------------------------------------------------------- a cluster on this machine
# Up to 4 MiB: tens of milliseconds a message at 1 Gbit/s, enough for the slope (tbf lets the first
# 128 kB of a burst through at the veth's speed, so small messages see the latency, not the rate).
CLUSTER_SIZES = [4, 1 << 12, 1 << 16, 1 << 18, 1 << 20, 4 << 20]
WORKER_SCRIPT = ("import sys\nfrom paratrain.planner.calibrate import cluster_worker\n"
                 "cluster_worker(sys.argv[1], [int(s) for s in sys.argv[2].split(',')], sys.argv[3] == '1')\n")


def cluster_worker(out: str, sizes: list[int], reference: bool = True) -> None:
    """One rank of the cluster calibration, under torchrun in a node of paratrain.cluster (node k holds
    the ranks kR .. kR+R-1): the collectives of every node's ranks side by side over loopback
    ("intra"), of the world (a ring through every node: one transfer at a time on each node's link,
    "inter"), and of the R groups of the ranks with the same local index, side by side ("rails": R
    transfers share each node's link, as dp groups do; no send/recv: pings of two pairs fall out of
    step and stop sharing). Then the reference step of `calibrate`, on every rank at once. Rank 0
    writes the slowest rank's times."""
    import torch
    import torch.distributed as dist

    from paratrain.group import threads_per_worker

    rank, world, R = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"))
    torch.set_num_threads(threads_per_worker(R))
    dist.init_process_group("gloo")
    node, local = divmod(rank, R)
    # every rank creates every group, in the same order
    nodes = [dist.new_group(list(range(k * R, (k + 1) * R))) for k in range(world // R)] if R > 1 else []
    rails = [dist.new_group(list(range(i, world, R))) for i in range(R)] if R > 1 else []
    times = {"inter": time_collectives(None, (0, R), sizes)}
    if R > 1:
        times["intra"] = time_collectives(nodes[node], (node * R, node * R + 1), sizes)
        times["rails"] = time_collectives(rails[local], None, sizes)
    dist.barrier()
    step = reference_step_time() if reference else None  # every rank of every node at once
    gathered = [None] * world
    dist.all_gather_object(gathered, (times, step))
    if rank == 0:
        worst = {kind: {op: {s: max(g[kind][op][s] for g, _ in gathered) for s in by_size}
                        for op, by_size in ops.items()} for kind, ops in times.items()}
        with open(out, "w") as fh:
            json.dump({"times": worst, "reference_step_s": max(s for _, s in gathered) if reference else None}, fh)
    dist.destroy_process_group()


def measure_cluster(nodes: int = 2, ranks_per_node: int = 2, rate: str | None = "1gbit", cluster=None,
                    sizes: list[int] = CLUSTER_SIZES, reference: bool = True, timeout: float = 300) -> dict:
    """Run `cluster_worker` on every rank of `cluster` (or of a new paratrain.cluster.Cluster of
    `nodes` x `ranks_per_node` linked at `rate`); return the alpha-beta lines of "inter", and of
    "intra" and "rails" with more than one rank per node, the raw times and the reference step."""
    import tempfile

    from paratrain.cluster import Cluster

    with tempfile.TemporaryDirectory() as tmp:
        out, script = os.path.join(tmp, "times.json"), os.path.join(tmp, "worker.py")
        with open(script, "w") as fh:
            fh.write(WORKER_SCRIPT)
        argv = [script, out, ",".join(map(str, sizes)), str(int(reference))]
        if cluster is None:
            with Cluster(nodes, ranks_per_node, rate, name_prefix="ptcal") as c:
                result = c.run(argv, module=None, timeout=timeout)
        else:
            result = cluster.run(argv, module=None, timeout=timeout)
        if not result.ok:
            raise RuntimeError(f"cluster calibration failed: {result.summary()}")
        with open(out) as fh:
            raw = json.load(fh)
    if cluster is not None:
        nodes, ranks_per_node, rate = cluster.nodes, cluster.ranks_per_node, cluster.rate
    groups = {"inter": nodes * ranks_per_node, "intra": ranks_per_node, "rails": nodes}
    return {"nodes": nodes, "ranks_per_node": ranks_per_node, "rate": rate,
            "links": {kind: fit_links(t, groups[kind]) for kind, t in raw["times"].items()},
            "raw_times_s": raw["times"], "reference_step_s": raw["reference_step_s"]}


def check_cluster(nodes: int, ranks_per_node: int, rate: str | None) -> None:
    """ValueError (one line) unless a cluster of `nodes` x `ranks_per_node` linked at `rate` can be
    calibrated here: at least 2 nodes, a tc rate, root and the kernel's namespaces. Builds nothing."""
    from paratrain.cluster import Cluster, available

    if nodes < 2 or ranks_per_node < 1:
        raise ValueError(f"--nodes: a cluster calibration needs at least 2 nodes of at least 1 rank, "
                         f"not {nodes} x {ranks_per_node}")
    try:
        Cluster(nodes, ranks_per_node, rate)  # checks the shape and the rate; builds nothing
    except ValueError as e:
        raise ValueError(f"--calibrate --nodes: {e}") from None
    why = available()
    if why:
        raise ValueError(f"--calibrate --nodes: {why}")


def calibrate_cluster(nodes: int = 2, ranks_per_node: int = 2, rate: str | None = "1gbit", path: str | None = None,
                      log=print, cluster=None) -> Hardware:
    """Measure the links of a cluster on this machine (paratrain.cluster; root; well under a minute)
    and save them for `cpu-cluster` (whose compute is cpu-local's); return it. ValueError (one line)
    when no cluster can be built here or the shape is not one."""
    from paratrain.planner.hardware import cluster_cache_path, cpu_cluster

    if cluster is None:
        check_cluster(nodes, ranks_per_node, rate)
    log(f"calibrate: gloo collectives and send/recv inside and between {nodes} nodes of {ranks_per_node} "
        f"rank(s) linked at {rate or 'no limit'}")
    t0 = time.perf_counter()
    data = measure_cluster(nodes, ranks_per_node, rate, cluster=cluster)
    data.update(cores=local_cores(), when=time.strftime("%Y-%m-%d %H:%M"), machine=platform.node(),
                seconds=round(time.perf_counter() - t0, 1),
                load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)
    path = path or cluster_cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    # compute with every rank of every node busy on this machine's cores: measured / op-by-op model
    world, hw = data["nodes"] * data["ranks_per_node"], cpu_cluster(path)
    data["efficiency"] = {str(hw.threads(world)): _reference_prediction(hw, world) / data["reference_step_s"]}
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    log(f"calibrate: saved {path} ({data['seconds']:.0f} s)")
    for kind, links in data["links"].items():
        log(f"  {kind}: " + ", ".join(f"{op} {v['alpha'] * 1e6:.0f} us {v['beta'] / 1e6:.0f} MB/s"
                                      for op, v in links.items()))
    log(f"  reference step on {world} ranks at once: {data['reference_step_s']:.3f} s, "
        + ", ".join(f"compute factor {v:.2f} at {t} thread(s)" for t, v in data["efficiency"].items()))
    return cpu_cluster(path)
