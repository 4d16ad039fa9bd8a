"""A whole run of the Trainer: the steps, and the components around them.

`run(trainer)` trains from where the trainer stands to the configured steps. One rank writes the
metrics file of DESIGN.md and the trackers (metrics.py) and shows a progress bar; every rank
takes part in evaluation, checkpoints (checkpoint.py), the profiler (profile.py) and the
watchdog; at the end the pipeline timeline, the validation loss, a sample where the model can
give one, and the summary of throughput, FLOP/s and memory.
"""

from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm
from tqdm.std import TqdmDefaultWriteLock

from paratrain import balance
from paratrain.checkpoint import PREFIX
from paratrain.config import format_layout
from paratrain.metrics import MetricsLog, check_report_to
from paratrain.parallel.pipeline.timeline import write_run_timeline
from paratrain.planner import gpu_peak_flops
from paratrain.profile import StepProfiler
from paratrain.stops import Preempted, RunStopped, StopSignals, installed_stop_signals, signal_name


def peak_memory_bytes(device: torch.device) -> int:
    """Measured peak: allocator high-water mark on CUDA, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class StepStats:
    step: int
    loss: float
    tokens: int
    step_time_s: float
    peak_mem_bytes: int
    comm_bytes: int
    grad_norm: float
    lr: float
    idle_per_rank: list[float] | None = None  # pipeline: measured idle fraction of each rank
    loss_scale: float | None = None  # fp16
    skipped: bool = False  # fp16: the step overflowed and was skipped
    comm_bytes_inter_node: int | None = None  # across nodes: of comm_bytes, those sent to another node
    shares: list[int] | None = None  # dp > 1: each replica's sequences this step (balance.py)
    replica_s: list[float] | None = None  # and its compute seconds (less the time waited in collectives)

    def as_metrics(self) -> dict:
        extra = {"pipeline_idle": sum(self.idle_per_rank) / len(self.idle_per_rank)} if self.idle_per_rank else {}
        if self.loss_scale is not None:
            extra.update(loss_scale=self.loss_scale, skipped=self.skipped)
        if self.shares is not None:
            extra.update(shares=self.shares, compute_s=self.replica_s)
        if self.comm_bytes_inter_node is not None:
            extra.update(comm_bytes_inter_node=self.comm_bytes_inter_node,
                         comm_bytes_intra_node=self.comm_bytes - self.comm_bytes_inter_node)
        return {"step": self.step, "loss": self.loss, "tokens": self.tokens, "step_time_s": self.step_time_s,
                "tokens_per_s": self.tokens / self.step_time_s, "peak_mem_bytes": self.peak_mem_bytes,
                "comm_bytes": self.comm_bytes, "grad_norm": self.grad_norm, "lr": self.lr, **extra}



def run(t) -> dict:
    """Train `t` (a Trainer) to cfg.train.steps; returns {"losses", "val_losses", **summary}."""
    tr, lead = t.cfg.train, t.rank == 0
    bars_without_semaphore()
    log = MetricsLog(tr.metrics, check_report_to(tr.report_to), tr.log_dir, config=t.cfg.to_dict(), enabled=lead)
    try:
        resumed = continues(t)
        written = log.start({"event": "start", "layout": format_layout(t.cfg.layout), "world_size": t.mesh.world_size,
                             "params": t.n_params, "config": t.cfg.to_dict()}, resumed=resumed)
        if lead:
            print(start_line(t), flush=True)
            print_membership(written or resumed)
        steps, val_losses = train_loop(t, log)
        if t.ckpt:
            t.ckpt.close()  # the save in flight, then the folder's lock
        if getattr(t, "snapshots", None):
            t.snapshots.close()
        if t.watchdog:
            t.watchdog.stop()
        if t.pipeline and tr.timeline:
            lay = t.cfg.layout
            title = f"{format_layout(lay)} {lay.schedule}, {lay.microbatches} micro-batches (step {tr.steps})"
            write_run_timeline(t.pipeline.executor, t.mesh, tr.timeline, title)
        val = t.evaluate()
        val_losses.append((tr.steps, val))
        summary = log.whole_run(end_summary(t, steps, val))  # first loss, restarts: over every attempt
        log.end(summary)
    finally:
        log.close()
    if lead:
        print_summary(t, summary)
    return {"losses": [s.loss for s in steps], "val_losses": val_losses, **summary}


def continues(t) -> dict | None:
    """How this attempt continues an earlier one, for the metrics file: a restart of the workers
    (TORCHELASTIC_RESTART_COUNT > 0) or a resumed run, from the step the trainer resumed at; None
    for a fresh run."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)
    if attempt == 0 and t.resumed_from is None:
        return None
    record = {"event": "restart" if attempt else "resume", "attempt": attempt,
              "resumed_from_step": t.position.step - 1, "layout": format_layout(t.cfg.layout),
              "world_size": t.mesh.world_size, "microbatches": t.cfg.layout.microbatches,
              "restored_from": getattr(t, "restored_from", None)}
    change = membership_change(t)
    return {**record, "membership": change} if change else record


def print_membership(record: dict | None) -> None:
    """One line for an elastic change of the world (the restart record's `membership`)."""
    m = (record or {}).get("membership")
    if not m:
        return
    lost = record.get("time_lost_s")
    print(f"paratrain: membership changed: {m['world_size_from']} -> {m['world_size_to']} ranks, {m['from']} -> "
          f"{m['to']}, from step {record['resumed_from_step']} ({record.get('restored_from') or 'checkpoint'})"
          + (f"; {lost:.1f} s lost since the last step before the change" if lost is not None else ""), flush=True)


def membership_change(t) -> dict | None:
    """{"from", "to"}: the layouts (with micro-batches) of the checkpoint resumed and of this
    attempt, where the world changed size between them (an elastic restart); else None. The
    metrics file knows better (metrics.membership_change: the attempt before, even one that
    saved nothing)."""
    from paratrain.checkpoint import read_manifest

    if t.resumed_from is None:
        return None
    before = read_manifest(t.resumed_from)
    if before.get("world_size") == t.mesh.world_size:
        return None
    return {"step": t.position.step, "from": before.get("layout"), "to": t.layout_name,
            "world_size_from": before.get("world_size"), "world_size_to": t.mesh.world_size}


def bars_without_semaphore() -> None:
    """tqdm's default lock holds a multiprocessing semaphore in every process that draws a bar; a
    worker killed, or ended by the hang watchdog, leaves it to the launcher's resource tracker,
    which warns of it. One rank draws the bar: a thread lock is enough."""
    if not hasattr(TqdmDefaultWriteLock, "mp_lock"):
        TqdmDefaultWriteLock.mp_lock = None


def start_line(t) -> str:
    tr = t.cfg.train
    corpus = getattr(t, "corpus_tokens", None)
    as_bytes = t.cfg.data.tokenizer == "byte" and not t.cfg.data.path.endswith((".bin", ".npy"))
    unit = "MB" if as_bytes else "M tokens"
    source = f" on {t.cfg.data.path} ({corpus / 1e6:.1f} {unit})" if corpus is not None else ""
    shape = f"{tr.global_batch} x {tr.seq_len} tokens per step" if corpus is not None else "global batches"
    line = (f"paratrain: training {t.spec.name} ({t.n_params / 1e6:.2f}M parameters){source} with "
            f"{format_layout(t.cfg.layout)}, {shape}, device {t.device.type}")
    if t.pipeline:
        line += f"\nparatrain: pipeline stages (blocks): {t.pipeline.describe()}"
    return line


def train_loop(t, log: MetricsLog) -> tuple[list, list]:
    """The steps from the trainer's position to the last, each followed by its record, and by
    evaluation and a checkpoint when they are due. A stop (paratrain.stops: a non-finite step,
    or SIGTERM / SIGINT, after which every rank finishes its step and saves it) is raised on
    every rank alike, after the save in flight and a `stopped` record."""
    tr = t.cfg.train
    start = t.position.step
    bar = tqdm(total=tr.steps, initial=start - 1, disable=not (t.rank == 0 and tr.progress), desc="train",
               unit="step", dynamic_ncols=True, file=sys.stderr)
    profiler = StepProfiler(tr.profile, max(start, tr.steps - tr.profile_steps + 1), tr.steps, t.rank, t.device)
    steps, val_losses = [], []
    installed = installed_stop_signals()  # the worker's (launch.run_worker), or ours for this loop
    signals = installed or StopSignals().install()
    try:
        for k in range(start, tr.steps + 1):
            with profiler.around(k):
                s = t.run_step(k)
            steps.append(s)
            after_step(t, log, s, val_losses)
            bar.set_postfix(loss=f"{s.loss:.3f}", tok_s=f"{s.tokens / s.step_time_s:,.0f}")
            bar.update(1)
            if t.agreed_signal and k < tr.steps:  # on the last step the run ends as it would
                preempt(t, k, t.agreed_signal)
    except RunStopped as e:
        if t.ckpt:
            t.ckpt.close()  # the save in flight (of a good step) completes
        if t.watchdog:
            t.watchdog.stop()
        log.event({"event": "stopped", **e.record()["stopped"]})
        raise
    finally:
        bar.close()
        if signals and not installed:
            signals.restore()
    return steps, val_losses


def after_step(t, log: MetricsLog, s: StepStats, val_losses: list) -> None:
    """Step `s`'s record, then its evaluation and checkpoint when due."""
    tr, ck, k = t.cfg.train, t.cfg.checkpoint, s.step
    log.step(s.as_metrics())
    recovered = log.recovered(k)
    if recovered is not None:
        print(f"paratrain: recovered: step {k} trained {recovered:.1f} s after the last step before the failure",
              flush=True)
    if tr.eval_every and k % tr.eval_every == 0 and k != tr.steps and t.eval_data is not None:
        val_losses.append((k, t.evaluate()))
        log.event({"event": "eval", "step": k, "val_loss": val_losses[-1][1]})
    if t.ckpt:
        t.ckpt.poll()
        if ck.every and k % ck.every == 0:
            t.ckpt.save(k)
            log.event({"event": "checkpoint", "step": k, "async": ck.async_save,
                       **({"blocked_s": t.ckpt.events[-1]["blocked_s"]} if not t.ckpt.pending else {})})
        elif getattr(t, "snapshots", None) and t.snapshots.due(k) and k != tr.steps:
            t.snapshots.save(k)


def preempt(t, step: int, signum: int) -> None:
    """Every rank, after `step` when a rank got SIGTERM / SIGINT: wait for the save in flight,
    save `step` unless it was just saved, and raise Preempted (exit status 128 + signal)."""
    name = signal_name(signum)
    if not t.ckpt:
        raise Preempted(f"preempted ({name}) after step {step}; nothing was saved (no --checkpoint-dir)", step, signum)
    t.ckpt.wait()
    if not (t.ckpt.events and t.ckpt.events[-1]["step"] == step):
        t.ckpt.save(step)
        t.ckpt.wait()
    folder = os.path.join(t.ckpt.root, f"{PREFIX}{step:08d}")
    raise Preempted(f"preempted ({name}) after step {step}: saved {folder}; the same command with --resume "
                    f"continues", step, signum)


def end_summary(t, steps: list, val: float | None) -> dict:
    tr = t.cfg.train
    times = [s.step_time_s for s in steps]
    steady = times[1:] or times  # the first step pays for warm-up; leave it out if we can
    tokens = [s.tokens for s in steps][1:] or [s.tokens for s in steps]
    throughput = sum(tokens) / sum(steady) if steady else 0.0
    # model FLOP/s per device, and on a known GPU in bf16/fp16 their share of its peak (MFU)
    fpt = t.spec.flops_per_token
    tflops = throughput * fpt / t.mesh.world_size / 1e12 if fpt else None
    peak = gpu_peak_flops(torch.cuda.get_device_name(t.device)) if t.device.type == "cuda" else None
    mfu = tflops * 1e12 / peak if (tflops and peak and t.dtype != torch.float32) else None
    if not steps:  # resumed from a checkpoint of the last step: nothing left to train
        steps = [StepStats(tr.steps, float("nan"), 0, 1.0, 0, 0, 0.0, 0.0)]
        t.peak_per_rank = [peak_memory_bytes(t.device)] * t.mesh.world_size
    memory = t.memory_report()
    pipe = pipeline_report(t, steps[1:] or steps) if t.pipeline else {}
    if hasattr(t, "pp_split_measured"):  # --pp-split auto-measured (parallel/pipeline/measure.py)
        pipe["pp_split_measured"] = t.pp_split_measured
    return {"event": "end", "steps": tr.steps, "final_loss": steps[-1].loss, "first_loss": steps[0].loss,
            "first_step": steps[0].step, "val_loss": val, "tokens_per_s": throughput, "tflops_per_device": tflops,
            "mfu": mfu, "peak_mem_bytes_per_rank": t.peak_per_rank,
            "param_bytes_per_rank": [m["params"] for m in memory],
            "memory_per_rank": memory, "checkpoints": t.ckpt.events if t.ckpt else [], "resumed_from": t.resumed_from,
            "snapshots": t.snapshots.events if getattr(t, "snapshots", None) else [],
            "layout": format_layout(t.cfg.layout), "sample": t.sample(), **pipe, **allreduce_report(t),
            **({"balance": balance.report(t.balancer, t.last_compute, t.replica_of)}
               if getattr(t, "balancer", None) and hasattr(t, "last_compute") else {})}


def allreduce_report(t) -> dict:
    """`--allreduce auto`: the algorithm it measured fastest for each collective shape it met."""
    reduction = getattr(t.model, "reduction", None)
    return {"allreduce_auto": reduction.choices()} if reduction is not None and reduction.tuner else {}


def pipeline_report(t, steps: list) -> dict:
    """Measured idle fraction per pipeline stage (mean over the given steps and over the
    dp x tp ranks of that stage) beside the schedule's theoretical bubble."""
    stage_of_rank = [t.mesh.coords(r)["pp"] for r in range(t.mesh.world_size)]
    per_stage = []
    for stage in range(t.mesh.size("pp")):
        ranks = [r for r, s in enumerate(stage_of_rank) if s == stage]
        per_stage.append(sum(st.idle_per_rank[r] for st in steps for r in ranks) / (len(steps) * len(ranks)))
    return {"pipeline_idle_per_stage": per_stage, "pipeline_bubble_theory": t.pipeline.bubble_theory}


def print_summary(t, summary: dict) -> None:
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    mem = ", ".join(f"rank {r} {b / 2**20:,.0f} MiB" for r, b in enumerate(summary["peak_mem_bytes_per_rank"]))
    states = "; ".join(f"rank {r} {mib(m['params'])} + {mib(m['grads'])} + {mib(m['optimizer'])}"
                       for r, m in enumerate(summary["memory_per_rank"]))
    val = summary["val_loss"]
    print(f"paratrain: done. loss {summary['first_loss']:.3f} (step {summary['first_step']}) -> "
          f"{summary['final_loss']:.3f} (step {summary['steps']})"
          + (f", validation loss {val:.3f}" if val is not None else ""), flush=True)
    tflops, mfu = summary["tflops_per_device"], summary["mfu"]
    flops = ""
    if tflops:
        flops = f" ({tflops:.3g} TFLOP/s per device" + (f", MFU {mfu:.1%}" if mfu is not None else "") + ")"
    unit = getattr(t, "unit", "tokens") + "/s"
    print(f"  throughput {summary['tokens_per_s']:,.0f} {unit} over steps 2-{summary['steps']}{flops}; peak memory: {mem}")
    print(f"  model states (MiB, parameters + gradients + optimizer): {states}")
    if "pipeline_idle_per_stage" in summary:
        idle = ", ".join(f"stage {i} {f:.1%}" for i, f in enumerate(summary["pipeline_idle_per_stage"]))
        print(f"  pipeline idle (measured): {idle}; schedule bubble (theory) {summary['pipeline_bubble_theory']:.1%}")
    if "balance" in summary:
        print(balance.describe(summary["balance"]))
    if summary["sample"]:
        print(f"  sample: {summary['sample']!r}", flush=True)
