"""What the planner prices layouts on: GPU presets from vendor datasheets, `cpu-local` and `cpu-cluster`.

A `Hardware` is one device (a GPU, or one local CPU worker process) and the links between
devices. The GPU figures are datasheet numbers, named with their sources next to them. The
`cpu-local` figures are measured on this machine by `paratrain plan --calibrate` (calibrate.py)
and saved as JSON (`cache_path()`: `$PARATRAIN_CACHE/cpu-local.json`, default
`~/.cache/paratrain/`); without that file `cpu-local` uses conservative defaults and says so.
`cpu-cluster` is cpu-local's compute with the links of a cluster on this machine (paratrain.cluster:
namespaces as nodes, rate-limited links) measured by `paratrain plan --calibrate --nodes N`
(`cluster_cache_path()`, `cpu-cluster.json`): loopback gloo inside a node, the node's one link
between nodes, which the node's ranks share.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace

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
    inter_p2p: Link | None = None  # point-to-point between nodes if it differs from `inter` (cpu-cluster)
    # one link per node that its ranks share (cpu-cluster), not one NIC per device (the GPU presets):
    # groups crossing a node's link at once split its bandwidth
    shared_nic: bool = False
    shared_memory: bool = False  # cpu-local: the workers share `memory_bytes`
    calibrated: bool = True
    note: str = ""
    # cpu-local only: measured rates per worker thread count
    cores: int = 0
    gemm: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # threads -> [(flops of one GEMM, FLOP/s)]
    attn: dict[int, list[tuple[float, float]]] = field(default_factory=dict)  # threads -> [(forward flops, FLOP/s)]
    elem: dict[int, dict[str, float]] = field(default_factory=dict)  # threads -> {op: seconds per element}
    efficiency: dict[int, float] = field(default_factory=dict)  # threads -> measured / op-by-op model
    collectives: dict[str, Link] = field(default_factory=dict)  # per-op alpha-beta where they differ
    inter_collectives: dict[str, Link] = field(default_factory=dict)  # the same between nodes (cpu-cluster)
    nodes: int = 0  # cpu-cluster: the nodes of the cluster it was calibrated on (the default of `plan --gpus`)

    # ---------------------------------------------------------------- rates
    def threads(self, world: int) -> int:
        """Threads of one worker: paratrain gives each worker an equal share of the cores among the
        ranks of its node (cpu-local: all of them; cpu-cluster: the node's, though every node runs
        on this machine's cores, which `oversubscription` counts)."""
        return max(1, self.cores // max(1, min(world, self.gpus_per_node))) if self.cores else 1

    def oversubscription(self, world: int, busy: float | None = None) -> float:
        """> 1 when a machine runs more busy threads than it has cores (cpu-local, cpu-cluster);
        `busy`: the workers computing at once, on average (default all `world`: a pipeline's
        bubble leaves some idle, and their cores to the others)."""
        if not self.cores:
            return 1.0
        return max(1.0, (world if busy is None else busy) * self.threads(world) / self.cores)

    def gemm_rate(self, flops: float, world: int = 1, busy: float | None = None) -> float:
        """FLOP/s of a GEMM of `flops` FLOPs as training runs it (forward, gradient of the input,
        gradient of the weight): GPUs a fixed fraction of peak; cpu-local the measured rate at
        that size (log-linear between measured sizes, clamped at the ends)."""
        points = self.gemm.get(self.threads(world)) if self.gemm else None
        if not points:
            return self.peak_flops * self.matmul_efficiency / self.oversubscription(world, busy)
        return _interp_log(points, flops) / self.oversubscription(world, busy)

    def attention_rate(self, forward_flops: float, world: int = 1, busy: float | None = None) -> float:
        """FLOP/s of fused attention (forward and backward) whose forward costs `forward_flops`."""
        points = self.attn.get(self.threads(world)) if self.attn else None
        if not points:
            return self.peak_flops * self.matmul_efficiency / self.oversubscription(world, busy)
        return _interp_log(points, forward_flops) / self.oversubscription(world, busy)

    def elementwise_bw(self, world: int = 1, busy: float | None = None) -> float:
        t = self.threads(world)
        bw = self.elem[t]["bw"] if t in self.elem else self.mem_bw
        return bw / self.oversubscription(world, busy)

    def elementwise_time(self, op: str, n: float, world: int = 1, elem_bytes: int = 4,
                         busy: float | None = None) -> float:
        """Seconds for forward + backward of `op` over n elements (`adamw`: one step over n
        parameters). cpu-local: measured; GPUs: the bytes the op moves at memory bandwidth."""
        t = self.threads(world)
        if t in self.elem and op in self.elem[t]:
            return n * self.elem[t][op] * self.oversubscription(world, busy)
        return n * OP_BYTES[op](elem_bytes) / self.mem_bw


    def local_slowdown(self, world: int = 1) -> float:
        """What a real training step adds to the op-by-op compute model (cpu-local: calibrated)."""
        return 1.0 / self.efficiency.get(self.threads(world), 1.0)

    def link(self, cross_node: bool | int, op: str = "all_reduce") -> Link:
        """The link a collective `op` crosses: the NIC between nodes, else NVLink (or, on
        cpu-local, gloo's measured line for that op). `cross_node`: False inside a node, else the
        groups that cross one node's link at once (True: one); they share it on `shared_nic`."""
        if not cross_node:
            return self.collectives.get(op, self.intra)
        return self._per_flow(self.inter_collectives.get(op, self.inter), cross_node)

    def p2p_link(self, cross_node: bool | int) -> Link:
        if not cross_node:
            return self.p2p or self.intra
        return self._per_flow(self.inter_p2p or self.inter, cross_node)

    def _per_flow(self, link: Link, flows: bool | int) -> Link:
        """One of `flows` transfers through a node's link at once: its share of a shared link."""
        flows = max(1, int(flows))
        return Link(link.alpha, link.beta / flows) if self.shared_nic and flows > 1 else link

    def capacity(self, world: int) -> float:
        """Memory one device (worker) may use."""
        return self.memory_bytes / world if self.shared_memory else self.memory_bytes


# Bytes an op moves per element, forward and backward (memory-bound on a GPU): GELU reads x and
# writes y, then reads x and dy and writes dx; layer norm also reads its statistics; the loss's
# log-softmax runs in fp32; AdamW reads parameter, gradient, two moments and writes three (fp32),
# plus the 16-bit copy under mixed precision.
OP_BYTES = {
    "gelu": lambda e: 5 * e,
    "layer_norm": lambda e: 6 * e,
    "softmax": lambda e: 5 * 4,
    "adamw": lambda e: 28 + (0 if e == 4 else e + 4),
}


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
NAMES = (*GPU_PRESETS, "cpu-local", "cpu-cluster")


# --------------------------------------------------------------------- cpu-local
def cache_path(name: str = "cpu-local") -> str:
    root = os.environ.get("PARATRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "paratrain")
    return os.path.join(root, f"{name}.json")


def cluster_cache_path() -> str:
    return cache_path("cpu-cluster")


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


# Conservative defaults for an uncalibrated machine, per thread (a slow laptop core, a loaded
# loopback): GEMM FLOP/s by GEMM size, attention FLOP/s, seconds per element of the elementwise
# ops (forward + backward), bytes/s of a copy.
DEFAULTS = {
    "gemm": [[1e6, 4e9], [1e9, 12e9]],
    "attn": [[1e6, 2e9], [1e9, 6e9]],
    "elem": {"gelu": 12e-9, "layer_norm": 12e-9, "softmax": 30e-9, "adamw": 12e-9, "bw": 4e9},
    "dispatch_s": 15e-6,
    "collectives": {op: {"alpha": 1e-3, "beta": 0.25 * GB} for op in ("all_reduce", "reduce_scatter", "all_gather",
                                                                      "p2p")},
    "efficiency": {},
    "baseline_bytes": 700 * 2**20,
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
            if data.get("cores") != cores or "threads" not in data or "collectives" not in data:
                note = (f"calibration in {path} does not match this machine ({cores} cores) or this version: "
                        "using conservative defaults; run `paratrain plan --calibrate`")
                data = None
            else:
                calibrated, note = True, f"calibrated {data.get('when', '?')} ({path})"
        except (OSError, ValueError):
            data, note = None, f"calibration file {path} is unreadable: conservative defaults; run `paratrain plan --calibrate`"
    d = data or DEFAULTS
    if data is None:  # the per-thread defaults, for every thread count a worker may get
        threads = {t: {"gemm": [(f, r * t) for f, r in DEFAULTS["gemm"]],
                       "attn": [(f, r * t) for f, r in DEFAULTS["attn"]],
                       "elem": {k: (v * t if k == "bw" else v / t) for k, v in DEFAULTS["elem"].items()}}
                   for t in range(1, cores + 1)}
    else:
        threads = {int(t): {"gemm": [tuple(p) for p in m["gemm"]], "attn": [tuple(p) for p in m["attn"]],
                            "elem": dict(m["elem"])} for t, m in data["threads"].items()}
    best = max((r for m in threads.values() for _, r in m["gemm"]), default=1e9)
    links = {op: Link(float(v["alpha"]), float(v["beta"])) for op, v in d["collectives"].items()}
    ar = links["all_reduce"]
    return Hardware(
        name="cpu-local",
        peak_flops=best,  # the fastest measured GEMM rate: MFU on CPU is relative to it
        matmul_efficiency=1.0,
        memory_bytes=float(d.get("ram_bytes", _ram_bytes())),
        mem_bw=max(m["elem"]["bw"] for m in threads.values()),
        intra=ar,
        inter=ar,  # one machine: no second node
        p2p=links["p2p"],
        collectives={op: link for op, link in links.items() if op != "p2p"},
        efficiency={int(t): float(v) for t, v in d.get("efficiency", {}).items()},
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
        gemm={t: m["gemm"] for t, m in threads.items()},
        attn={t: m["attn"] for t, m in threads.items()},
        elem={t: m["elem"] for t, m in threads.items()},
    )


# An uncalibrated cpu-cluster: nodes of 2 ranks, 1 Gbit/s (125 MB/s) between them with a TCP
# round trip's latency; inside a node, cpu-local's loopback.
CLUSTER_DEFAULTS = {"nodes": 2, "ranks_per_node": 2, "inter": {"alpha": 1e-3, "beta": 0.125 * GB}}
CLUSTER_OPS = ("all_reduce", "reduce_scatter", "all_gather", "p2p")


def _links(measured: dict) -> dict[str, Link]:
    return {op: Link(float(v["alpha"]), float(v["beta"])) for op, v in measured.items()}


def cpu_cluster(path: str | None = None) -> Hardware:
    """cpu-local's compute with the links a cluster on this machine measured (`cluster_cache_path()`):
    loopback gloo inside a node (cpu-local's when the nodes held one rank), and between nodes one
    link per node that its ranks share; and the compute of the cluster's reference step, every rank
    of every node busy on this machine's cores at once, as the framework efficiency at the thread
    count of its workers (for layouts of the calibrated cluster's shape: another world size keeps the
    factor, not the contention it measured). Without the file: CLUSTER_DEFAULTS (`calibrated=False`)."""
    local = cpu_local()
    path = path or cluster_cache_path()
    how = "`paratrain plan --calibrate --nodes 2 --ranks-per-node 2 --rate 1gbit`"
    data, why = None, f"links not measured: assumed 1 Gbit/s between nodes of 2; run {how}"
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                data = json.load(fh)
            if data.get("cores") != local.cores or "links" not in data or "ranks_per_node" not in data:
                data, why = None, f"cluster calibration in {path} is not this machine's or this version's: {why}"
        except (OSError, ValueError):
            data, why = None, f"cluster calibration {path} is unreadable: {why}"
    if data is None:
        links = {"inter": {op: CLUSTER_DEFAULTS["inter"] for op in CLUSTER_OPS}}
        ranks = CLUSTER_DEFAULTS["ranks_per_node"]
    else:
        links, ranks = data["links"], int(data["ranks_per_node"])
        why = (f"links measured on {data['nodes']} nodes x {ranks} ranks at {data.get('rate') or 'no limit'} "
               f"{data.get('when', '?')} ({path})")
    intra = _links(links["intra"]) if "intra" in links else {**local.collectives, "p2p": local.p2p or local.intra}
    inter = _links(links["inter"])
    return replace(
        local, name="cpu-cluster", intra=intra["all_reduce"], p2p=intra["p2p"],
        collectives={op: v for op, v in intra.items() if op != "p2p"},
        inter=inter["all_reduce"], inter_p2p=inter["p2p"],
        inter_collectives={op: v for op, v in inter.items() if op != "p2p"},
        gpus_per_node=ranks, nodes=int((data or CLUSTER_DEFAULTS)["nodes"]), shared_nic=True,
        calibrated=local.calibrated and data is not None,
        efficiency={**local.efficiency, **{int(t): float(v) for t, v in (data or {}).get("efficiency", {}).items()}},
        note=f"{why}; compute: {local.note}")


# Dense bf16 (and fp16) peaks by the name CUDA gives the device (torch.cuda.get_device_name),
# most specific first: the PCIe and NVL H100s run lower clocks than the SXM part of H100_80GB.
GPU_PEAK_BF16 = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", H100_80GB.peak_flops),
                 ("H200", H100_80GB.peak_flops), ("A100", A100_80GB.peak_flops)]


def gpu_peak_flops(device_name: str) -> float | None:
    """The datasheet's dense bf16 FLOP/s of a GPU by its CUDA name, None for one not listed."""
    return next((flops for key, flops in GPU_PEAK_BF16 if key in device_name), None)


def get_hardware(name: str) -> Hardware:
    if name == "cpu-local":
        return cpu_local()
    if name == "cpu-cluster":
        return cpu_cluster()
    if name not in GPU_PRESETS:
        raise ValueError(f"--gpu: unknown hardware {name!r}; choose one of {', '.join(NAMES)}")
    return GPU_PRESETS[name]
