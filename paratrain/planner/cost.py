"""Cost model of one training step of a GPT or a Llama in one layout: FLOPs, memory per device, time.

Pure functions: nothing here starts a process or touches a device. Notation: L layers, h hidden,
a heads, V vocabulary, T (or s) sequence length, b micro-batch size, t = tp, p = pp, d = dp,
m micro-batches, v model chunks per pipeline rank, e bytes per element of the compute dtype;
g = n_kv_head x head_dim (k's and v's width: grouped-query attention), f = d_mlp (GPT: g = h, f = 4h).

FLOPs (Kaplan et al. 2020; Narayanan et al. 2021, appendix A). A token's forward pass costs two
FLOPs (multiply and add) per weight that takes part in a matrix product,
N = 12 L h^2 + V h (per block q, k, v and the projection 4h^2, the MLP 8h^2; the output head Vh;
biases, norms and the position table do no matmul work; a Llama block has 2h^2 + 2hg + 3hf: q
and the output h x h, k and v h x g, the gated MLP's gate, up and down h x f), plus the attention
scores and the weighted sum of values, 2 x 2Th per layer (all n_head query heads: kv sharing
saves no score). Backward costs twice the forward. So per token
    6 N + 12 L T h,
and activation checkpointing recomputes the blocks' forward: + 24 L h^2 + 4 L T h. Causal
attention could skip half of the scores; like Megatron-LM we count them all. Element-wise work
(GELU, SiLU and the gate's product, RoPE, norms) counts in time, not in these FLOPs.

Memory per device = reserve (CUDA context and NCCL; on cpu-local the measured worker baseline)
+ model states + activations + buffers.
- Model states for the P parameters a rank holds (after tp and pp), over d data-parallel ranks,
  as `parallel/zero.py` implements them. fp32: parameters 4, gradients 4, Adam moments 8 bytes per
  parameter; mixed precision: 2 + 2 + 12 (fp32 master copy and moments). ZeRO stage 1 shards the
  optimizer's part, stage 2 also the gradients, stage 3 everything: mixed 16P, 2P + 2P + 12P/d,
  2P + 16P/d, 16P/d (Rajbhandari et al. 2020, whose stage 2 has 14P/d, a 2-byte gradient shard;
  ours is fp32, the reduction's dtype, as FSDP2's and Megatron's; stage 3 keeps no 2-byte
  parameter shard, it gathers the fp32 master cast on the way).
- Activations kept for backward, per layer and micro-batch, counted tensor by tensor as
  Korthikanti et al. 2022 do, for this codebase's block. Korthikanti's 16-bit total is
  sbh(34 + 5as/h) bytes: 16 tensors of sbh 2-byte elements (32), two dropout masks (2), and the
  unfused attention's scores, softmax and dropout (5as/h). Here dropout is 0 (paratrain's
  default: no masks) and attention runs through scaled_dot_product_attention's fused kernels,
  which keep no s x s matrix (only a per-row log-sum-exp). So, in e-byte elements:
      no tp:                     e s b h * 16   (for any block: 4 + the sharded count a below)
      tp (Megatron):             e s b h * (4 + 12/t)   (Korthikanti's 10 + 24/t without masks:
                                                          the norms' inputs and the column-parallel
                                                          linears' inputs are replicated)
      tp + sequence parallel:    e s b h * (2 + 14/t)   (Korthikanti: 16/t; our column-parallel
                                                          linears keep their all-gathered input
                                                          instead of gathering it again in backward)
      checkpointing (per layer): e s b h [/ t with sequence parallelism]: the block's input,
                                 plus one layer recomputed at a time.
  Of the 16, a = 12 are sharded by tp: q, k, v (3), the attention output (1), the MLP's two
  4h-wide tensors (8); a Llama block keeps q and k after RoPE and v (1 + 2g/h: sdpa shares the kv
  heads, enable_gqa) and four f-wide ones (gate, up, SiLU(gate), the product): a = 2 + 2g/h + 4f/h.
  For fp32, e = 4 doubles every term of the 16-bit formula. The output layer keeps its fp32
  log-softmax (4 s b V / t) and backward briefly holds the fp32 gradient and the logits.
  A pipeline rank holds `peak_in_flight` micro-batches at once (from the schedule's real table).
- Buffers: ZeRO-3's gathered units (the current one and the prefetched next), fp32 flat
  gradients of one unit while it is reduced, tensor-parallel all-reduce copies.

Time per step (the busiest rank): compute = the block's GEMMs (forward, input gradient, weight
gradient) at the hardware's rate for GEMMs of that size, fused attention at its rate, GELU (SiLU),
layer norm (RMSNorm), log-softmax and AdamW per element, residual adds, the gate's product and RoPE
at copy bandwidth, and host dispatch per eager op (a GPU runs ahead of the host, so dispatch only
shows when it exceeds the GPU's time);
on cpu-local all of these are measured, and a calibrated framework efficiency covers what a real
step adds to the sum of its ops. Tensor-parallel collectives are on the critical path (2
all-reduces forward and 2 backward per block; reduce-scatter + all-gather with sequence
parallelism). A pipeline adds one blocking receive per action and the schedule's bubble
(`bubble_fraction` of the real table). Data-parallel traffic follows the implementation:
`DataParallel` (fp32, ZeRO 0) overlaps its bucketed all-reduce with the last micro-batch's
backward; ZeroDataParallel reduces (and stage 1/2 all-gathers) one flat group at a time after
backward, exposed; stage 2 reduce-scatters each micro-batch during backward; stage 3 gathers each
unit ahead of use (prefetch) and reduce-scatters during backward, every micro-batch. Each call is
priced by an alpha-beta model on the link its group crosses (NVLink inside a node, the NIC
between nodes; ranks are laid out pp x dp x tp with tp fastest; on cpu-local gloo's measured line
for that collective): ring, or the cheaper of ring and tree for all-reduce where the backend has
both (NCCL), ring only on gloo; groups that cross a node's shared link at once split it. The
data-parallel all-reduce may instead be one of our own (`Candidate.allreduce`: ring, tree,
hierarchical, or auto's cheapest), priced by comm/algorithms.py's model (`dp_all_reduce_time`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from paratrain.layout import LayoutConfig, format_layout
from paratrain.models.gpt import GPTConfig
# The pricing of collectives and the pipeline's structure have modules of their own; their names stay
# importable from here.
from paratrain.planner.collectives import (  # noqa: F401
    all_reduce_time,
    axis_node_size,
    collective_time,
    crosses_node,
    dp_all_reduce_time,
    node_flows,
    p2p_time,
    ring_time,
    tree_all_reduce_time,
)
from paratrain.planner.counts import (  # noqa: F401
    block_vectors,
    activation_bytes_per_layer,
    block_params,
    checkpointed_bytes_per_layer,
    flops_per_token,
    matmul_params,
    model_state_bytes,
    pad_vocab,
    param_count,
    rank_params,
    sharded_activations,
)
from paratrain.planner.hardware import Hardware
from paratrain.planner.pipeline import TABLE_LIMIT, RankStages, schedule_info, stage_plan  # noqa: F401

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BUCKET_BYTES = 25 * 2**20  # DataParallel's default gradient bucket

# Eager ops a rank dispatches (counted from models/gpt.py and autograd's nodes, approximate)
OPS_BLOCK_FWD, OPS_BLOCK_BWD = 25, 50
OPS_HEAD_FWD, OPS_HEAD_BWD = 10, 15
OPS_ADAMW_PER_TENSOR = 12  # torch's single-tensor AdamW
OPS_CLIP_PER_TENSOR = 4


@dataclass(frozen=True)
class Candidate:
    """One layout and the settings that change its cost."""
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    schedule: str = "1f1b"
    microbatches: int = 1
    sequence_parallel: bool = False
    activation_checkpointing: bool = False
    precision: str = "fp32"
    virtual_stages: int = 2
    allreduce: str = "backend"  # the data-parallel all-reduce: backend, ring, tree, hierarchical or auto

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def v(self) -> int:
        return self.virtual_stages if self.pp > 1 and self.schedule == "interleaved" else 1

    def layout(self) -> LayoutConfig:
        return LayoutConfig(dp=self.dp, tp=self.tp, pp=self.pp, zero=self.zero, schedule=self.schedule,
                            microbatches=self.microbatches, sequence_parallel=self.sequence_parallel,
                            virtual_stages=self.virtual_stages)

    @property
    def label(self) -> str:
        return format_layout(self.layout())


# --------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    candidate: Candidate
    micro_batch: int
    step_time_s: float = 0.0
    compute_s: float = 0.0   # forward + backward (+ recompute), busiest rank, no waiting
    tp_comm_s: float = 0.0   # tensor-parallel collectives (critical path)
    pp_comm_s: float = 0.0   # pipeline receives (critical path)
    dp_comm_s: float = 0.0   # data-parallel / ZeRO communication not hidden behind compute
    bubble_s: float = 0.0
    bubble_fraction: float = 0.0
    other_s: float = 0.0     # optimizer, gradient clipping, zeroing gradients
    flops_per_step: float = 0.0  # model FLOPs (without recomputation)
    tflops_per_gpu: float = 0.0
    mfu: float = 0.0
    memory: dict[str, float] = field(default_factory=dict)
    peak_mem_bytes: float = 0.0
    capacity_bytes: float = 0.0
    fits: bool = True
    reason: str = ""
    allreduce: str = "backend"  # the data-parallel all-reduce run (auto: the one it picks)

    def as_dict(self) -> dict:
        c = self.candidate
        return {
            "layout": c.label, "dp": c.dp, "tp": c.tp, "pp": c.pp, "zero": c.zero,
            "microbatches": c.microbatches, "micro_batch_size": self.micro_batch,
            "schedule": c.schedule if c.pp > 1 else "none", "virtual_stages": c.v,
            "sequence_parallel": c.sequence_parallel, "activation_checkpointing": c.activation_checkpointing,
            "precision": c.precision, "step_time_s": self.step_time_s, "tflops_per_gpu": self.tflops_per_gpu,
            "mfu": self.mfu, "peak_mem_bytes": int(self.peak_mem_bytes), "capacity_bytes": int(self.capacity_bytes),
            "fits": self.fits, "reason": self.reason, "allreduce": self.allreduce,
            "bubble_fraction": self.bubble_fraction,
            "time_breakdown_s": {k: getattr(self, k) for k in
                                 ("compute_s", "tp_comm_s", "pp_comm_s", "dp_comm_s", "bubble_s", "other_s")},
            "memory_breakdown_bytes": {k: int(v) for k, v in self.memory.items()},
        }


def _host_and_device(hw: Hardware, device_s: float, ops: float) -> float:
    """A GPU runs kernels while the host queues the next ones; a CPU worker does both in turn."""
    host = ops * hw.dispatch_s
    return max(device_s, host) if hw.async_dispatch else device_s + host


@dataclass(frozen=True)
class _Step:
    """What the parts of one estimate share: the model, the layout, the micro-batch, the hardware."""
    cfg: GPTConfig
    c: Candidate
    hw: Hardware
    s: int                  # sequence length
    b: int                  # micro-batch size (sequences)
    e: int                  # bytes per element of the compute dtype
    cross: dict[str, int]   # per mesh axis: its groups that share a node's link (0: none spans two nodes)
    G: int                  # devices per node

    @property
    def tokens(self) -> int:
        """M, the tokens of one micro-batch."""
        return self.b * self.s

    @property
    def sp(self) -> bool:
        return self.c.sequence_parallel and self.c.tp > 1

    def coll(self, op: str, full_bytes: float, n: int, axis: str, calls: int = 1) -> float:
        """`calls` collectives on the link that a group along `axis` crosses."""
        return collective_time(op, full_bytes, n, self.hw.link(self.cross[axis], op), calls, self.hw.algorithms)

    def dp_all_reduce(self, nbytes: float, calls: int) -> tuple[float, str]:
        """(seconds, algorithm) of the data-parallel gradient all-reduce by the candidate's `allreduce`."""
        c = self.c
        node_size = axis_node_size(c.dp, c.tp, c.pp, "dp", self.G) if self.cross["dp"] else None
        return dp_all_reduce_time(c.allreduce, nbytes, c.dp, calls, self.hw, self.cross["dp"], node_size)

    def ew(self, op: str, n: float) -> float:
        return self.hw.elementwise_time(op, n, world=self.c.world, elem_bytes=self.e)


def _compute_times(st: _Step) -> tuple[float, float, float, float]:
    """Seconds of one block and of the head on one micro-batch: (block forward, block backward,
    head forward, head backward); backward is two thirds of the work, plus the recomputed forward."""
    hw, world, t, e, M, sp = st.hw, st.c.world, st.c.tp, st.e, st.tokens, st.sp
    cfg, s = st.cfg, st.s
    h, V, dm, g = cfg.d_model, cfg.vocab_size, cfg.d_mlp, cfg.n_kv_head * (cfg.d_model // cfg.n_head)
    bw = hw.elementwise_bw(world)
    mlp = (2 * M * h * dm / t,) * (3 if cfg.gated_mlp else 2)  # fc, proj (gate, up, down)
    gemms = (2 * M * h * h / t, 2 * M * h * g / t, 2 * M * h * g / t, 2 * M * h * h / t) + mlp  # q, k, v, proj
    attn = 4 * st.b * s * s * h / t  # scores and weighted values, forward
    block = (sum(3 * f / hw.gemm_rate(f, world) for f in gemms)  # forward, d input, d weight
             + 3 * attn / hw.attention_rate(attn, world)
             + st.ew("gelu", M * dm / t) + st.ew("layer_norm", 2 * M * h / (t if sp else 1))
             + 3 * e * M * h * 6 / (t if sp else 1) / bw)  # the two residual adds
    if not cfg.learned_positions:  # RoPE on q and k: two products, a sum and the half rotation, 8 passes
        block += 3 * e * M * (h + g) * 8 / t / bw
    if cfg.gated_mlp:  # SiLU(gate) * up: reads two, writes one
        block += 3 * e * M * dm * 3 / t / bw
    block_f, block_b = block / 3, 2 * block / 3
    if st.c.activation_checkpointing:
        block_b += block_f
    head_gemm = 2 * M * h * V / t
    head = (3 * head_gemm / hw.gemm_rate(head_gemm, world) + st.ew("softmax", M * V / t)
            + (2 * (e + 4) * M * V / t / bw if e != 4 else 0.0) + st.ew("layer_norm", M * h / (t if sp else 1)))
    return block_f, block_b, head / 3, 2 * head / 3


def _tp_times(st: _Step) -> tuple[float, float]:
    """Tensor-parallel exchanges on one micro-batch: one of the activations (an all-reduce, or with
    sequence parallelism a reduce-scatter and an all-gather), and the vocab-parallel loss's max and sums."""
    t, M = st.c.tp, st.tokens
    if t == 1:
        return 0.0, 0.0
    act = st.e * M * st.cfg.d_model
    tp_pair = (st.coll("reduce_scatter", act, t, "tp") + st.coll("all_gather", act, t, "tp")) if st.sp \
        else st.coll("all_reduce", act, t, "tp")
    return tp_pair, st.coll("all_reduce", 12 * M, t, "tp", calls=2)


def _rank_times(st: _Step, stages: tuple[RankStages, ...]) -> list[tuple[RankStages, float, float, float, float]]:
    """Per pipeline rank and micro-batch: (stages, compute forward, compute backward, tp forward,
    tp backward), compute with its host dispatch."""
    block_f, block_b, head_f, head_b = _compute_times(st)
    tp_pair, tp_small = _tp_times(st)
    hw, ac = st.hw, st.c.activation_checkpointing
    slow = hw.local_slowdown(st.c.world)
    per_rank = []
    for r in stages:
        ops_f = r.blocks * OPS_BLOCK_FWD + (OPS_HEAD_FWD if r.last else 0)
        ops_b = r.blocks * (OPS_BLOCK_BWD + (OPS_BLOCK_FWD if ac else 0)) + (OPS_HEAD_BWD if r.last else 0)
        tf = slow * _host_and_device(hw, r.blocks * block_f + (head_f if r.last else 0.0), ops_f)
        tb = slow * _host_and_device(hw, r.blocks * block_b + (head_b if r.last else 0.0), ops_b)
        comm_f = r.blocks * 2 * tp_pair + (tp_pair if r.first else 0.0) + (tp_small if r.last else 0.0)
        comm_b = r.blocks * (4 if ac else 2) * tp_pair + (tp_pair if r.last else 0.0)
        per_rank.append((r, tf, tb, comm_f, comm_b))
    return per_rank


def _zero_groups(st: _Step, r: RankStages) -> int:
    """ZeRO's flat groups on a rank: per unit (a block, or the rest) one per (weight decay,
    parallel flags) combination: 2 without tp, 3 with (sharded and replicated biases), 4 with SP."""
    return (r.blocks + 1) * (2 + (st.c.tp > 1) + st.sp)


def _zero_inner(st: _Step, r: RankStages, tf: float, tb: float) -> tuple[float, float]:
    """ZeRO traffic inside the micro-batch loop (stages 2 and 3) on one rank and micro-batch, forward
    and backward: what compute does not hide."""
    c, d = st.c, st.c.dp
    if d == 1 or c.zero < 2:
        return 0.0, 0.0
    n, k = rank_params(st.cfg, r.blocks, r.first, r.last, c.tp, c.pp), _zero_groups(st, r)
    rs = st.coll("reduce_scatter", 4 * n, d, "dp", k)  # reductions run in fp32
    ag = st.coll("all_gather", st.e * n, d, "dp", k) if c.zero == 3 else 0.0

    def exposed(comm: float, window: float) -> float:  # the first unit's collective cannot hide
        return comm if not st.hw.overlap else max(comm / (r.blocks + 1), comm - window)
    return exposed(ag, tf), exposed(rs + ag, tb)


def _pipeline_time(st: _Step, per_rank: list, est: Estimate) -> tuple[float, float]:
    """The micro-batch loop of the busiest rank, bubble included: (its seconds, the ZeRO traffic in
    it); fills the compute, tp, pp and bubble parts of `est`."""
    c, p, m, v = st.c, st.c.pp, st.c.microbatches, st.c.v
    p2p = p2p_time(st.e * st.b * (st.s // c.tp if st.sp else st.s) * st.cfg.d_model,
                   st.hw.p2p_link(st.cross["pp"])) if p > 1 else 0.0
    busiest = max(per_rank, key=lambda x: x[1] + x[2] + x[3] + x[4] + sum(_zero_inner(st, x[0], x[1], x[2])))
    r0, tf, tb, comm_f, comm_b = busiest
    zf, zb = _zero_inner(st, r0, tf, tb)
    act_f = (tf + comm_f + zf) / v + p2p
    act_b = (tb + comm_b + zb) / v + p2p
    bubble, _, _ = schedule_info(c.schedule, p, m, v)
    busy = m * v * (act_f + act_b)
    pipe = busy / (1 - bubble) if p > 1 else busy
    est.compute_s = m * (tf + tb)
    est.tp_comm_s = m * (comm_f + comm_b)
    est.pp_comm_s = 2 * m * v * p2p
    est.bubble_s, est.bubble_fraction = pipe - busy, bubble
    return pipe, m * (zf + zb)


def _gradient_sync_time(st: _Step, r: RankStages, tb_rank: float) -> tuple[float, str]:
    """After the micro-batches, on one rank: the data-parallel reduction and ZeRO's all-gather not
    hidden behind backward, the tied embedding's two copies, and sequence-parallel gradients; and
    the all-reduce algorithm the reduction runs."""
    cfg, c = st.cfg, st.c
    t, p, d, e = c.tp, c.pp, c.dp, st.e
    n, k = rank_params(cfg, r.blocks, r.first, r.last, t, p), _zero_groups(st, r)
    grad = 4 * n
    dp_s, algorithm = 0.0, "backend" if c.zero or d == 1 else c.allreduce
    if d > 1:
        if c.zero == 0 and c.precision == "fp32":  # DataParallel: buckets overlap the last backward
            comm, algorithm = st.dp_all_reduce(grad, math.ceil(grad / BUCKET_BYTES))
            window = tb_rank / c.v
            dp_s = comm if not st.hw.overlap else max(comm * min(1.0, BUCKET_BYTES / grad), comm - window)
        elif c.zero == 0:
            dp_s, algorithm = st.dp_all_reduce(grad, k)
        elif c.zero == 1:
            dp_s = st.coll("reduce_scatter", grad, d, "dp", k)
        if c.zero in (1, 2):
            dp_s += st.coll("all_gather", e * n, d, "dp", k)
    if p > 1 and cfg.tie_embeddings and (r.first or r.last):  # the tied embedding's two copies
        dp_s += st.coll("all_reduce", 4 * cfg.vocab_size * cfg.d_model / t, 2, "pp")
    if st.sp:  # the norms' and row biases' gradients, summed over tp
        dp_s += st.coll("all_reduce", 4 * block_vectors(cfg)[1] * r.blocks, t, "tp")
    return dp_s, algorithm


def _optimizer_time(st: _Step, r: RankStages) -> float:
    """After the micro-batches, on one rank: AdamW on the parameters it owns, gradient clipping
    (with the norm's all-reduces) and zeroing the gradients."""
    hw, c, e = st.hw, st.c, st.e
    n = rank_params(st.cfg, r.blocks, r.first, r.last, c.tp, c.pp)
    owned = n / c.dp if c.zero >= 1 else n
    zero_engine = c.zero > 0 or c.precision != "fp32"
    tensors = 3 * (r.blocks + 1) if zero_engine else 16 * r.blocks + 4
    # clipping reads the gradients, zeroing writes them; the ZeRO engine copies gradients into
    # flat fp32 buffers and the masters out again
    copies = owned * 4 + n * e + (8 * owned + (4 + e) * n if zero_engine else 0)
    # torch's AdamW runs one tensor at a time on CPU, and over all tensors at once (foreach) on a GPU
    adamw_ops = OPS_ADAMW_PER_TENSOR * (2 if hw.async_dispatch else tensors)
    ops = adamw_ops + tensors * (OPS_CLIP_PER_TENSOR + 1)
    slow, bw = hw.local_slowdown(c.world), hw.elementwise_bw(c.world)
    other = slow * _host_and_device(hw, st.ew("adamw", owned) + copies / bw, ops)
    # the gradient norm: partial sums all-reduced over dp (ZeRO shards), tp and pp
    for axis, n_ in (("dp", c.dp if c.zero else 1), ("tp", c.tp), ("pp", c.pp)):
        other += st.coll("all_reduce", 8, n_, axis)
    return other


def _peak_memory(st: _Step, stages: tuple[RankStages, ...]) -> tuple[float, dict[str, float]]:
    """(bytes, breakdown) of the pipeline rank that needs the most memory (see the module docstring)."""
    cfg, c, e, M, sp = st.cfg, st.c, st.e, st.tokens, st.sp
    t, p, d, ac = c.tp, c.pp, c.dp, c.activation_checkpointing
    s, b, h, V = st.s, st.b, cfg.d_model, cfg.vocab_size
    _, in_flight, head_in_flight = schedule_info(c.schedule, p, c.microbatches, c.v)
    per_layer = activation_bytes_per_layer(s, b, h, t, sp, e, sharded_activations(cfg))
    kept = checkpointed_bytes_per_layer(s, b, h, t, sp, e) if ac else per_layer
    boundary = 2 * e * b * (s // t if sp else s) * h if p > 1 else 0.0
    unit = block_params(cfg) / t
    best = None
    for rank, r in enumerate(stages):
        n = rank_params(cfg, r.blocks, r.first, r.last, t, p)
        states = model_state_bytes(n, c.zero, d, c.precision)
        acts = in_flight[rank] * (r.max_chunk * kept + boundary)
        working = per_layer * (2 if ac else 1)  # one layer's gradients (and its recomputation)
        if r.last:
            working = max(working, (8 + e) * M * V / t)  # the loss's gradient and the logits
            acts += (head_in_flight if p > 1 else 1) * 4 * M * V / t
        buffers = e * M * h if t > 1 else 0.0
        if d > 1 and c.zero == 3:
            buffers += 2 * e * unit + 4 * unit * (1 + 1 / d)
        elif (c.zero > 0 or c.precision != "fp32") and d > 1:
            buffers += 4 * unit + (e * unit if c.zero == 2 else 0.0)
        mem = {**states, "activations": acts + working, "buffers": buffers, "reserve": st.hw.reserve_bytes}
        total = sum(mem.values())
        if best is None or total > best[0]:
            best = (total, mem)
    return best


def estimate(cfg: GPTConfig, seq_len: int, global_batch: int, c: Candidate, hw: Hardware,
             gpus_per_node: int | None = None) -> Estimate:
    """Predicted step time and peak memory per device of `c` (assumed valid: see search.py)."""
    G = gpus_per_node or hw.gpus_per_node
    e = ELEMENT_BYTES[c.precision]
    b = global_batch // (c.dp * c.microbatches)
    cross = {axis: node_flows(c.dp, c.tp, c.pp, axis, G) for axis in ("tp", "dp", "pp")}
    st = _Step(cfg, c, hw, seq_len, b, e, cross, G)
    est = Estimate(candidate=c, micro_batch=b)
    stages = stage_plan(cfg, seq_len, c.pp, c.v)
    per_rank = _rank_times(st, stages)
    pipe, zero_inner_s = _pipeline_time(st, per_rank, est)
    tails = [(*_gradient_sync_time(st, r, tb_r), _optimizer_time(st, r)) for r, _, tb_r, _, _ in per_rank]
    dp_s, est.allreduce, other = max(tails, key=lambda x: x[0] + x[2])
    est.dp_comm_s = zero_inner_s + dp_s
    est.other_s = other
    est.step_time_s = pipe + dp_s + other

    est.peak_mem_bytes, est.memory = _peak_memory(st, stages)
    est.capacity_bytes = hw.capacity(c.world)
    est.fits = est.peak_mem_bytes <= est.capacity_bytes
    if not est.fits:
        est.reason = (f"out of memory: needs {est.peak_mem_bytes / 2**30:.1f} GiB per device, "
                      f"has {est.capacity_bytes / 2**30:.1f} GiB")

    est.flops_per_step = flops_per_token(cfg, seq_len) * global_batch * seq_len
    est.tflops_per_gpu = est.flops_per_step / est.step_time_s / c.world / 1e12
    est.mfu = est.flops_per_step / (est.step_time_s * c.world * hw.peak_flops)
    return est
