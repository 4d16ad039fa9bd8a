"""The one Trainer: the CLI, the Python API, compare and parameter-server workers run it.

A model comes in as a spec (models/spec.py: paratrain's GPT, or any `nn.Module` with its loss),
the strategies are applied by one `parallelize` (parallel/parallelize.py), and a step is the same
math in every layout: the global batch of step k is a function of (seed, k) only, each
data-parallel rank runs its slice in `microbatches` pieces (or, under --balance dynamic, the share
its measured speed earns: balance.py), every micro-batch's mean loss is weighed by its rows over
the global batch so that summed gradients are those of the global mean loss,
and one update step (`optim.apply_update`) finishes the reductions, clips on the global norm and
steps. Checkpoints, metrics and trackers, evaluation, profiling and the hang watchdog are
components the Trainer is given (fit.py runs them around the steps).
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from paratrain.balance import Balancer, parse_slowdown, replica_seconds, slowed
from paratrain.checkpoint import Checkpointer, agree_on_latest, full_state_dict, guard_sharded_optimizer, read_manifest
from paratrain.checkpoint.snapshot import Snapshots
from paratrain.comm import parse_compress
from paratrain.comm.flight import Watchdog
from paratrain.config import RunConfig, format_layout, validate_settings
from paratrain.faults import parse_fault, strike
from paratrain.data import DataPosition, TokenLoader, as_pair, batch_rows, call_model, first_tensor, split_batch, to_device
from paratrain.fit import StepStats, peak_memory_bytes, run
from paratrain.group import init
from paratrain.mesh import Mesh
from paratrain.models.catalog import model_spec, user_spec
from paratrain.models.spec import ModelSpec
from paratrain.optim import LossScaler, NonFiniteNorm, apply_update, build_optimizer, lr_at, param_groups
from paratrain.parallel.parallelize import apply_strategies
from paratrain.parallel.pipeline.measure import pp_stages
from paratrain.parallel.tensor import TPGroup
from paratrain.parallel.zero import ZeroDataParallel
from paratrain.settings import api_config
from paratrain.sources import open_tokenizer, open_tokens
from paratrain.stops import NonFiniteError, non_finite_loss, non_finite_norm, overflowed, requested_signal


def is_tokens(t: torch.Tensor | None) -> bool:
    """A batch of token ids: an integer tensor of two or more dimensions."""
    return t is not None and t.dim() >= 2 and not t.is_floating_point()


def items_in(inputs) -> int:
    """Tokens in a batch of token ids, else rows (images, examples)."""
    t = first_tensor(inputs)
    if t is None:
        return 0
    return t.numel() if is_tokens(t) else t.shape[0]


class Trainer:
    """`Trainer(model, mesh, loss_fn, data=..., **settings)`: train any model under the mesh's
    layout with every feature of `paratrain train`; settings are the names of LayoutConfig and
    TrainConfig fields (zero, microbatches, precision, lr, steps, metrics, report_to, ...) and
    checkpoint_dir / checkpoint_every / keep_checkpoints / resume / async_checkpoint. `model` is
    an `nn.Module` (built alike on every rank) or a ModelSpec; `loss_fn(outputs, targets)` the
    mean loss of a batch; `data` / `eval_data` a source of global batches (`data.DatasetLoader`,
    `data.token_batches`); `optimizer` a torch optimizer class, factory or instance."""

    def __init__(self, model: nn.Module | ModelSpec, mesh: Mesh | None = None, loss_fn=None, *, data=None,
                 eval_data=None, optimizer=None, tp_plan: dict[str, str] | None = None,
                 blocks: list[nn.Module] | None = None, layers: list[nn.Module] | None = None,
                 pp_split: list | str | None = None, device: torch.device | None = None,
                 config: RunConfig | None = None, data_rank: tuple[int, int] | None = None, **settings):
        if mesh is None:
            mesh = init()
        if mesh.size("pp") > 1 and config is None:  # a pipeline needs at least one micro-batch per stage
            settings.setdefault("microbatches", mesh.size("pp"))
        if isinstance(settings.get("report_to"), (list, tuple)):
            settings["report_to"] = ",".join(settings["report_to"]) or "none"
        if isinstance(pp_split, str):  # "auto" / "auto-measured": the layout's setting, not split points
            settings["pp_split"], pp_split = pp_split, None
        self.cfg = cfg = api_config(settings, config)
        cfg.layout.dp, cfg.layout.tp, cfg.layout.pp = mesh.size("dp"), mesh.size("tp"), mesh.size("pp")
        if config is None:
            cfg.train.global_batch = getattr(data, "global_batch", None) or cfg.train.global_batch
            validate_settings(cfg)
        if isinstance(model, ModelSpec):
            self.spec = model
            if model.source and config is None:  # checkpoints record where the model came from
                cfg.model.name = model.source
        else:
            if loss_fn is None:
                raise TypeError("Trainer: give loss_fn(outputs, targets), the mean loss of a batch")
            self.spec = user_spec(model, loss_fn, tp_plan=tp_plan, blocks=blocks, layers=layers, pp_split=pp_split)
        self.mesh, self.rank = mesh, dist.get_rank()
        self.device = device or (torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda"
                                 else torch.device("cpu"))
        # the data-parallel rank and degree that choose the batch slice and weigh the loss
        # (parameter-server workers are dp ranks without a dp group)
        self.dp_rank, self.dp = data_rank or (mesh.coord("dp"), mesh.size("dp"))
        self.data, self.eval_data = data, eval_data
        self.baseline_mem = peak_memory_bytes(self.device)  # before the model: the interpreter, torch
        self._build(optimizer)
        self._components()

    @classmethod
    def from_config(cls, cfg: RunConfig, mesh: Mesh, device: torch.device | None = None,
                    data_rank: tuple[int, int] | None = None) -> "Trainer":
        """The run `paratrain train` makes: `--model` (models/catalog.py) on `--data` (`data_rank`: as
        for the constructor, a parameter-server worker's dp rank and degree)."""
        tr = cfg.train
        spec = model_spec(cfg)
        tokens = open_tokens(cfg)  # memory-mapped where the corpus was tokenized into the cache
        loader = TokenLoader(tokens, tr.seq_len, tr.global_batch, tr.seed, cfg.data.val_fraction)
        trainer = cls(spec, mesh, data=loader, eval_data=loader.validation(), device=device, config=cfg,
                      data_rank=data_rank)
        trainer.corpus_tokens, trainer.tokenizer = tokens.size, open_tokenizer(cfg)
        return trainer

    # ------------------------------------------------------------------ building
    def _build(self, optimizer) -> None:
        lay, tr = self.cfg.layout, self.cfg.train
        torch.manual_seed(tr.seed)  # the default generator agrees on every rank (dropout on replicas)
        model = self.spec.build().to(self.device)
        self.n_params = sum(p.numel() for p in model.parameters())
        self.compressor = parse_compress(tr.compress, tr.compress_warmup)
        self.par = apply_strategies(
            model, self.mesh, zero=lay.zero, precision=tr.precision, tp_plan=self.spec.tp_plan,
            sequence_parallel=lay.sequence_parallel, activation_checkpointing=tr.activation_checkpointing,
            blocks=self.spec.blocks, stages=pp_stages(self), bucket_mb=tr.bucket_mb, compressor=self.compressor,
            seed=tr.seed, schedule=lay.schedule, microbatches=lay.microbatches, virtual_stages=lay.virtual_stages,
            compile=tr.compile, broadcast_buffers=tr.broadcast_buffers, sync_batchnorm=tr.sync_batchnorm,
            device=self.device, allreduce=tr.allreduce)
        self.model, self.pipeline = self.par.engine, self.par.pipeline
        self.zero = self.par.zero
        tp = TPGroup.from_mesh(self.mesh) if self.mesh.size("tp") > 1 else None
        self.loss_fn = partial(self.spec.tp_loss, tp=tp) if tp and self.spec.tp_loss else self.spec.loss
        if tr.compile:  # the loss too: the fp32 upcast of the logits fuses into the softmax
            self.loss_fn = torch.compile(self.loss_fn)
        groups = param_groups(self.model, tr.weight_decay)
        self.optimizer = build_optimizer(groups, optimizer, tr.lr, (tr.beta1, tr.beta2))
        if self.zero and lay.zero > 0:
            guard_sharded_optimizer(self.optimizer, self.mesh.coord("dp"), self.mesh.size("dp"), lay.zero)
        self.scaler = LossScaler(tr.precision == "fp16")
        self.dtype = self.model.dtype if self.zero else torch.float32
        self.layout_name = f"{format_layout(lay)},schedule={lay.schedule},microbatches={lay.microbatches}"
        # the rank whose loss counts: every dp replica holds a part of the global batch
        self.is_loss_rank = self.mesh.coord("tp") == 0 and self.mesh.coord("pp") == self.mesh.size("pp") - 1
        self.position = DataPosition(tr.seed)  # the next step: what a checkpoint keeps of the data

    def _components(self) -> None:
        """Fault aids, the hang watchdog and checkpoints (metrics, profiler: fit.py)."""
        tr, ck = self.cfg.train, self.cfg.checkpoint
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        # --simulate-failure RANK:STEP[:HOW] (faults.py), in the first attempt only: at the start of the step,
        # or (HOW save-...) in the checkpoint save of that step
        who, at, how = (parse_fault(tr.simulate_failure) if first_attempt else None) or (-1, 0, "")
        self.fail_at = (at, how) if who == self.rank and not how.startswith("save") else None
        save_fault = (at, how) if who == self.rank and how.startswith("save") else None
        who, _, seconds = (tr.simulate_straggler or "-1:0").partition(":")
        self.straggle = float(seconds) if int(who) == self.rank else 0.0
        who, factor = parse_slowdown(tr.simulate_slowdown) or (-1, 1.0)
        self.slowdown = factor if who == self.rank else 1.0
        if self.pipeline:
            self.pipeline.executor.slowdown = self.slowdown
        self.balancer = self._balancer()
        self.watchdog = Watchdog(self.mesh.comm.flight, tr.collective_timeout) if tr.collective_timeout > 0 else None
        if self.watchdog and getattr(self.model, "reduction", None) is not None:
            self.watchdog.also(self.model.reduction.flight)  # the --allreduce thread's steps
        self.resumed_from = self.restored_from = self.snapshots = None
        self._ckpts: dict[str, Checkpointer] = {}
        self.ckpt = self._checkpointer(ck.dir) if ck.dir else None
        if self.ckpt:
            self.ckpt.fault = save_fault
            folder = self.ckpt.open(resume=ck.resume, restart=not first_attempt)
            if ck.snapshot_every:
                self.snapshots = Snapshots(self.ckpt, self.mesh, ck.snapshot_every, ck.snapshot_dir)
            self._start_from(folder)

    def _balancer(self) -> Balancer | None:
        """Each replica's measured speed (dp > 1), and with --balance dynamic its share of the batch."""
        if self.mesh.size("dp") == 1:
            return None
        lay, tr = self.cfg.layout, self.cfg.train
        self.replica_of = [self.mesh.coords(r)["dp"] for r in range(self.mesh.world_size)]
        rows = getattr(self.data, "global_batch", None) or tr.global_batch
        return Balancer(self.dp, rows, lay, moving=tr.balance == "dynamic")

    def _start_from(self, folder: str | None) -> None:
        """Load the disk checkpoint `folder` (the newest of a restart, or the one --resume asked
        for), or this node's in-memory snapshot where every node holds a newer one."""
        disk = read_manifest(folder)["step"] if folder else None
        snapshot, why_not = self.snapshots.choose(disk) if self.snapshots else (None, None)
        if why_not and self.rank == 0:
            print(f"paratrain: {why_not}; resuming from {folder or 'the first step'}", flush=True)
        if snapshot is not None:
            step = self.ckpt.load(snapshot, group=self.snapshots.group)
            self.resumed_from, self.restored_from = snapshot, "snapshot"
            if self.rank == 0:
                print(f"paratrain: restored the in-memory snapshot of step {step} into {self.layout_name} (the "
                      f"disk checkpoint is {'at step ' + str(disk) if folder else 'not written yet'})", flush=True)
        elif folder is not None:
            self._load(self.ckpt, folder)
            self.restored_from = "disk"

    def _checkpointer(self, root: str) -> Checkpointer:
        """The checkpointer of `root` (one per folder: it holds the folder's lock and run id)."""
        if root in self._ckpts:
            return self._ckpts[root]
        ck = self.cfg.checkpoint
        ckpt = Checkpointer(root, self.model, self.optimizer, self.mesh, self.par.names,
                            state={"loader": self.position, "scaler": self.scaler,
                                   **({"balance": self.balancer} if self.balancer else {})}, identity=self.spec.identity,
                            layout=self.layout_name, config=self.cfg.to_dict(), keep=ck.keep,
                            async_save=ck.async_save, aliases=self.par.aliases, buffer_names=self.par.buffer_names,
                            on_load=self.after_load)
        if self.watchdog:
            self.watchdog.also(ckpt.background)
        self._ckpts[root] = ckpt
        return ckpt

    def after_load(self) -> None:
        """After a checkpoint was loaded into the masters: refresh what compute uses."""
        if self.zero:
            self.model.publish()

    def resume(self, root: str | None = None) -> int | None:
        """Load the newest good checkpoint under `root` (default: the run's checkpoint_dir) of
        this model, in this layout whatever layout saved it; returns its step, or None if there
        is none yet."""
        ckpt = self.ckpt if root is None else self._checkpointer(root)
        with self.mesh.comm.flight.watch("checkpoint: choose the newest", ckpt.group):
            folder = agree_on_latest(ckpt.root, self.spec.identity)
        return None if folder is None else self._load(ckpt, folder)

    def _load(self, ckpt: Checkpointer, folder: str) -> int:
        step = ckpt.load(folder)
        self.resumed_from = folder
        if self.rank == 0:
            print(f"paratrain: resumed from {folder} (step {step}) into {self.layout_name}", flush=True)
        return step

    def save_checkpoint(self, root: str | None = None) -> None:
        """Save the state after the last step under `root`/step_N (default: checkpoint_dir)."""
        ckpt = self.ckpt if root is None else self._checkpointer(root)
        ckpt.save(self.position.step - 1)
        ckpt.wait()

    def state_dict(self) -> dict | None:
        """The whole model as its vanilla `state_dict()` would hold it (parameters in fp32,
        buffers, tied names), gathered on global rank 0; None on the other ranks."""
        return full_state_dict(self.model, self.mesh, self.par.names, buffer_names=self.par.buffer_names,
                               aliases=self.par.aliases)

    # ------------------------------------------------------------------ one step
    def _loss(self, outputs, targets) -> torch.Tensor:
        return self.loss_fn(outputs, to_device(targets, self.device)).float()

    def forward_backward(self, batch, sizes: list[int] | None = None) -> torch.Tensor:
        """Forward and backward of this rank's part of the global batch, in micro-batches (`sizes`:
        their rows, under --balance dynamic; else `microbatches` equal ones); the gradients are
        those of the global mean loss (times the fp16 scale): each micro-batch's mean loss weighs
        its rows over the global batch. Returns this rank's part of that loss, a device tensor
        (zero on ranks that do not hold the loss); `compute_s` is its time less the waits."""
        inputs, targets = as_pair(batch)
        xs = split_batch(inputs, sizes or self.cfg.layout.microbatches)
        m = len(xs)
        ts = split_batch(targets, sizes or m) if targets is not None else [None] * m
        scale = self.scaler.scale
        rows = self.balancer.global_batch if sizes else None
        weights = [scale * n / rows for n in sizes] if sizes else [scale / (self.dp * m)] * m
        flight = self.mesh.comm.flight
        t0, waited = time.perf_counter(), flight.blocked_s
        if self.pipeline:
            total = self.pipeline.run([to_device(x, self.device) for x in xs],
                                      lambda out, i: self._loss(out, ts[i]) * weights[i])
        else:
            total = torch.zeros((), device=self.device)
            for i, (x, t) in enumerate(zip(xs, ts)):
                with nullcontext() if i == m - 1 else self.model.no_sync(), slowed(self.slowdown, flight, self.device):
                    loss = self._loss(call_model(self.model, to_device(x, self.device)), t) * weights[i]
                    loss.backward()  # communicates after the last micro-batch
                total += loss.detach()
        if sizes and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the time of the work, not of its launch
        self.compute_s = time.perf_counter() - t0 - (flight.blocked_s - waited)
        return total / scale

    def simulate_faults(self, step: int) -> None:
        """The fault aids: --simulate-failure RANK:STEP[:kill|permanent] and --simulate-straggler RANK:SECONDS."""
        if self.fail_at and self.fail_at[0] == step:
            strike(self.fail_at[1])  # kill, permanent: does not return
            raise RuntimeError(f"simulated failure of rank {self.rank} at step {step} (--simulate-failure)")
        if self.straggle:
            time.sleep(self.straggle)

    def train_step(self, step: int, batch, sizes: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | float, float]:
        """Forward, backward and update for `step` on this rank's `batch` (in micro-batches of
        `sizes` rows, or `microbatches` equal ones). Returns (this rank's
        loss part, grad norm, lr), the first two as device tensors; a skipped fp16 step sets
        `self.skipped`. A non-finite gradient norm, or too many fp16 steps skipped in a row,
        raise NonFiniteError on every rank alike (the norm and the overflow are global)."""
        self.simulate_faults(step)
        tr = self.cfg.train
        self.model.train()
        self.model.zero_grad()
        if self.compressor is not None:
            self.compressor.begin_step(step)
        loss_part = self.forward_backward(batch, sizes)
        factor = lr_at(step, 1.0, tr.warmup_steps, tr.steps, tr.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        tied = self.pipeline.tied if self.pipeline else []
        scale = self.scaler.scale
        try:
            grad_norm, self.skipped = apply_update(self.model, self.optimizer, self.scaler, self.mesh, tr.grad_clip,
                                                   tied)
        except NonFiniteNorm as e:  # nothing was applied
            loss = self._global_loss(loss_part)
            raise NonFiniteError(non_finite_norm(step, e.norm, loss, tr.grad_clip), step) from None
        self.position.step = step + 1
        if self.skipped:
            self._skipped_step(step, scale, loss_part)
        return loss_part, grad_norm, self.optimizer.param_groups[0]["lr"]

    def _skipped_step(self, step: int, scale: float, loss_part: torch.Tensor) -> None:
        """An fp16 overflow skipped `step`: one line on rank 0; past --max-skipped-steps in a row, the stop."""
        n, bound = self.scaler.skipped_in_row, self.cfg.train.max_skipped_steps
        if self.rank == 0:
            tqdm.write(f"paratrain: warning: step {step}: fp16 gradients overflowed, update skipped (loss scale "
                       f"{scale:g} -> {self.scaler.scale:g})", file=sys.stderr)
        if bound > 0 and n >= bound:
            raise NonFiniteError(overflowed(step, n, self._global_loss(loss_part)), step)

    def _global_loss(self, loss_part: torch.Tensor) -> float:
        """The global mean loss from every rank's part (a collective: every rank calls it)."""
        mine = float(loss_part) if self.is_loss_rank else 0.0
        return float(self._gather([mine])[:, 0].sum())

    def step(self, inputs, targets=None) -> float:
        """One optimizer step on this rank's part of the global batch (its dp slice; the tp and
        pp ranks of a replica pass the same); returns the global mean loss on every rank.
        NonFiniteError if the loss or the gradient norm is NaN or inf."""
        step = self.position.step
        loss_part, grad_norm, _ = self.train_step(step, (inputs, targets))
        loss = self._global_loss(loss_part)
        if not (math.isfinite(loss) or self.skipped):
            raise NonFiniteError(non_finite_loss(step, loss, float(grad_norm)), step)
        return loss

    def _gather(self, values: list[float]) -> torch.Tensor:
        """Every rank's `values` as a (world, len) float64 tensor on CPU (one small collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        group = self.mesh.world_group
        out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        flight = self.mesh.comm.flight  # not communication of the step, but a place to hang
        flight.begin(flight.record("all_gather (metrics)", t, group))
        dist.all_gather(out, t, group=group)
        flight.end()
        return torch.stack(out).cpu()

    def run_step(self, step: int) -> StepStats:
        """Step `step` on the batch the data source gives, with its measured figures."""
        self.mesh.comm.reset()
        self.mesh.comm.flight.step = step
        scale = self.scaler.scale
        t0 = time.perf_counter()
        shares, sizes = self._share()
        if sizes:
            start, n = self.balancer.rows(self.dp_rank)
            batch = batch_rows(self.data, step, start, start + n)
        else:
            batch = self.data.local_batch(step, self.dp_rank, self.dp)
        loss_part, grad_norm, lr = self.train_step(step, batch, sizes)
        loss_value = float(loss_part) if self.is_loss_rank else 0.0  # float() waits for the device
        inputs = as_pair(batch)[0]
        self.unit = "tokens" if is_tokens(first_tensor(inputs)) else "items"
        items = items_in(inputs) if self.is_loss_rank else 0
        grad_norm = float(grad_norm)  # a device tensor until now, so the step ran without waiting
        dt = time.perf_counter() - t0
        idle = self.pipeline.executor.idle_fraction() if self.pipeline else 0.0
        # the last column: a stop signal (SIGTERM, SIGINT) any rank received, for all to stop after this step
        g = self._gather([loss_value, self.mesh.comm.bytes, peak_memory_bytes(self.device), dt, idle, items,
                          float(requested_signal()), self.mesh.comm.inter_bytes, self.compute_s])
        replica_s = self._observe(g[:, 8].tolist())
        self.peak_per_rank = [int(x) for x in g[:, 2]]
        self.agreed_signal = int(g[:, 6].max())
        loss = float(g[:, 0].sum())
        if not (math.isfinite(loss) or self.skipped):  # an fp16 overflow: skipped, counted above
            raise NonFiniteError(non_finite_loss(step, loss, grad_norm), step)
        return StepStats(step=step, loss=loss, tokens=int(g[:, 5].sum()),
                         step_time_s=float(g[:, 3].max()), peak_mem_bytes=max(self.peak_per_rank),
                         comm_bytes=int(g[:, 1].sum()), grad_norm=grad_norm, lr=lr,
                         idle_per_rank=[float(x) for x in g[:, 4]] if self.pipeline else None,
                         loss_scale=scale if self.scaler.enabled else None, skipped=self.skipped,
                         comm_bytes_inter_node=int(g[:, 7].sum()) if self.mesh.node_size else None,
                         shares=shares, replica_s=replica_s)

    def _share(self) -> tuple[list[int] | None, list[int] | None]:
        """(each replica's rows this step, this replica's micro-batch rows under --balance dynamic)."""
        b = self.balancer
        if b is None:
            return None, None
        shares = [b.rows(r)[1] for r in range(self.dp)]
        return shares, b.pass_sizes(self.dp_rank) if b.moving else None

    def _observe(self, per_rank: list[float]) -> list[float] | None:
        """Each replica's compute seconds this step, given to the balancer (the first step of an
        attempt pays for warm-up and is left out)."""
        if self.balancer is None:
            return None
        self.last_compute = per_rank
        seconds = replica_seconds(per_rank, self.replica_of, self.dp)
        if getattr(self, "_warm", False):
            self.balancer.observe(seconds)
        self._warm = True
        return seconds

    @torch.no_grad()
    def evaluate(self, batches: int | None = None) -> float | None:
        """Mean loss over the first `batches` (default eval_batches) global batches of the
        evaluation data (pipelines too: a forward-only pass of the schedule); None without it."""
        if self.eval_data is None:
            return None
        self.model.eval()
        n = batches or min(self.cfg.train.eval_batches, getattr(self.eval_data, "num_batches", 1 << 30))
        m = self.cfg.layout.microbatches if self.pipeline else 1
        total = 0.0
        for i in range(1, n + 1):
            inputs, targets = as_pair(self.eval_data.local_batch(i, self.dp_rank, self.dp))
            if self.pipeline:
                ts = split_batch(targets, m)
                xs = [to_device(x, self.device) for x in split_batch(inputs, m)]
                loss = self.pipeline.run(xs, lambda out, j: self._loss(out, ts[j]) / (self.dp * m), forward_only=True)
            else:  # every rank: the forward has collectives
                loss = self._loss(call_model(self.model, to_device(inputs, self.device)), targets) / self.dp
            total += float(loss) if self.is_loss_rank else 0.0
        return float(self._gather([total / n])[:, 0].sum())

    def sample(self) -> str:
        """A short generated text, where the spec can sample (paratrain's GPT), else ''."""
        lay = self.cfg.layout
        # under ZeRO-3 every dp rank takes part in the gathers of the parameters
        samplers = (self.mesh.coord("dp") == 0 or lay.zero == 3) and not self.pipeline and not lay.sequence_parallel
        if self.spec.sample is None or not samplers:
            return ""
        return self.spec.sample(self.model.module, self.device, self.cfg.train.seed,
                                tokenizer=getattr(self, "tokenizer", None))

    def fit(self, steps: int | None = None) -> dict:
        """Train to `steps` (default: the configured steps) from where the run stands, with the
        metrics file, trackers, progress bar, evaluation, checkpoints, profiler and watchdog;
        returns the per-step losses and the end summary."""
        if steps is not None:
            self.cfg.train.steps = steps
        if self.data is None:
            raise ValueError("Trainer.fit: give data= (e.g. paratrain.data.DatasetLoader); or call step() yourself")
        return run(self)

    # ------------------------------------------------------------------ reports
    def model_state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds (counted tensors)."""
        if isinstance(self.model, ZeroDataParallel):
            return self.model.memory_bytes(self.optimizer)
        params = list(self.model.parameters())
        opt = sum(t.numel() * t.element_size() for st in self.optimizer.state.values()
                  for t in st.values() if torch.is_tensor(t) and t.dim() > 0)
        return {"params": sum(p.numel() * p.element_size() for p in params),
                "grads": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
                "optimizer": opt}

    def memory_report(self) -> list[dict[str, int]]:
        """Per rank: model states by kind, the measured peak, and the rest of the peak above the
        memory in use before the model was built (activations, buffers, communication)."""
        states = self.model_state_bytes()
        peak = peak_memory_bytes(self.device)
        mine = [states["params"], states["grads"], states["optimizer"], peak, self.baseline_mem]
        report = []
        for row in self._gather(mine).tolist():
            r = dict(zip(("params", "grads", "optimizer", "peak"), map(int, row[:4])))
            r["activations_and_other"] = max(0, r["peak"] - int(row[4]) - r["params"] - r["grads"] - r["optimizer"])
            report.append(r)
        return report
