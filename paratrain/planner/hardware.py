"""What the planner prices layouts on: GPU presets from vendor datasheets, and `cpu-local`.

A `Hardware` is one device (a GPU, or one local CPU worker process) and the links between
devices. The GPU figures are datasheet numbers, named with their sources next to them. The
`cpu-local` figures are measured on this machine by `paratrain plan --calibrate`
(`calibrate()`): fp32 GEMM throughput as a function of GEMM size with the threads a worker gets,
elementwise memory bandwidth, the host cost of one eager op, gloo all-reduce and send/receive
latency (alpha) and bandwidth (beta) between two local processes, and the resident memory of a
paratrain worker before it builds a model. The result is saved as JSON (`cache_path()`:
`$PARATRAIN_CACHE/cpu-local.json`, default `~/.cache/paratrain/`) and reused; without it
`cpu-local` uses conservative defaults and says so.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class Link:
    """alpha-beta model of one hop: a message of S bytes takes alpha + S / beta seconds."""
    alpha: float  # seconds per message (latency of one step of a collective)
    beta: float   # bytes per second, one direction, per device


@dataclass
class Hardware:
    name: str
    peak_flops: float          # dense FLOP/s of one device in its compute dtype (bf16 on GPUs, fp32 on CPU)
    matmul_efficiency: float   # fraction of peak_flops that a transformer's GEMMs reach
    memory_bytes: float        # memory of one device (cpu-local: the whole machine, shared by the workers)
    mem_bw: float              # bytes/s for memory-bound (elementwise) work on one device
    intra: Link                # between devices of one node (NVLink; loopback gloo on cpu-local)
    inter: Link                # between nodes (one NIC per GPU)
    gpus_per_node: int
    reserve_bytes: float       # memory that is not the model's: CUDA context and NCCL, or a worker's baseline
    dispatch_s: float          # host time of one eager PyTorch op
    async_dispatch: bool       # a GPU runs kernels while the host queues more; a CPU worker does both in turn
    overlap: bool              # can communication run alongside compute?
    algorithms: tuple[str, ...] = ("ring", "tree")  # all-reduce algorithms the backend picks between
    p2p: Link | None = None    # point-to-point link if it differs from `intra` (cpu-local: measured)
    shared_memory: bool = False  # cpu-local: the workers share `memory_bytes`
    calibrated: bool = True
    note: str = ""
    # cpu-local only: measured rates per worker thread count
    cores: int = 0
    gemm: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # threads -> [(flops of one GEMM, FLOP/s)]
    bw_by_threads: dict[int, float] = field(default_factory=dict)

    # ---------------------------------------------------------------- rates
    def threads(self, world: int) -> int:
        """Threads of one worker: paratrain gives each local worker an equal share of the cores."""
        return max(1, self.cores // max(1, world)) if self.cores else 1

    def oversubscription(self, world: int) -> float:
        """> 1 when a machine runs more busy threads than it has cores (cpu-local only)."""
        if not self.cores:
            return 1.0
        return max(1.0, world * self.threads(world) / self.cores)

    def gemm_rate(self, flops: float, world: int = 1) -> float:
        """FLOP/s of one GEMM of `flops` FLOPs: GPUs a fixed fraction of peak; cpu-local the measured
        rate at that size (log-linear between measured sizes, clamped at the ends)."""
        points = self.gemm.get(self.threads(world)) if self.gemm else None
        if not points:
            return self.peak_flops * self.matmul_efficiency / self.oversubscription(world)
        return _interp_log(points, flops) / self.oversubscription(world)

    def elementwise_bw(self, world: int = 1) -> float:
        bw = self.bw_by_threads.get(self.threads(world), self.mem_bw) if self.bw_by_threads else self.mem_bw
        return bw / self.oversubscription(world)

    def link(self, cross_node: bool) -> Link:
        return self.inter if cross_node else self.intra

    def p2p_link(self, cross_node: bool) -> Link:
        return self.inter if cross_node else (self.p2p or self.intra)

    def capacity(self, world: int) -> float:
        """Memory one device (worker) may use."""
        return self.memory_bytes / world if self.shared_memory else self.memory_bytes


def _interp_log(points: list[tuple[float, float]], x: float) -> float:
    pts = sorted(points)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return math.exp(math.log(y0) + w * (math.log(y1) - math.log(y0)))
    return pts[-1][1]


# --------------------------------------------------------------------- GPU presets
# Sources: NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB) and NVIDIA H100 Tensor Core GPU
# datasheet (SXM5), "dense" figures (the 2x "with sparsity" ones do not apply to training);
# DGX A100 / DGX H100 system guides for the NICs (8 x 200 Gb/s HDR, 8 x 400 Gb/s NDR InfiniBand,
# one per GPU). The NVLink figures are totals over both directions; a ring sends one way, so a
# ring step sees half. NCCL all-reduce bus bandwidth in nccl-tests reaches about 80% of the link
# rate, which the betas below include. GEMM efficiency: large bf16 GEMMs of transformer shapes
# reach about 70% of peak on A100 in Megatron-LM (Narayanan et al. 2021 report 52% MFU end to end
# for GPT-3-size models, bubble and communication included); on an H100 SXM of this project an
# 8192^3 bf16 product ran at 798 TFLOP/s (81% of peak), transformer shapes in eager PyTorch less:
# 0.65 is assumed. Latencies (alpha) are typical NCCL per-step figures, not datasheet numbers.
# Reserve: CUDA context, NCCL buffers and cuBLAS workspace, about 2 GiB.
A100_80GB = Hardware(
    name="a100-80gb",
    peak_flops=312e12,                          # A100 SXM: 312 TFLOP/s bf16 dense
    matmul_efficiency=0.70,
    memory_bytes=80 * GB,                       # 80 GB HBM2e
    mem_bw=2.0e12,                              # 2,039 GB/s HBM2e
    intra=Link(alpha=5e-6, beta=0.8 * 300 * GB),  # NVLink 3: 600 GB/s total, 300 GB/s each way
    inter=Link(alpha=10e-6, beta=0.8 * 25 * GB),  # 8 x 200 Gb/s HDR InfiniBand: 25 GB/s per GPU
    gpus_per_node=8,                            # DGX A100 / HGX A100 8-GPU
    reserve_bytes=2 * GiB,
    dispatch_s=10e-6,
    async_dispatch=True,
    overlap=True,
    note="datasheet figures (A100 SXM4 80GB, DGX A100 networking)",
)

H100_80GB = Hardware(
    name="h100-80gb",
    peak_flops=989e12,                          # H100 SXM: 989 TFLOP/s bf16 dense
    matmul_efficiency=0.65,
    memory_bytes=80 * GB,                       # 80 GB HBM3
    mem_bw=3.35e12,                             # 3.35 TB/s HBM3
    intra=Link(alpha=5e-6, beta=0.8 * 450 * GB),  # NVLink 4: 900 GB/s total, 450 GB/s each way
    inter=Link(alpha=10e-6, beta=0.8 * 50 * GB),  # 8 x 400 Gb/s NDR InfiniBand: 50 GB/s per GPU
    gpus_per_node=8,                            # DGX H100 / HGX H100 8-GPU
    reserve_bytes=2 * GiB,
    dispatch_s=10e-6,
    async_dispatch=True,
    overlap=True,
    note="datasheet figures (H100 SXM5 80GB, DGX H100 networking)",
)

GPU_PRESETS = {h.name: h for h in (A100_80GB, H100_80GB)}
NAMES = (*GPU_PRESETS, "cpu-local")


# --------------------------------------------------------------------- cpu-local
def cache_path() -> str:
    root = os.environ.get("PARATRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "paratrain")
    return os.path.join(root, "cpu-local.json")


def local_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _ram_bytes() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * GiB


# Conservative defaults for an uncalibrated machine (a slow laptop core, a loaded loopback).
DEFAULTS = {
    "gemm": {"1": [[1e6, 5e9], [1e9, 15e9]]},  # FLOP/s per thread: small and large GEMMs
    "bw": {"1": 4e9},
    "dispatch_s": 15e-6,
    "allreduce": {"alpha": 300e-6, "beta": 0.25 * GB},
    "p2p": {"alpha": 300e-6, "beta": 0.25 * GB},
    "baseline_bytes": 450 * 2**20,
}


def cpu_local(path: str | None = None) -> Hardware:
    """cpu-local from the calibration file, or conservative defaults (`calibrated=False`)."""
    cores = local_cores()
    data, calibrated, note = None, False, "not calibrated: conservative defaults; run `paratrain plan --calibrate`"
    path = path or cache_path()
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                data = json.load(fh)
            if data.get("cores") != cores:
                note = (f"calibration in {path} was made with {data.get('cores')} cores, this machine has {cores}: "
                        "using conservative defaults; run `paratrain plan --calibrate`")
                data = None
            else:
                calibrated, note = True, f"calibrated {data.get('when', '?')} ({path})"
        except (OSError, ValueError):
            data, note = None, f"calibration file {path} is unreadable: conservative defaults; run `paratrain plan --calibrate`"
    d = data or DEFAULTS
    if data is None:  # scale the per-thread defaults to every thread count a worker may get
        gemm = {t: [(f, r * t) for f, r in DEFAULTS["gemm"]["1"]] for t in range(1, cores + 1)}
        bw = {t: DEFAULTS["bw"]["1"] * min(t, 2) for t in range(1, cores + 1)}
    else:
        gemm = {int(t): [tuple(p) for p in pts] for t, pts in d["gemm"].items()}
        bw = {int(t): float(v) for t, v in d["bw"].items()}
    best = max((r for pts in gemm.values() for _, r in pts), default=1e9)
    ar, pp = d["allreduce"], d["p2p"]
    return Hardware(
        name="cpu-local",
        peak_flops=best,  # the fastest measured GEMM rate: MFU on CPU is relative to it
        matmul_efficiency=1.0,
        memory_bytes=float(d.get("ram_bytes", _ram_bytes())),
        mem_bw=max(bw.values()),
        intra=Link(float(ar["alpha"]), float(ar["beta"])),
        inter=Link(float(ar["alpha"]), float(ar["beta"])),  # one machine: no second node
        p2p=Link(float(pp["alpha"]), float(pp["beta"])),
        gpus_per_node=10**6,
        reserve_bytes=float(d["baseline_bytes"]),
        dispatch_s=float(d["dispatch_s"]),
        async_dispatch=False,
        # every core runs a compute thread (threads = cores // workers), so gloo's threads
        # take their time from compute: no overlap
        overlap=False,
        algorithms=("ring",),  # gloo's all-reduce is a ring
        shared_memory=True,
        calibrated=calibrated,
        note=note,
        cores=cores,
        gemm=gemm,
        bw_by_threads=bw,
    )


def get_hardware(name: str) -> Hardware:
    if name == "cpu-local":
        return cpu_local()
    if name not in GPU_PRESETS:
        raise ValueError(f"--gpu: unknown hardware {name!r}; choose one of {', '.join(NAMES)}")
    return GPU_PRESETS[name]


# --------------------------------------------------------------------- calibration
def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# GEMM shapes a GPT block runs, from `small`-sized to `gpt2`-sized: tokens x hidden @ hidden x out
GEMM_SHAPES = [(m, k, n) for m in (128, 512, 2048, 4096) for k in (128, 256, 768) for n in (k, 4 * k)]


def measure_compute(threads: int, repeat: int = 5) -> tuple[list[tuple[float, float]], float]:
    """fp32 torch.matmul FLOP/s by GEMM size, and elementwise bandwidth (bytes/s), at `threads`."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        points = []
        for m, k, n in GEMM_SHAPES:
            a, b = torch.randn(m, k), torch.randn(k, n)
            t = _median_time(lambda: torch.matmul(a, b), repeat)
            points.append((2.0 * m * k * n, 2.0 * m * k * n / t))
        x, y = torch.randn(8 * 2**20), torch.randn(8 * 2**20)
        out = torch.empty_like(x)
        t = _median_time(lambda: torch.add(x, y, out=out), repeat)
        bw = 3 * x.numel() * 4 / t  # two reads and a write
    finally:
        torch.set_num_threads(previous)
    return points, bw


def measure_dispatch(repeat: int = 5) -> float:
    """Host seconds per eager op with autograd: a chain of tiny multiplies, forward and backward."""
    import torch

    w = torch.ones(4, requires_grad=True)

    def chain():
        z = w
        for _ in range(200):
            z = z * 1.0001
        z.sum().backward()

    return _median_time(chain, repeat) / 400  # 200 forward ops, about as many backward nodes


def _gloo_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One of two calibration processes: the worker baseline, then all-reduce and send/recv timings."""
    import resource

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    # what every paratrain worker holds before it builds a model: the interpreter, torch and
    # paratrain's modules, the process groups, the optimizer module's lazy imports, the corpus
    from paratrain.data import load_corpus
    from paratrain.mesh import Mesh
    import paratrain.train  # noqa: F401

    Mesh.build(world, 1, 1, device_type="cpu")
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(4))])
    load_corpus("stdlib")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dist.barrier()
    ar = {}
    for s in SIZES:
        t = torch.zeros(max(1, s // 4))

        def once():
            dist.all_reduce(t)
        ar[s] = _median_time(once, 21 if s <= 1 << 20 else 7)
    p2p = {}
    for s in SIZES:
        t = torch.zeros(max(1, s // 4))

        def ping():  # a send and its receipt, then the same back: two messages
            if rank == 0:
                dist.send(t, 1)
                dist.recv(t, 1)
            else:
                dist.recv(t, 0)
                dist.send(t, 0)
        p2p[s] = _median_time(ping, 21 if s <= 1 << 20 else 7) / 2
    peaks = [None] * world
    dist.all_gather_object(peaks, baseline)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"allreduce": ar, "p2p": p2p, "baseline": max(peaks)}, fh)
    dist.destroy_process_group()


SIZES = [4, 1 << 12, 1 << 16, 1 << 18, 1 << 20, 4 << 20, 16 << 20]


def fit_alpha_beta(times: dict[int, float]) -> tuple[float, float]:
    """Least-squares line T(S) = a + slope S through the median times (seconds by bytes); the
    intercept is clamped to the fastest small-message time's range, the slope to be positive."""
    xs, ys = zip(*sorted(times.items()))
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    slope = max(slope, 1e-12)
    small = [y for x, y in zip(xs, ys) if x <= 1 << 16]
    a = min(max(my - slope * mx, min(small) / 2), max(small))
    return a, slope


def measure_gloo() -> dict:
    """Two local gloo processes: ring all-reduce and send/recv alpha and beta, worker baseline."""
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gloo.json")
        mp.spawn(_gloo_worker, args=(2, os.path.join(tmp, "init"), out), nprocs=2)
        with open(out) as fh:
            raw = json.load(fh)
    n = 2
    # ring all-reduce: T(S) = 2(n-1) alpha + 2(n-1)/n S / beta; send: T(S) = alpha + S / beta
    a, slope = fit_alpha_beta({int(k): v for k, v in raw["allreduce"].items()})
    allreduce = {"alpha": a / (2 * (n - 1)), "beta": (2 * (n - 1) / n) / slope}
    a, slope = fit_alpha_beta({int(k): v for k, v in raw["p2p"].items()})
    p2p = {"alpha": a, "beta": 1 / slope}
    return {"allreduce": allreduce, "p2p": p2p, "baseline_bytes": raw["baseline"],
            "raw_allreduce_s": raw["allreduce"], "raw_p2p_s": raw["p2p"]}


def calibrate(path: str | None = None, log=print) -> Hardware:
    """Measure this machine (about half a minute), save the JSON, return the calibrated cpu-local."""
    import torch

    cores = local_cores()
    threads = sorted({max(1, cores // w) for w in (1, 2, 4, 8) if w <= max(cores, 4)})
    gemm, bw = {}, {}
    for t in threads:
        log(f"calibrate: fp32 GEMMs and memory bandwidth with {t} thread(s)")
        gemm[t], bw[t] = measure_compute(t)
    log("calibrate: eager op overhead")
    dispatch = measure_dispatch()
    log("calibrate: gloo all-reduce and send/recv between 2 local processes, worker baseline memory")
    gloo = measure_gloo()
    data = {
        "cores": cores,
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "machine": platform.node(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "ram_bytes": _ram_bytes(),
        "gemm": {str(t): pts for t, pts in gemm.items()},
        "bw": {str(t): v for t, v in bw.items()},
        "dispatch_s": dispatch,
        **gloo,
    }
    path = path or cache_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    hw = cpu_local(path)
    best = {t: max(r for _, r in pts) for t, pts in gemm.items()}
    log(f"calibrate: saved {path}")
    log("  GEMM fp32 peak by threads: " + ", ".join(f"{t}: {r / 1e9:.1f} GFLOP/s" for t, r in best.items())
        + "; elementwise: " + ", ".join(f"{t}: {b / 1e9:.1f} GB/s" for t, b in bw.items()))
    log(f"  eager op {dispatch * 1e6:.1f} us; gloo all-reduce alpha {gloo['allreduce']['alpha'] * 1e6:.0f} us, "
        f"beta {gloo['allreduce']['beta'] / 1e9:.2f} GB/s; send/recv alpha {gloo['p2p']['alpha'] * 1e6:.0f} us, "
        f"beta {gloo['p2p']['beta'] / 1e9:.2f} GB/s; worker baseline {gloo['baseline_bytes'] / 2**20:.0f} MiB")
    return hw
