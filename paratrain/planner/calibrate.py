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
    _all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    _reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    times: dict[str, dict[int, float]] = {"all_reduce": {}, "reduce_scatter": {}, "all_gather": {}, "p2p": {}}
    for s in SIZES:  # s: bytes of the full tensor (all_gather's output, reduce_scatter's input)
        n = max(world, s // 4 // world * world)
        full, shard = torch.zeros(n), torch.zeros(n // world)
        runs = {
            "all_reduce": lambda: dist.all_reduce(full),
            "reduce_scatter": lambda: _reduce_scatter(shard, full),
            "all_gather": lambda: _all_gather(full, shard),
        }
        for op, fn in runs.items():
            times[op][s] = median_time(fn, 21 if s <= 1 << 20 else 7)

        def ping():  # a send and its receipt, then the same back: two messages
            if rank == 0:
                dist.send(full, 1)
                dist.recv(full, 1)
            elif rank == 1:
                dist.recv(full, 0)
                dist.send(full, 0)
        times["p2p"][s] = median_time(ping, 21 if s <= 1 << 20 else 7) / 2
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
    n = world
    links = {}
    # ring convention, S the full tensor: all-reduce 2(n-1) alpha + 2(n-1)/n S / beta,
    # reduce-scatter and all-gather (n-1) alpha + (n-1)/n S / beta, send alpha + S / beta
    for op, (steps, share) in {"all_reduce": (2 * (n - 1), 2 * (n - 1) / n),
                               "reduce_scatter": (n - 1, (n - 1) / n), "all_gather": (n - 1, (n - 1) / n),
                               "p2p": (1, 1.0)}.items():
        a, slope = fit_alpha_beta({int(k): v for k, v in raw["times"][op].items()})
        links[op] = {"alpha": a / steps, "beta": share / slope}
    return {"collectives": links, "baseline_bytes": raw["baseline"], "reference_step_s": {str(world): raw["step"]},
            "raw_times_s": raw["times"]}


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
