"""Search: enumerate the layouts of N devices, drop the impossible and those that do not fit,
rank the rest by predicted step time, and say why the first one wins.

What is enumerated (and what is pruned, so that 1,024 GPUs and a 175B model take seconds):
- dp x tp x pp = N over the divisors of N; tp must divide the heads (and the key/value heads of
  grouped-query attention), hidden, MLP and vocabulary sizes and, unless `allow_cross_node_tp`,
  stay inside a node; pp at most the number of layers;
- micro-batch sizes that are powers of two dividing the per-replica batch (plus no accumulation
  at pp = 1), and at least pp micro-batches for a pipeline;
- ZeRO stages 0-3 (only 0 when dp = 1: there is nothing to shard over);
- for pp > 1 the schedules gpipe, 1f1b and interleaved (2 chunks per rank, when the micro-batch
  count is a multiple of pp and there are at least 2 pp layers);
- sequence parallelism on and off when tp > 1;
- activation checkpointing only for a layout that does not fit without it: it only adds time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from paratrain.config import ConfigError, LayoutConfig, RunConfig
from paratrain.models.gpt import PRESETS, GPTConfig
from paratrain.planner.collectives import ALLREDUCE, crosses_node
from paratrain.planner.cost import Candidate, Estimate, estimate, pad_vocab, param_count
from paratrain.planner.hardware import NAMES, Hardware, get_hardware

if TYPE_CHECKING:  # models/llama.py builds specs, which price themselves here: imported where used
    from paratrain.models.llama import LlamaConfig

GiB = 2**30
OOM = "out of device memory"
# The largest shapes `paratrain plan` prices: far past any model or cluster built, and small
# enough that the search stays in seconds to minutes and every count fits a float.
SHAPE_LIMITS = {"layers": 10**6, "hidden": 2**20, "heads": 2**20, "vocab": 2**31, "seq_len": 2**24,
                "gpus": 2**16, "gpus_per_node": 2**16, "global_batch": 2**40}


@dataclass
class PlanResult:
    ranked: list[Estimate]                    # fitting layouts, fastest first
    rejected: Counter = field(default_factory=Counter)  # reason -> count
    oom: list[Estimate] = field(default_factory=list)   # layouts that do not fit, fastest first
    considered: int = 0
    seconds: float = 0.0


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _powers_of_two_dividing(n: int) -> list[int]:
    out, k = [], 1
    while n % k == 0:
        out.append(k)
        k *= 2
    return out


def _tp_problem(cfg: GPTConfig | LlamaConfig, tp: int) -> str | None:
    for what, n in (("attention heads", cfg.n_head), ("key/value heads", cfg.n_kv_head),
                    ("hidden size", cfg.d_model), ("MLP size", cfg.d_mlp), ("vocabulary", cfg.vocab_size)):
        if n % tp:
            return f"tp does not divide the {what}"
    return None


def candidates(cfg: GPTConfig | LlamaConfig, seq_len: int, global_batch: int, gpus: int, precision: str,
               gpus_per_node: int, allow_cross_node_tp: bool, rejected: Counter, fixed: dict | None = None):
    """Yield every candidate worth pricing (with and without sequence parallelism etc.), counting
    the shapes rejected before pricing in `rejected`. `fixed`: {field: value} that must hold."""
    fixed = fixed or {}
    for tp in divisors(gpus):
        for pp in divisors(gpus // tp):
            dp = gpus // (tp * pp)
            if any(fixed.get(k, v) != v for k, v in (("dp", dp), ("tp", tp), ("pp", pp))):
                continue
            why = _tp_problem(cfg, tp) if tp > 1 else None
            if why is None and not allow_cross_node_tp and crosses_node(dp, tp, pp, "tp", gpus_per_node):
                why = "tp would cross nodes (--allow-cross-node-tp)"
            if why is None and pp > cfg.n_layer:
                why = "more pipeline stages than layers"
            if why is None and global_batch % dp:
                why = f"global batch {global_batch} not divisible by dp"
            if why is None and tp > 1 and fixed.get("sequence_parallel") and seq_len % tp:
                why = "sequence length not divisible by tp"
            if why:
                rejected[why] += 1
                continue
            per_replica = global_batch // dp
            counts = sorted({per_replica // mb for mb in _powers_of_two_dividing(per_replica)} | {1})
            counts = [m for m in counts if m >= pp or pp == 1]
            if "microbatches" in fixed:
                counts = [m for m in counts if m == fixed["microbatches"]] or (
                    [fixed["microbatches"]] if per_replica % fixed["microbatches"] == 0 and fixed["microbatches"] >= pp else [])
            if not counts:
                rejected["batch too small to fill the pipeline"] += 1
                continue
            schedules = ["gpipe", "1f1b", "interleaved"] if pp > 1 else [fixed.get("schedule", "1f1b")]
            vs = fixed.get("virtual_stages", 2)
            sps = [False, True] if tp > 1 and seq_len % tp == 0 else [False]
            zeros = [0, 1, 2, 3] if dp > 1 else [0]
            for m in counts:
                for sched in schedules:
                    if sched == "interleaved" and (m % pp or cfg.n_layer < vs * pp):
                        continue
                    if vs != LayoutConfig.virtual_stages and (sched != "interleaved" or pp == 1):
                        continue  # as validate(): virtual stages given only for the interleaved schedule
                    for zero in zeros:
                        for sp in sps:
                            c = Candidate(dp=dp, tp=tp, pp=pp, zero=zero, schedule=sched, microbatches=m,
                                          sequence_parallel=sp, precision=precision, virtual_stages=vs)
                            if all(getattr(c, k) == v for k, v in fixed.items()):
                                yield c


def plan(cfg: GPTConfig | LlamaConfig, seq_len: int, global_batch: int, gpus: int, hw: Hardware,
         gpus_per_node: int | None = None, precision: str | None = None, allow_cross_node_tp: bool = False,
         fixed: dict | None = None, allreduce: str = "backend") -> PlanResult:
    """Price every candidate layout of `gpus` devices, its data-parallel all-reduce by `allreduce`
    (backend, ring, tree, hierarchical or auto); rank those that fit."""
    t0 = time.perf_counter()
    G = gpus_per_node or hw.gpus_per_node
    precision = precision or ("fp32" if hw.name.startswith("cpu-") else "bf16")
    res = PlanResult(ranked=[])
    fixed = dict(fixed or {})
    want_ac = fixed.pop("activation_checkpointing", None)
    for c in candidates(cfg, seq_len, global_batch, gpus, precision, G, allow_cross_node_tp, res.rejected, fixed):
        c = replace(c, allreduce=allreduce) if allreduce != "backend" else c
        tries = [c] if not want_ac else []
        if want_ac is not False:
            tries.append(replace(c, activation_checkpointing=True))
        for k, cand in enumerate(tries):
            e = estimate(cfg, seq_len, global_batch, cand, hw, G)
            res.considered += 1
            if e.fits:
                res.ranked.append(e)
                break  # activation checkpointing only where it is needed
            res.oom.append(e)
            res.rejected[OOM] += 1
    key = lambda e: (e.step_time_s, e.candidate.tp, e.candidate.pp, e.candidate.zero)  # noqa: E731
    res.ranked.sort(key=key)
    res.oom.sort(key=key)
    res.seconds = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------- explaining the choice
def _gib(x: float) -> str:
    return f"{x / GiB:.1f} GiB"


def explain(res: PlanResult, cfg: GPTConfig | LlamaConfig, hw: Hardware, gpus_per_node: int) -> str:
    """One line: why the first layout wins, from comparisons with the best alternatives."""
    if not res.ranked:
        return "no layout fits"
    best = res.ranked[0]
    c = best.candidate
    parts = []
    size = f"{param_count(cfg) / 1e9:.1f}B" if param_count(cfg) >= 1e9 else f"{param_count(cfg) / 1e6:.0f}M"

    def best_where(pred) -> Estimate | None:
        return next((e for e in res.ranked if pred(e.candidate)), None)

    if c.tp > 1:
        where = "inside the node" if c.tp <= gpus_per_node else "across nodes"
        smaller = best_where(lambda k: k.tp < c.tp)
        oom_smaller = any(e.candidate.tp < c.tp for e in res.oom)
        if smaller is None and oom_smaller:
            parts.append(f"tp={c.tp} {where} keeps the {size} weights in memory (no layout with tp<{c.tp} fits)")
        elif smaller is not None:
            parts.append(f"tp={c.tp} {where} ({_slower(smaller, best)} with tp={smaller.candidate.tp})")
        else:
            parts.append(f"tp={c.tp} {where}")
    if c.pp > 1:
        sched = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": f"interleaved 1F1B ({c.v} chunks per rank)"}[c.schedule]
        parts.append(f"pp={c.pp} with {sched} and {c.microbatches} micro-batches keeps the bubble at "
                     f"{best.bubble_fraction:.0%}")
    elif c.microbatches > 1:
        parts.append(f"{c.microbatches} micro-batches of {best.micro_batch} (gradient accumulation)")
    if c.dp > 1:
        z = f", ZeRO-{c.zero}" if c.zero else ""
        alt = best_where(lambda k: k.zero != c.zero and (k.dp, k.tp, k.pp) == (c.dp, c.tp, c.pp))
        note = f" ({_slower(alt, best)} with ZeRO-{alt.candidate.zero})" if alt else ""
        parts.append(f"dp={c.dp}{z}{note}")
    else:
        fewer = best_where(lambda k: k.dp > 1)
        if fewer is not None:
            parts.append(f"no data parallelism ({_slower(fewer, best)} with dp={fewer.candidate.dp}, "
                         f"{fewer.candidate.label})")
    if c.sequence_parallel:
        parts.append("sequence parallelism shards the norms' activations")
    if c.activation_checkpointing:
        parts.append("activation checkpointing is needed to fit")
    parts.append(f"predicted {best.step_time_s:.3g} s/step, {best.mfu:.0%} MFU, "
                 f"{_gib(best.peak_mem_bytes)} of {_gib(best.capacity_bytes)} per device")
    return f"why {c.label} wins: " + "; ".join(parts)


def _slower(other: Estimate, best: Estimate) -> str:
    x = other.step_time_s / best.step_time_s - 1
    return "within 1%" if x < 0.01 else f"{x:.0%} slower"


# --------------------------------------------------------------------- output
def table(rows: list[Estimate], allreduce: bool = False) -> str:
    """The ranked rows; `allreduce`: a last column with the data-parallel all-reduce each one runs."""
    head = (f"{'#':>3}  {'layout':<24} {'schedule':<11} {'m':>4} {'mb':>3} {'SP':>2} {'AC':>2} "
            f"{'step s':>8} {'TFLOP/s':>8} {'MFU':>5} {'mem GiB':>8}   "
            f"{'compute':>8} {'tp':>7} {'pp':>7} {'dp':>7} {'bubble':>7} {'other':>7}"
            + (f" {'ar':<12}" if allreduce else ""))
    lines = [head]
    for i, e in enumerate(rows, 1):
        c = e.candidate
        sched = (c.schedule if c.schedule != "interleaved" else f"interl.x{c.v}") if c.pp > 1 else "-"
        lines.append(
            f"{i:>3}  {c.label:<24} {sched:<11} {c.microbatches:>4} {e.micro_batch:>3} "
            f"{'y' if c.sequence_parallel else '-':>2} {'y' if c.activation_checkpointing else '-':>2} "
            f"{e.step_time_s:>8.3g} {e.tflops_per_gpu:>8.3g} {e.mfu:>5.0%} {e.peak_mem_bytes / GiB:>8.1f}   "
            f"{e.compute_s:>8.3g} {e.tp_comm_s:>7.2g} {e.pp_comm_s:>7.2g} {e.dp_comm_s:>7.2g} "
            f"{e.bubble_s:>7.2g} {e.other_s:>7.2g}" + (f" {e.allreduce:<12}" if allreduce else ""))
    return "\n".join(lines)


def _shape(name: str) -> GPTConfig | LlamaConfig:
    """The shape of model `name`: the catalog's (presets of both families, Hugging Face model
    folders) where there is one, else a preset of models/gpt.py or models/llama.py; ConfigError
    (one line) for an unknown name or a model without a shape the planner prices."""
    try:
        from paratrain.models.catalog import model_shape
    except ImportError:
        model_shape = None
    if model_shape is None:
        from paratrain.models.llama import LLAMA_PRESETS

        shape = {**PRESETS, **LLAMA_PRESETS}.get(name)
    else:
        try:
            shape = model_shape(name)
        except KeyError:
            raise ConfigError(_unknown(name)) from None
        except ValueError as e:  # ConfigError too: an unknown name, a folder we cannot read
            raise ConfigError(str(e) if str(e).startswith("--model") else f"--model: {e}") from None
        if shape is None:
            raise ConfigError(f"--model: {name!r} has no shape the planner prices (GPT-2 or Llama-family); "
                              "give --layers --hidden --heads --vocab --seq-len")
    if shape is None:
        raise ConfigError(_unknown(name))
    return shape


def _unknown(name: str) -> str:
    from paratrain.models.llama import LLAMA_PRESETS

    return (f"--model: unknown model {name!r}; choose one of {', '.join([*PRESETS, *LLAMA_PRESETS])} "
            "or give --layers --hidden --heads --vocab --seq-len")


def model_from_args(args: argparse.Namespace) -> tuple[GPTConfig | LlamaConfig, int, str]:
    """(model shape, sequence length, description) from --model or --layers/--hidden/...;
    ConfigError on bad input."""
    custom = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab")}
    given = [k for k, v in custom.items() if v is not None]
    if args.model and given:
        raise ConfigError(f"--model: give either --model or --layers/--hidden/--heads/--vocab, not both "
                          f"(got --model {args.model} and --{given[0]})")
    if args.model:
        cfg = _shape(args.model)
        seq = args.seq_len if args.seq_len is not None else RunConfig().train.seq_len
        if not 1 <= seq <= cfg.max_seq_len:
            raise ConfigError(f"--seq-len: must be between 1 and {cfg.max_seq_len} for model {args.model}, got {seq}")
        return cfg, seq, args.model
    missing = [k for k, v in custom.items() if v is None] + (["seq_len"] if args.seq_len is None else [])
    if missing:
        raise ConfigError("--model: give a preset (--model NAME) or the whole shape: missing "
                          + ", ".join("--" + k.replace("_", "-") for k in missing))
    for k, v in {**custom, "seq_len": args.seq_len}.items():
        if not 1 <= v <= SHAPE_LIMITS[k]:
            raise ConfigError(f"--{k.replace('_', '-')}: must be between 1 and {SHAPE_LIMITS[k]:,}, got {v}")
    if args.hidden % args.heads:
        raise ConfigError(f"--hidden: {args.hidden} is not divisible by --heads {args.heads}; use a multiple")
    vocab = pad_vocab(args.vocab)
    desc = (f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab {args.vocab}"
            + (f" (padded to {vocab}, a multiple of 128)" if vocab != args.vocab else ""))
    cfg = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.hidden, vocab_size=vocab,
                    max_seq_len=args.seq_len)
    return cfg, args.seq_len, desc


CLUSTER_FLAGS = ("nodes", "ranks_per_node", "rate")


def _check_calibration(args: argparse.Namespace) -> None:
    """ConfigError (one line) for `--calibrate` flags that cannot work, before anything is measured:
    --nodes/--ranks-per-node/--rate without --calibrate --nodes, a --gpu that is not the one
    measured, and a cluster that cannot be built here (fewer than 2 nodes, not a tc rate, not root)."""
    given = [f for f in CLUSTER_FLAGS if getattr(args, f, None) is not None]
    if given and not args.calibrate:
        raise ConfigError(f"--{given[0].replace('_', '-')}: builds a cluster on this machine for --calibrate; to "
                          "price a cluster use --gpu cpu-cluster --gpus N --gpus-per-node R")
    nodes = getattr(args, "nodes", None)
    if given and nodes is None:
        raise ConfigError(f"--{given[0].replace('_', '-')}: describes the cluster of --calibrate --nodes N; "
                          "give --nodes")
    if not args.calibrate:
        return
    want = "cpu-cluster" if nodes is not None else "cpu-local"
    if args.gpu not in (None, want):
        raise ConfigError(f"--calibrate: measures this machine ({want}{' with --nodes' if nodes else ''}); "
                          f"drop --gpu or use --gpu {want}")
    if nodes is not None:
        from paratrain.planner.calibrate import check_cluster

        try:
            check_cluster(nodes, _ranks_per_node(args), _rate(args))
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _ranks_per_node(args: argparse.Namespace) -> int:
    return args.ranks_per_node if getattr(args, "ranks_per_node", None) is not None else 2


def _rate(args: argparse.Namespace) -> str | None:
    rate = getattr(args, "rate", None) or "1gbit"
    return None if rate == "none" else rate


def _calibrate(args: argparse.Namespace, out) -> None:
    """`--calibrate`: this machine for cpu-local; with --nodes, first cpu-local if it has no
    calibration yet, then a cluster of this machine for cpu-cluster."""
    from paratrain.planner.calibrate import calibrate, calibrate_cluster
    from paratrain.planner.hardware import cpu_local

    log = lambda msg: print(f"paratrain: {msg}", file=sys.stderr if args.json else out, flush=True)  # noqa: E731
    nodes = getattr(args, "nodes", None)
    if nodes is None or not cpu_local().calibrated:
        calibrate(log=log)
    if nodes is not None:
        calibrate_cluster(nodes, _ranks_per_node(args), _rate(args), log=log)


def run_plan(args: argparse.Namespace, out=None) -> int:
    """`paratrain plan`. Raises ConfigError (one line) on bad input."""
    out = out or sys.stdout
    _check_calibration(args)
    allreduce = getattr(args, "allreduce", None) or "backend"
    if allreduce not in ALLREDUCE:
        raise ConfigError(f"--allreduce: must be one of {', '.join(ALLREDUCE)}, got {allreduce!r}")
    gpu = args.gpu or ("cpu-cluster" if args.calibrate and getattr(args, "nodes", None) else "cpu-local")
    if gpu not in NAMES:
        raise ConfigError(f"--gpu: unknown hardware {gpu!r}; choose one of {', '.join(NAMES)}")
    wants_plan = args.model is not None or args.layers is not None
    if wants_plan:
        model_from_args(args)  # a bad model fails before anything is measured
    if args.calibrate:
        _calibrate(args, out)
        if not wants_plan:
            return 0
    cfg, seq, desc = model_from_args(args)
    hw = get_hardware(gpu)
    gpus = args.gpus if args.gpus is not None else (
        min(hw.cores, 4) if gpu == "cpu-local" else hw.gpus_per_node * max(1, hw.nodes))
    G = args.gpus_per_node if args.gpus_per_node is not None else (gpus if gpu == "cpu-local" else hw.gpus_per_node)
    batch = args.global_batch if args.global_batch is not None else RunConfig().train.global_batch
    for name, value in (("--gpus", gpus), ("--gpus-per-node", G), ("--global-batch", batch), ("--top", args.top)):
        limit = SHAPE_LIMITS.get(name.lstrip("-").replace("-", "_"))
        if value < 1 or (limit and value > limit):
            raise ConfigError(f"{name}: must be " + (f"between 1 and {limit:,}" if limit else "at least 1") + f", got {value}")
    if gpus > G and gpus % G:
        raise ConfigError(f"--gpus: {gpus} GPUs do not fill nodes of {G}; use a multiple of --gpus-per-node {G}")
    precision = args.precision or ("fp32" if gpu.startswith("cpu-") else "bf16")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--precision: must be fp32, bf16 or fp16, got {precision!r}")
    res = plan(cfg, seq, batch, gpus, hw, G, precision, args.allow_cross_node_tp, allreduce=allreduce)
    if args.json:
        rows = res.ranked[: args.top] + res.oom[: args.top]
        out.write(json.dumps([r.as_dict() for r in rows], indent=1) + "\n")
        return 0
    n = param_count(cfg)
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
    print(f"paratrain plan: {desc}: {size} parameters; global batch {batch} x {seq} tokens, {precision}", file=out)
    print(f"  on {gpus} x {hw.name} ({G} per node); {hw.note}", file=out)
    if allreduce != "backend":
        print(f"  data-parallel all-reduce: {allreduce}" + (" (the cheapest by the alpha-beta model: column ar)"
                                                           if allreduce == "auto" else ""), file=out)
    print(f"  priced {res.considered:,} layouts in {res.seconds:.1f} s (dp x tp x pp = {gpus}; micro-batch sizes "
          "powers of two; activation checkpointing only where needed)", file=out)
    if res.ranked:
        print(file=out)
        print(table(res.ranked[: args.top], allreduce=allreduce == "auto"), file=out)
        print(file=out)
        print(explain(res, cfg, hw, G), file=out)
    else:
        print("\nno layout fits.", file=out)
        if res.oom:
            e = res.oom[0]
            print(f"closest: {e.candidate.label} needs {_gib(e.peak_mem_bytes)} of {_gib(e.capacity_bytes)}", file=out)
    if res.rejected:
        groups = "; ".join(f"{k} ({v:,} {'layouts' if k == OOM else 'dp x tp x pp shapes'})"
                           for k, v in res.rejected.most_common())
        print(f"rejected: {groups}", file=out)
    print("columns: m micro-batches, mb micro-batch size, SP sequence parallel, AC activation checkpointing; "
          "time in seconds per step (tp, pp: communication on the critical path; dp: not hidden; other: optimizer)",
          file=out)
    return 0


# --------------------------------------------------------------------- --layout auto
def local_hardware(device: str) -> tuple[Hardware, int, int]:
    """(hardware, devices, devices per node) for `paratrain train` on this machine or torchrun job."""
    import os

    if device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0)
        hw = get_hardware("h100-80gb" if "H100" in name or "H200" in name else "a100-80gb")
        hw = replace(hw, memory_bytes=float(torch.cuda.get_device_properties(0).total_memory))
        local = torch.cuda.device_count()
    else:
        hw = get_hardware("cpu-local")
        local = min(hw.cores, 4)
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # under torchrun
        local = int(os.environ.get("LOCAL_WORLD_SIZE", local))
        return hw, int(os.environ["WORLD_SIZE"]), local
    return hw, local, local


def run_shape(cfg: RunConfig) -> GPTConfig | LlamaConfig:
    """The shape of the run's model, with the run's vocabulary (the catalog's, or --model's
    vocabulary where it overrides the preset's)."""
    try:
        from paratrain.models.catalog import run_shape as catalog_shape
    except ImportError:
        catalog_shape = None
    shape = catalog_shape(cfg) if catalog_shape is not None else None
    if shape is None:
        shape = _shape(cfg.model.name)
        vocab = getattr(cfg.model, "vocab_size", 0)
        shape = replace(shape, vocab_size=vocab) if vocab else shape
    return shape


def auto_layout(cfg: RunConfig, fixed: dict) -> tuple[Estimate, Hardware, int]:
    """The planner's first choice for `cfg`'s model and batch on this machine (ConfigError if none)."""
    hw, gpus, G = local_hardware(cfg.train.device)
    model = run_shape(cfg)
    res = plan(model, cfg.train.seq_len, cfg.train.global_batch, gpus, hw, G, cfg.train.precision, fixed=fixed)
    if not res.ranked:
        why = res.rejected.most_common(1)[0][0] if res.rejected else "no candidate"
        raise ConfigError(f"--layout: auto found no layout of {gpus} workers for {cfg.model.name} with global batch "
                          f"{cfg.train.global_batch} ({why}); give --dp/--tp/--pp or another --global-batch")
    return res.ranked[0], hw, gpus


def predict_layout(cfg: RunConfig) -> dict:
    """The planner's predicted step time and peak memory per device for `cfg`'s own layout on
    this machine (for `paratrain compare`)."""
    hw, _, G = local_hardware(cfg.train.device)
    lay = cfg.layout
    c = Candidate(dp=lay.dp, tp=lay.tp, pp=lay.pp, zero=lay.zero, schedule=lay.schedule,
                  microbatches=lay.microbatches, sequence_parallel=lay.sequence_parallel,
                  activation_checkpointing=cfg.train.activation_checkpointing, precision=cfg.train.precision,
                  virtual_stages=lay.virtual_stages)
    e = estimate(run_shape(cfg), cfg.train.seq_len, cfg.train.global_batch, c, hw, max(G, lay.world_size))
    return {"step_time_s": e.step_time_s, "peak_mem_bytes": e.peak_mem_bytes}
