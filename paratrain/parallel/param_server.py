"""Parameter servers (Li et al., OSDI 2014) with bounded staleness (Ho et al., NIPS 2013).

`--sync ps --servers S` runs dp = W worker ranks (0 .. W-1) and S server ranks (W .. W+S-1).
The flat parameter vector is cut into S contiguous shards; server s holds shard s in fp32 with
its AdamW state. A worker runs the one Trainer (train.py) on a mesh of itself alone, as dp rank w
of W: a step pulls every shard into its model, runs the Trainer's forward and backward of its
slice of the global batch (micro-batches, loss weighed by 1 / (W x microbatches)) and pushes each
shard of the gradient to its server; the servers are the update step. Messages are
point-to-point sends with tags (a 5-number header, then a tensor) through paratrain.comm, so
they are counted and the hang watchdog sees every wait; a server receives headers from any
worker and answers in the order its rules allow:

- `--staleness 0` (synchronous): a server sums the W gradients of clock c, clips on the global
  norm (one all-reduce over the servers) and takes one AdamW step; a pull for clock c is answered
  once c steps are applied. The same math as all-reduce data parallelism.
- `--staleness K > 0` (stale synchronous parallel) and `-1` (asynchronous): every push is applied
  when it arrives, as an estimate of the global gradient (W times the worker's part); a worker may
  start clock c only while c - (slowest worker's clock) <= K (no bound for -1). Server 0 grants
  clocks until N x W pushes are promised, so the run processes the same tokens as N synchronous
  steps; the step counter of the learning-rate schedule is pushes / W.

Server 0 records, per granted pull, the worker's clock lead over the slowest worker and, per
push, how many updates landed between its pull and its push (version staleness); worker 0 gets
them at the end with the per-step losses and the final parameters, evaluates (the Trainer's
evaluation) and reports (the metrics file and trackers, metrics.py). Checkpoints: ps_checkpoint.py.
When all workers have said DONE the servers send their final shards and return; if a worker
fails, the launcher stops the whole group, servers included.

The metrics' `comm_bytes` is counted, not modelled: every rank's CommStats counts what it sends
for the steps (headers, gradients, pull replies, parameters, the servers' norm all-reduce; not
the refused pull, DONE and the final collection), one all-reduce at the end sums them over
ranks, and each step gets the sum over the steps. A synchronous step sends the same every time,
so that is its exact figure; with staleness it is the mean (W pulls and pushes per step in all).
Every rank is watched (--collective-timeout) once all are ready: no wait lasts longer than one
worker's step unless a rank is stuck, and then the ranks waiting on it are named.
"""

from __future__ import annotations

import copy
import math
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from paratrain.comm import CommStats, all_reduce, isend, recv, send
from paratrain.comm.flight import Watchdog
from paratrain.config import RunConfig, format_layout
from paratrain.fit import bars_without_semaphore, peak_memory_bytes
from paratrain.mesh import Mesh
from paratrain.metrics import MetricsLog, check_report_to
from paratrain.models.gpt import count_params
from paratrain.models.catalog import model_spec
from paratrain.parallel.parallelize import global_names
from paratrain.parallel.ps_checkpoint import ServerCheckpoints, resume_point
from paratrain.stops import NonFiniteError, non_finite_update
from paratrain.train import Trainer

PULL, PUSH, DONE = 0.0, 1.0, 2.0
TAG_HEADER, TAG_GRAD, TAG_REPLY, TAG_PARAMS, TAG_FINAL, TAG_LOG = 1, 2, 3, 4, 5, 6
HEADER = 5  # [op, clock, version pulled, loss part, squared gradient norm]


def shard_bounds(n: int, servers: int) -> list[tuple[int, int]]:
    """Contiguous, nearly equal shards of a flat vector of n elements."""
    edges = [round(i * n / servers) for i in range(servers + 1)]
    return list(zip(edges, edges[1:]))


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def set_flat_params(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset : offset + p.numel()].view_as(p).to(p.device))
            offset += p.numel()


def decay_mask(model: torch.nn.Module) -> torch.Tensor:
    """Per element of the flat vector: weight decay applies (matrices) or not (biases, norms)."""
    return torch.cat([torch.full((p.numel(),), p.dim() >= 2) for p in model.parameters()])


class Server:
    def __init__(self, cfg: RunConfig, index: int, workers: int, servers: int, group, model: torch.nn.Module):
        from paratrain.optim import lr_at

        self.cfg, self.index, self.W, self.S, self.group = cfg, index, workers, servers, group
        self.lr_at = lr_at
        self.K = cfg.train.staleness
        self.lo, self.hi = shard_bounds(count_params(model), servers)[index]
        self.shard = flat_params(model)[self.lo : self.hi].clone()
        mask = decay_mask(model)[self.lo : self.hi]
        # AdamW over contiguous runs of the shard that share weight decay, as in the trainer
        cuts = [0] + [i for i in range(1, len(mask)) if mask[i] != mask[i - 1]] + [len(mask)]
        runs = [(a, b, bool(mask[a])) for a, b in zip(cuts, cuts[1:])]
        self.views = [torch.nn.Parameter(self.shard[a:b]) for a, b, _ in runs]
        tr = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": [v for v, (_, _, d) in zip(self.views, runs) if d], "weight_decay": tr.weight_decay},
             {"params": [v for v, (_, _, d) in zip(self.views, runs) if not d], "weight_decay": 0.0}],
            lr=tr.lr, betas=(tr.beta1, tr.beta2))
        # Adam's moments as two flat vectors beside the shard (the state AdamW would create, but
        # in one piece), so that a checkpoint cuts them as it cuts the parameters
        self.moments = {m: torch.zeros_like(self.shard) for m in ("exp_avg", "exp_avg_sq")}
        for v, (a, b, _) in zip(self.views, runs):
            self.optimizer.state[v] = {"step": torch.tensor(0.0), **{m: t[a:b] for m, t in self.moments.items()}}
        # (global name, offset in the flat vector, shape) of every parameter, for checkpoints
        offsets = [0]
        for p in model.parameters():
            offsets.append(offsets[-1] + p.numel())
        self.slots = [(name, off, tuple(p.shape)) for (name, p), off in zip(model.named_parameters(), offsets)]
        self.aliases = global_names(model)[2]  # tied names, as the workers' checkpoints record them
        self.version = 0  # updates applied
        self.clock = [0] * workers  # pushes received from each worker
        self.done = [False] * workers
        self.pending: list[tuple[int, int]] = []  # pulls not yet answered: (worker, clock)
        self.granted = 0
        self.sum_grad = torch.zeros_like(self.shard)
        self.sum_loss, self.sum_sq, self.count = 0.0, 0.0, 0
        self.clock_loss = 0.0  # synchronous: the loss parts of the clock being summed
        self.stopped: tuple[int, float, float] | None = None  # (step, grad norm, loss) of a non-finite update
        self.log: list[list[float]] = []  # per global step: step, loss, time, grad norm, lr
        self.gaps: list[int] = []  # per granted pull: clock lead over the slowest worker
        self.staleness: list[int] = []  # per push: updates between its pull and its application
        self.sends: list = []
        self.comm = CommStats()  # the steps' messages: pull replies, parameters, the norm all-reduce
        self.closing = CommStats(flight=self.comm.flight)  # refusals, final shard and records: no step's
        self.ckpt = ServerCheckpoints(self, ps_layout(cfg)) if cfg.checkpoint.dir else None

    # ---- rules
    def _slowest(self) -> int:
        active = [c for c, d in zip(self.clock, self.done) if not d]
        return min(active) if active else max(self.clock)

    def _may_start(self, clock: int) -> bool:
        if self.K == 0:
            return self.version >= clock
        return self.K < 0 or clock - self._slowest() <= self.K

    def _exhausted(self, clock: int) -> bool:
        steps = self.cfg.train.steps
        return clock >= steps if self.K == 0 else self.granted >= steps * self.W

    def _serve(self) -> None:
        waiting = []
        for worker, clock in self.pending:
            if self.stopped or (self.index == 0 and self._exhausted(clock)):
                self._reply(worker, granted=False)
            elif self._may_start(clock):
                if self.index == 0:
                    self.granted += 1
                    self.gaps.append(clock - self._slowest())
                self._reply(worker, granted=True)
            else:
                waiting.append((worker, clock))
        self.pending = waiting

    def _reply(self, worker: int, granted: bool) -> None:
        self.sends = [w for w in self.sends if not w.is_completed()]
        reply = torch.tensor([float(granted), float(self.version)])
        self.sends.append(isend(reply, worker, None, self.comm if granted else self.closing, TAG_REPLY))
        if granted:
            self.sends.append(isend(self.shard.clone(), worker, None, self.comm, TAG_PARAMS))

    # ---- updates
    def _step(self, grad: torch.Tensor, sq: float, loss: float) -> None:
        tr = self.cfg.train
        if self.K == 0:  # the norm of the summed gradient, over all servers' shards
            total = torch.tensor([float(grad.pow(2).sum())], dtype=torch.float64)
            if self.S > 1:
                all_reduce(total, self.group, self.comm)
            sq = float(total)
        norm = math.sqrt(sq)
        step = self.version + 1 if self.K == 0 else self.version // self.W + 1
        if not (math.isfinite(norm) and math.isfinite(loss)):  # alike on every server: not applied
            self.stopped = (step, norm, loss)
            return
        coef = min(1.0, tr.grad_clip / (norm + 1e-6)) if tr.grad_clip > 0 else 1.0
        lr = self.lr_at(step, tr.lr, tr.warmup_steps, tr.steps, tr.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        offset = 0
        for v in self.views:
            v.grad = grad[offset : offset + v.numel()] * coef
            offset += v.numel()
        self.optimizer.step()
        self.version += 1
        if self.ckpt and self.cfg.checkpoint.every and self.version % self.cfg.checkpoint.every == 0:
            self.ckpt.save(self.version)  # synchronous servers only: every server is at this step
        self.sum_loss += loss
        self.sum_sq += norm
        self.count += 1
        per_step = 1 if self.K == 0 else self.W
        if self.index == 0 and self.count == per_step:
            self.log.append([float(step), self.sum_loss, time.time(), self.sum_sq / per_step, lr])
            self.sum_loss, self.sum_sq, self.count = 0.0, 0.0, 0

    def _push(self, worker: int, header: torch.Tensor) -> None:
        grad = torch.empty_like(self.shard)
        recv(grad, worker, None, TAG_GRAD, self.comm)
        _, clock, pulled, loss, sq = header.tolist()
        self.clock[worker] += 1
        self.staleness.append(self.version - int(pulled))
        if self.stopped:  # a non-finite update stopped the run: later pushes are not applied
            return
        if self.K != 0:  # applied on arrival, as an estimate of the whole batch's gradient
            self._step(grad * self.W, sq * self.W**2, loss)
            return
        self.sum_grad += grad
        self.clock_loss += loss
        if all(c == self.version + 1 or d for c, d in zip(self.clock, self.done)):
            self._step(self.sum_grad, 0.0, self.clock_loss)
            self.sum_grad.zero_()
            self.clock_loss = 0.0

    def resume(self, folder: str, step: int) -> None:
        self.ckpt.load(folder)
        self.version, self.clock = step, [step] * self.W

    def run(self) -> None:
        header = torch.empty(HEADER, dtype=torch.float64)
        while not all(self.done):
            self.comm.flight.step = self.version + 1 if self.K == 0 else self.version // self.W + 1
            worker = recv(header, None, None, TAG_HEADER, self.comm)
            op = float(header[0])
            if op == PULL:
                self.pending.append((worker, int(header[1])))
            elif op == PUSH:
                self._push(worker, header.clone())
            else:
                self.done[worker] = True
            self._serve()
        for work in self.sends:
            work.wait()
        send(self.shard, 0, None, self.closing, TAG_FINAL)
        if self.index == 0:
            for values in (self.log, [[g] for g in self.gaps], [[s] for s in self.staleness]):
                t = torch.tensor(values, dtype=torch.float64).reshape(-1, len(values[0]) if values else 1)
                shape = torch.tensor([float(t.shape[0]), float(t.shape[1])], dtype=torch.float64)
                send(shape, 0, None, self.closing, TAG_LOG)
                send(t.contiguous(), 0, None, self.closing, TAG_LOG)


def ps_layout(cfg: RunConfig) -> str:
    return f"{format_layout(cfg.layout)},ps={cfg.train.servers},staleness={cfg.train.staleness}"


class Worker:
    """A worker runs the one Trainer (train.py) on its slice of every global batch: its
    micro-batches, loss and weighting; pull and push stand where all-reduce and the update step
    stand in an all-reduce run, since the servers hold the parameters and the optimizer."""

    def __init__(self, cfg: RunConfig, trainer: Trainer, rank: int, workers: int, servers: int, start: int = 0):
        self.cfg, self.trainer, self.rank, self.W, self.S = cfg, trainer, rank, workers, servers
        self.model = trainer.model.module  # vanilla: its parameters() are the servers' flat order
        self.bounds = shard_bounds(trainer.n_params, servers)
        self.tokens_per_step = cfg.train.global_batch * cfg.train.seq_len
        self.comm = CommStats()  # what this worker sends (headers, gradients) and waits for
        self.step_bytes = 0  # the part of it sent for steps: all but the refused pull and DONE
        self.start = start  # the step a resumed run starts after

    def _send_header(self, server: int, values: list[float]) -> None:
        t = torch.tensor(values + [0.0] * (HEADER - len(values)), dtype=torch.float64)
        send(t, self.W + server, None, self.comm, TAG_HEADER)

    def _pull(self, clock: int) -> int | None:
        """All shards into the model; the version server 0 answered with, or None to stop."""
        flat = torch.empty(self.bounds[-1][1])
        version = 0
        self.comm.flight.step = clock + 1
        for s, (lo, hi) in enumerate(self.bounds):
            self._send_header(s, [PULL, clock])
            reply = torch.empty(2)
            recv(reply, self.W + s, None, TAG_REPLY, self.comm)
            if not reply[0]:
                return None
            version = int(reply[1]) if s == 0 else version
            recv(flat[lo:hi], self.W + s, None, TAG_PARAMS, self.comm)
        set_flat_params(self.model, flat)
        return version

    def _compute(self, clock: int) -> tuple[torch.Tensor, float]:
        """Step clock + 1 through the Trainer: the flat gradient of this worker's part of the
        global mean loss, and that part."""
        t = self.trainer
        t.simulate_faults(clock + 1)  # --simulate-failure, --simulate-straggler
        t.model.train()
        t.model.zero_grad()
        loss_part = float(t.forward_backward(t.data.local_batch(clock + 1, self.rank, self.W)))
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.model.parameters()]
        return torch.cat([g.flatten() for g in grads]).cpu(), loss_part

    def run(self) -> int:
        """Pull, compute, push until server 0 says stop; returns the number of clocks done."""
        cfg = self.cfg
        bars_without_semaphore()  # no semaphore left behind by a killed worker
        bar = tqdm(total=cfg.train.steps, disable=not (self.rank == 0 and cfg.train.progress), desc="worker 0",
                   unit="step", dynamic_ncols=True, file=sys.stderr)
        clock = self.start
        bar.update(clock)
        while (version := self._pull(clock)) is not None:
            grad, loss_part = self._compute(clock)
            sq = float(grad.pow(2).sum())
            for s, (lo, hi) in enumerate(self.bounds):
                self._send_header(s, [PUSH, clock, version, loss_part, sq])
                send(grad[lo:hi].contiguous(), self.W + s, None, self.comm, TAG_GRAD)
            self.step_bytes = self.comm.bytes  # all this worker sent so far went to granted clocks
            clock += 1
            bar.update(1)
        bar.close()
        for s in range(self.S):
            self._send_header(s, [DONE])
        return clock

    def collect(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Worker 0, after DONE: the final parameters and server 0's records."""
        flat = torch.empty(self.bounds[-1][1])
        for s, (lo, hi) in enumerate(self.bounds):
            recv(flat[lo:hi], self.W + s, None, TAG_FINAL, self.comm)
        records = []
        for _ in range(3):
            shape = torch.empty(2, dtype=torch.float64)
            recv(shape, self.W, None, TAG_LOG, self.comm)
            t = torch.empty(int(shape[0]), int(shape[1]), dtype=torch.float64)
            recv(t, self.W, None, TAG_LOG, self.comm)
            records.append(t)
        return flat, records

    def evaluate(self, flat: torch.Tensor) -> float:
        """Worker 0, with the final parameters `flat`: the Trainer's evaluation."""
        t = self.trainer
        set_flat_params(self.model, flat)
        # worker 0 alone evaluates the held-out batches whole, as the dp ranks of an all-reduce
        # run do together: data rank (0, 1) for this call
        t.dp_rank, t.dp = 0, 1
        try:
            return t.evaluate()
        finally:
            t.dp_rank, t.dp = self.rank, self.W


def run_ps(cfg: RunConfig, device: torch.device) -> dict:
    """The body of every rank of a parameter-server run; worker 0 returns the results."""
    W, S = cfg.layout.dp, cfg.train.servers
    rank = dist.get_rank()
    # every rank takes part in creating every group, in the same order: the servers' group, then
    # each worker's group of one (its Trainer's mesh)
    server_group = dist.new_group(list(range(W, W + S)))
    alone = [dist.new_group([w]) for w in range(W)]
    folder, start = resume_point(cfg)
    if rank >= W:
        return serve(cfg, rank - W, server_group, folder, start)
    return work(cfg, worker_trainer(cfg, alone[rank], device), folder, start)


def worker_trainer(cfg: RunConfig, alone, device: torch.device) -> Trainer:
    """This worker's Trainer, built as the CLI builds one, on a mesh of this process alone (so
    its engine communicates nothing); its data rank (w, W) chooses the batch slice and weighs the
    loss, so that the W workers' gradients sum to that of the global mean loss, as under
    all-reduce. It gets a copy of the run's config (it sets the copy's dp, tp, pp from the mesh),
    without the components the run keeps elsewhere: checkpoints (the servers' state) and the
    watchdog (`watch`, over the workers' and servers' messages)."""
    mine = copy.deepcopy(cfg)
    mine.checkpoint.dir, mine.checkpoint.every, mine.checkpoint.resume = None, 0, False
    mine.train.collective_timeout = 0
    mesh = Mesh.of_one(alone, device.type)
    return Trainer.from_config(mine, mesh, device, data_rank=(dist.get_rank(), cfg.layout.dp))


def serve(cfg: RunConfig, index: int, group, folder: str | None, start: int) -> dict:
    """Server `index`: the model built through the workers' spec, its shard, its loop."""
    tr = cfg.train
    model = model_spec(cfg).build()
    server = Server(cfg, index, cfg.layout.dp, tr.servers, group, model)
    if folder:
        server.resume(folder, start)
    watchdog = watch(cfg, server.comm)
    server.run()
    total_step_bytes(server.comm.bytes, server.closing, watchdog)
    if stop := agree_on_stop(server.stopped if index == 0 else None, cfg):
        raise stop
    return {}


def work(cfg: RunConfig, trainer: Trainer, folder: str | None, start: int) -> dict:
    """A worker's run: its clocks; then worker 0 collects, evaluates and reports (the metrics
    file and trackers from the start record on, as `paratrain train` writes them)."""
    W, S, rank, tr = cfg.layout.dp, cfg.train.servers, trainer.rank, cfg.train
    worker = Worker(cfg, trainer, rank, W, S, start)
    metrics = MetricsLog(tr.metrics, check_report_to(tr.report_to), tr.log_dir, config=cfg.to_dict(),
                         enabled=rank == 0)
    try:
        metrics.start({"event": "start", "layout": ps_layout(cfg), "world_size": W + S, "params": trainer.n_params,
                       "config": cfg.to_dict()})
        if folder and rank == 0:
            print(f"paratrain: resumed from {folder} (step {start}) into {ps_layout(cfg)}", flush=True)
        if rank == 0:
            print(f"paratrain: training {cfg.model.name} ({trainer.n_params / 1e6:.2f}M parameters) with {W} "
                  f"workers and {S} parameter server(s), staleness {tr.staleness}, "
                  f"{tr.global_batch} x {tr.seq_len} tokens per step", flush=True)
        watchdog = watch(cfg, worker.comm)
        t0 = time.time()
        clocks = worker.run()
        done = time.time()
        if rank != 0:
            total_step_bytes(worker.step_bytes, worker.comm, watchdog)
            if stop := agree_on_stop(None, cfg):
                raise stop
            return {}
        flat, records = worker.collect()
        step_bytes = total_step_bytes(worker.step_bytes, worker.comm, watchdog)
        if stop := agree_on_stop(None, cfg):
            write_steps(cfg, worker, metrics, records[0], t0, step_bytes)
            metrics.event({"event": "stopped", **stop.record()["stopped"]})
            raise stop
        val = worker.evaluate(flat)
        return report(cfg, worker, metrics, records, val, (t0, done), clocks, step_bytes)
    finally:
        metrics.close()


def watch(cfg: RunConfig, stats: CommStats) -> Watchdog | None:
    """Once every rank is ready (servers loaded, workers' data prepared), the hang watchdog."""
    dist.barrier()  # not watched: a worker may take long to prepare its data while servers wait
    timeout = cfg.train.collective_timeout
    return Watchdog(stats.flight, timeout) if timeout > 0 else None


def total_step_bytes(mine: int, stats: CommStats, watchdog: Watchdog | None) -> int:
    """The bytes every rank sent for the steps, summed (all ranks, at the end); then unwatched."""
    t = torch.tensor([mine], dtype=torch.int64)
    all_reduce(t, None, stats)
    if watchdog:
        watchdog.stop()
    return int(t)


def agree_on_stop(mine: tuple[int, float, float] | None, cfg: RunConfig) -> NonFiniteError | None:
    """Every rank, at the end: server 0's (step, norm, loss) of a non-finite update, if any, as
    the NonFiniteError each rank raises (one small broadcast from server 0)."""
    box = [mine]
    dist.broadcast_object_list(box, src=cfg.layout.dp)
    return None if box[0] is None else non_finite_update(*box[0], cfg.train.grad_clip)


def write_steps(cfg: RunConfig, worker: Worker, metrics: MetricsLog, log: torch.Tensor, t0: float,
                step_bytes: int) -> list[float]:
    """Worker 0: the step records of server 0's `log` (step, loss, time, grad norm, lr per applied
    step) to the metrics log; returns the losses. `step_bytes`: what all ranks counted for the steps."""
    losses = [float(x) for x in log[:, 1]]
    stamps = [float(t) for t in log[:, 2]]
    step_times = [b - a for a, b in zip([t0] + stamps, stamps)]
    peak = peak_memory_bytes(worker.trainer.device)  # worker 0's
    comm = round(step_bytes / len(log)) if len(log) else 0  # counted; per step, see the module docstring
    for (s, loss, _, g, lr), dt in zip(log.tolist(), step_times):
        metrics.step({"step": int(s), "loss": float(loss), "tokens": worker.tokens_per_step, "step_time_s": dt,
                      "tokens_per_s": worker.tokens_per_step / dt, "peak_mem_bytes": peak, "comm_bytes": comm,
                      "grad_norm": float(g), "lr": float(lr)})
    return losses


def report(cfg: RunConfig, worker: Worker, metrics: MetricsLog, records: list[torch.Tensor], val: float,
           times: tuple[float, float], clocks: int, step_bytes: int) -> dict:
    """Worker 0's step records and summary, to the metrics log and the console; `records`:
    server 0's (per step, grants' clock gaps, pushes' staleness); `step_bytes`: what all ranks
    counted for the steps."""
    tr, (log, gaps, staleness), (t0, done) = cfg.train, records, times
    W, S, layout = cfg.layout.dp, tr.servers, ps_layout(cfg)
    losses = write_steps(cfg, worker, metrics, log, t0, step_bytes)
    wall = done - t0
    summary = {
        "event": "end", "steps": tr.steps, "final_loss": losses[-1], "first_loss": losses[0], "val_loss": val,
        "tokens_per_s": worker.tokens_per_step * len(losses) / wall, "layout": layout, "sample": "",
        "worker0_clocks": clocks,
        "ps_max_clock_gap": int(gaps.max()) if gaps.numel() else 0,
        "ps_clock_gaps": [int(g) for g in gaps.flatten()],
        "ps_max_version_staleness": int(staleness.max()) if staleness.numel() else 0,
        "ps_version_staleness": [int(s) for s in staleness.flatten()],
    }
    metrics.end(summary)
    print(f"paratrain: done ({layout}, {W} workers, {S} servers). loss {losses[0]:.3f} (step {int(log[0, 0])}) -> "
          f"{losses[-1]:.3f} (step {int(log[-1, 0])}), validation loss {val:.3f}", flush=True)
    print(f"  throughput {summary['tokens_per_s']:,.0f} tokens/s over {wall:.1f} s; largest clock lead "
          f"{summary['ps_max_clock_gap']} (bound {tr.staleness if tr.staleness >= 0 else 'none'}), largest "
          f"version staleness {summary['ps_max_version_staleness']}", flush=True)
    return {"losses": losses, "val_losses": [(tr.steps, val)], **summary}
