"""The Trainer: one optimizer step at a time, the same math in every layout.

A step takes the global batch of that step (a function of seed and step only), lets each
data-parallel rank run its slice in `microbatches` pieces, normalises every loss by the global
token count (so summed gradients are the gradient of the global mean loss), clips on the global
gradient norm, and applies AdamW with linear warm-up and cosine decay. One rank writes the
metrics file of DESIGN.md and shows a progress bar; all ranks contribute measured memory and
communication figures.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from paratrain.checkpoint import Checkpointer, agree_on_latest
from paratrain.comm import all_reduce, parse_compress
from paratrain.comm.flight import Watchdog
from paratrain.config import RunConfig, format_layout
from paratrain.data import ByteTokenizer, TokenLoader, load_corpus, split_microbatches
from paratrain.mesh import Mesh, coords_of
from paratrain.models.gpt import PRESETS, build_model, count_params
from paratrain.optim import DTYPES, LossScaler, adamw, clip_grad_norm, lr_at
from paratrain.parallel.activation import checkpoint_blocks
from paratrain.parallel.data import DataParallel
from paratrain.parallel.pipeline.executor import PipelineExecutor
from paratrain.parallel.pipeline.partition import build_stages, split_gpt
from paratrain.parallel.pipeline.schedule import bubble_fraction, build_schedule
from paratrain.parallel.pipeline.timeline import write_run_timeline
from paratrain.parallel.tensor import (GPT_PLAN, ColumnParallelLinear, TPGroup, parallelize_tensor,
                                       sync_sequence_parallel_grads, vocab_parallel_cross_entropy)
from paratrain.parallel.zero import ZeroDataParallel, blocks_of
from paratrain.planner import flops_per_token, gpu_peak_flops
from paratrain.profile import StepProfiler


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy, in fp32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


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

    def as_metrics(self) -> dict:
        extra = {"pipeline_idle": sum(self.idle_per_rank) / len(self.idle_per_rank)} if self.idle_per_rank else {}
        if self.loss_scale is not None:
            extra.update(loss_scale=self.loss_scale, skipped=self.skipped)
        return {
            "step": self.step,
            "loss": self.loss,
            "tokens": self.tokens,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens / self.step_time_s,
            "peak_mem_bytes": self.peak_mem_bytes,
            "comm_bytes": self.comm_bytes,
            "grad_norm": self.grad_norm,
            "lr": self.lr,
            **extra,
        }


class Trainer:
    def __init__(self, cfg: RunConfig, mesh: Mesh, device: torch.device | None = None):
        self.cfg = cfg
        self.mesh = mesh
        self.device = device or torch.device("cpu")
        self.rank = dist.get_rank()
        self.baseline_mem = peak_memory_bytes(self.device)  # before the model: the interpreter, torch
        self.dp_rank, self.dp = mesh.coord("dp"), mesh.size("dp")
        tr, lay = cfg.train, cfg.layout
        torch.manual_seed(tr.seed)  # the default generator agrees on every rank (dropout on replicas)
        model = build_model(cfg.model.name, tr.seed, cfg.model.dropout, cfg.model.tie_embeddings)
        self.n_params = count_params(model)
        # The fixed order of DESIGN.md: tensor parallel, then data parallel.
        model = parallelize_tensor(model.to(self.device), mesh, GPT_PLAN, lay.sequence_parallel, tr.seed)
        self.tp = TPGroup.from_mesh(mesh) if mesh.size("tp") > 1 else None
        self.pipeline: PipelineExecutor | None = None
        if mesh.size("pp") > 1:
            model = self._split_pipeline(model)
        tops = list(model) if self.pipeline else [model]
        # global names, the same in every layout (the last stage's tied head is the embedding)
        self.param_names: dict[int, str] = {}
        for top in tops:
            for name, p in top.named_parameters(remove_duplicate=False):
                tied_head = cfg.model.tie_embeddings and name == "head.weight"
                self.param_names.setdefault(id(p), "wte.weight" if tied_head else name)
        self.layout_name = f"{format_layout(lay)},schedule={lay.schedule},microbatches={lay.microbatches}"
        self.dtype = DTYPES[tr.precision]
        self.scaler = LossScaler(tr.precision == "fp16")
        self.cross_entropy = token_cross_entropy
        if tr.compile:  # each block's own computation, before the strategies wrap it (ZeRO-3's
            for top in tops:  # gathers stay outside the graphs); the blocks share their graphs
                for block in blocks_of(top):
                    block.forward = torch.compile(block.forward)
            # and the loss, so the fp32 upcast of the logits fuses into the softmax
            self.cross_entropy = torch.compile(token_cross_entropy)
        # ZeRO for stages 1-3, and for mixed precision (its stage 0 keeps fp32 masters)
        self.zero = lay.zero > 0 or self.dtype != torch.float32
        self.compressor = parse_compress(tr.compress, tr.compress_warmup)
        if self.zero:
            self.model = ZeroDataParallel(model, mesh, lay.zero, self.dtype, tops, tr.activation_checkpointing,
                                          compressor=self.compressor, names=self.param_names)
            decay, no_decay = self.model.master_params(True), self.model.master_params(False)
        else:
            self.model = DataParallel(model, mesh, bucket_mb=tr.bucket_mb, compressor=self.compressor)
            decay = [p for p in model.parameters() if p.dim() >= 2]
            no_decay = [p for p in model.parameters() if p.dim() < 2]
        if tr.activation_checkpointing:
            checkpoint_blocks(tops)
        if self.pipeline:
            self.pipeline.no_sync = self.model.no_sync
            self.pipeline.act_dtype = self.dtype
        self.optimizer = adamw([{"params": decay, "weight_decay": tr.weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr, betas=(tr.beta1, tr.beta2))
        corpus = load_corpus(cfg.data.path)
        self.corpus_bytes = corpus.size
        self.loader = TokenLoader(corpus, tr.seq_len, tr.global_batch, tr.seed, cfg.data.val_fraction)
        self.tokens_per_step = tr.global_batch * tr.seq_len
        # The rank whose loss counts: every dp replica holds a part of the global batch.
        self.is_loss_rank = mesh.coord("tp") == 0 and mesh.coord("pp") == mesh.size("pp") - 1
        # --simulate-failure RANK:STEP: a transient fault, raised in the first attempt only
        fail = tr.simulate_failure
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.fail_at = tuple(int(x) for x in fail.split(":")[:2]) if fail and first_attempt else None
        self.fail_kill = bool(fail) and fail.endswith(":kill")
        who, _, seconds = (tr.simulate_straggler or "-1:0").partition(":")
        self.straggle = float(seconds) if int(who) == self.rank else 0.0
        self.watchdog = Watchdog(mesh.comm.flight, tr.collective_timeout) if tr.collective_timeout > 0 else None
        self.ckpt = Checkpointer(self) if cfg.checkpoint.dir else None
        self.resumed_from = None
        if self.ckpt and (cfg.checkpoint.resume or not first_attempt):
            self._resume()

    def _resume(self) -> None:
        """Load the newest good checkpoint (rank 0 chooses; broken ones are skipped with a warning)."""
        folder = agree_on_latest(self.cfg.checkpoint.dir, self.cfg)
        if folder is None:
            return  # nothing saved yet: a restart starts over
        step = self.ckpt.load(folder)
        self.resumed_from = folder
        if self.rank == 0:
            print(f"paratrain: resumed from {folder} (step {step}) into {self.layout_name}", flush=True)

    def after_load(self) -> None:
        """After a checkpoint was loaded into the masters: refresh what compute uses."""
        if self.zero:
            self.model.publish()

    def _split_pipeline(self, model) -> torch.nn.ModuleList:
        """Cut the (tensor-parallel) model into balanced stages and keep this rank's chunks."""
        cfg, lay, mesh = self.cfg, self.cfg.layout, self.mesh
        p, pp_rank = mesh.size("pp"), mesh.coord("pp")
        v = lay.virtual_stages if lay.schedule == "interleaved" else 1
        splits = split_gpt(PRESETS[cfg.model.name], cfg.train.seq_len, p * v)
        if self.rank == 0:
            print("paratrain: pipeline stages (blocks): "
                  + " ".join(f"{s}:[{r.start}-{r.stop - 1}]" for s, r in enumerate(splits)), flush=True)
        chunks = build_stages(model, splits, pp_rank, p)
        self.tied = None
        if cfg.model.tie_embeddings:  # first and last stage each hold the shared embedding matrix
            if chunks[0].first:
                self.tied = chunks[0].wte.weight
            if chunks[-1].last:
                self.tied = chunks[-1].head.weight
                self.tied.pp_duplicate = True  # counted once, on the first stage, in the norm
            if self.tied is not None:
                self.tied.pp_tied = True  # ZeRO keeps it in a flat group of its own
        table = build_schedule(lay.schedule, p, lay.microbatches, v)
        self.bubble_theory = bubble_fraction(table, p)
        seq = cfg.train.seq_len // (mesh.size("tp") if lay.sequence_parallel else 1)
        micro = cfg.train.global_batch // self.dp // lay.microbatches
        self.pipeline = PipelineExecutor(chunks, mesh, table[pp_rank], p * v,
                                         (micro, seq, PRESETS[cfg.model.name].d_model), self.device)
        return torch.nn.ModuleList(chunks)

    def _sync_tied_embedding(self) -> None:
        """The first stage's embedding and the last stage's head are one matrix in two places:
        add their gradients so both copies take the same step (Megatron's embedding group)."""
        if self.pipeline and self.tied is not None:
            if self.zero:
                self.model.all_reduce_grads("pp_tied", self.mesh.embedding_group)
            else:
                all_reduce(self.tied.grad, self.mesh.embedding_group, self.mesh.comm)

    # ------------------------------------------------------------------ one step
    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self._loss_of_logits(self.model(inputs.to(self.device)), targets, scale)

    def _loss_of_logits(self, logits: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """This micro-batch's part of the global mean loss (times the fp16 loss scale), in fp32."""
        targets = targets.to(self.device)
        if self.tp is not None:  # logits are split along the vocabulary
            loss = vocab_parallel_cross_entropy(logits.float(), targets, self.tp).sum()
        else:
            loss = self.cross_entropy(logits, targets)
        return loss * (scale / self.tokens_per_step)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor | float, float]:
        """Forward, backward and update for `step`. Returns (this rank's loss part, grad norm, lr),
        the first two as device tensors; a skipped fp16 step sets `self.skipped`."""
        tr = self.cfg.train
        if self.fail_at == (self.rank, step):
            if self.fail_kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"simulated failure of rank {self.rank} at step {step} (--simulate-failure)")
        if self.straggle:
            time.sleep(self.straggle)  # --simulate-straggler
        self.model.train()
        self.model.zero_grad()
        if self.compressor is not None:
            self.compressor.begin_step(step)
        micro = split_microbatches(self.loader.next(self.dp_rank, self.dp), self.cfg.layout.microbatches)
        scale = self.scaler.scale
        if self.pipeline:
            loss_part = self.pipeline.run([mb.inputs for mb in micro],
                                          lambda logits, i: self._loss_of_logits(logits, micro[i].targets, scale))
        else:
            loss_part = torch.zeros((), device=self.device)
            for i, mb in enumerate(micro):
                sync = i == len(micro) - 1  # communicate only after the last micro-batch
                with nullcontext() if sync else self.model.no_sync():
                    loss = self._loss(mb.inputs, mb.targets, scale)
                    loss.backward()
                loss_part += loss.detach()
        loss_part = loss_part / scale
        self.model.finish_grad_sync()
        self._sync_tied_embedding()
        lr = lr_at(step, tr.lr, tr.warmup_steps, tr.steps, tr.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.skipped = False
        if self.zero:
            if self.cfg.layout.sequence_parallel:
                self.model.all_reduce_grads("sequence_parallel", self.mesh.group("tp"))
            self.skipped = self.model.unscale_grads(scale)
            self.scaler.update(self.skipped)
            if self.skipped:  # fp16 overflow: no update, a smaller scale next step
                return loss_part, float("nan"), lr
            grad_norm = clip_grad_norm(self.model.grad_parts(), self.mesh, tr.grad_clip, self.cfg.layout.zero > 0)
            self.optimizer.step()
            self.model.publish()
        else:
            sync_sequence_parallel_grads(self.model, self.mesh)
            grad_norm = clip_grad_norm([(p.grad, p) for p in self.model.parameters()], self.mesh, tr.grad_clip)
            self.optimizer.step()
        return loss_part, grad_norm, lr

    def _gather(self, values: list[float]) -> torch.Tensor:
        """All ranks' `values` as a (world, len) float64 tensor on CPU (one small collective)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        flight = self.mesh.comm.flight  # not communication of the step, but a place to hang
        flight.begin(flight.record("all_gather (metrics)", t, None))
        dist.all_gather(out, t)
        flight.end()
        return torch.stack(out).cpu()

    def step(self, step: int) -> StepStats:
        self.mesh.comm.reset()
        self.mesh.comm.flight.step = step
        scale = self.scaler.scale
        t0 = time.perf_counter()
        loss_part, grad_norm, lr = self.train_step(step)
        loss_value = float(loss_part) if self.is_loss_rank else 0.0  # float() waits for the device
        grad_norm = float(grad_norm)  # a device tensor until now, so the step ran without waiting
        dt = time.perf_counter() - t0
        idle = self.pipeline.idle_fraction() if self.pipeline else 0.0
        g = self._gather([loss_value, self.mesh.comm.bytes, peak_memory_bytes(self.device), dt, idle])
        self.peak_per_rank = [int(x) for x in g[:, 2]]
        return StepStats(
            step=step,
            loss=float(g[:, 0].sum()),
            tokens=self.tokens_per_step,
            step_time_s=float(g[:, 3].max()),
            peak_mem_bytes=max(self.peak_per_rank),
            comm_bytes=int(g[:, 1].sum()),
            grad_norm=grad_norm,
            lr=lr,
            idle_per_rank=[float(x) for x in g[:, 4]] if self.pipeline else None,
            loss_scale=scale if self.scaler.enabled else None,
            skipped=self.skipped,
        )

    def model_state_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank holds (counted tensors)."""
        if self.zero:
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
        keys = ("params", "grads", "optimizer", "peak")
        report = []
        for row in self._gather(mine).tolist():
            r = dict(zip(keys, map(int, row[:4])))
            r["activations_and_other"] = max(0, r["peak"] - int(row[4]) - r["params"] - r["grads"] - r["optimizer"])
            report.append(r)
        return report

    def pipeline_report(self, steps: list[StepStats]) -> dict:
        """Measured idle fraction per pipeline stage (mean over the given steps and over the
        dp x tp ranks of that stage) beside the schedule's theoretical bubble."""
        stage_of_rank = [coords_of(r, self.mesh.shape)["pp"] for r in range(self.mesh.world_size)]
        per_stage = []
        for stage in range(self.mesh.size("pp")):
            ranks = [r for r, s in enumerate(stage_of_rank) if s == stage]
            per_stage.append(sum(st.idle_per_rank[r] for st in steps for r in ranks) / (len(steps) * len(ranks)))
        return {"pipeline_idle_per_stage": per_stage, "pipeline_bubble_theory": self.bubble_theory}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per token over `eval_batches` fixed batches of the held-out split."""
        self.model.eval()
        total = 0.0
        n = self.cfg.train.eval_batches
        for i in range(1, n + 1):
            b = self.loader.local_batch(i, self.dp_rank, self.dp, split="val")
            if self.pipeline:
                micro = split_microbatches(b, self.cfg.layout.microbatches)
                loss = float(self.pipeline.run([mb.inputs for mb in micro],
                                               lambda logits, j: self._loss_of_logits(logits, micro[j].targets),
                                               forward_only=True))
            else:
                loss = float(self._loss(b.inputs, b.targets))  # every rank: the forward has collectives
            total += loss if self.is_loss_rank else 0.0
        return float(self._gather([total / n])[:, 0].sum())

    def sample(self, prompt: str = "def ", n_new: int = 120) -> str:
        """A few generated bytes. Under tp every rank of the tp group takes part (the head
        gathers its vocabulary shards); not available with sequence parallelism."""
        tok = ByteTokenizer()
        idx = torch.tensor([tok.encode(prompt)], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        model = self.model.module
        model.eval()
        head = model.head if isinstance(model.head, ColumnParallelLinear) else None
        if head is not None:
            head.gather_output = True
        try:
            out = model.generate(idx, n_new, generator=gen)
        finally:
            if head is not None:
                head.gather_output = False
        return tok.decode(out[0].tolist())

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict:
        tr = self.cfg.train
        lead = self.rank == 0
        layout = format_layout(self.cfg.layout)
        metrics = open(tr.metrics, "w") if (lead and tr.metrics) else None

        def emit(record: dict) -> None:
            if metrics:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()

        emit({"event": "start", "layout": layout, "world_size": self.mesh.world_size,
              "params": self.n_params, "config": self.cfg.to_dict()})
        if lead:
            print(f"paratrain: training {self.cfg.model.name} ({self.n_params / 1e6:.2f}M parameters) on "
                  f"{self.cfg.data.path} ({self.corpus_bytes / 1e6:.1f} MB) with {layout}, "
                  f"{tr.global_batch} x {tr.seq_len} tokens per step, device {self.device.type}", flush=True)
        bar = tqdm(total=tr.steps, disable=not (lead and tr.progress), desc="train", unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        losses, val_losses, times, steps_seen = [], [], [], []
        first = last = None
        profiler = StepProfiler(tr.profile, max(self.loader.step, tr.steps - tr.profile_steps + 1), tr.steps,
                                self.rank, self.device)
        for k in range(self.loader.step, tr.steps + 1):
            with profiler.around(k):
                s = self.step(k)
            losses.append(s.loss)
            times.append(s.step_time_s)
            steps_seen.append(s)
            first = first or s
            last = s
            emit(s.as_metrics())
            bar.set_postfix(loss=f"{s.loss:.3f}", tok_s=f"{s.tokens / s.step_time_s:,.0f}")
            bar.update(1)
            if tr.eval_every and k % tr.eval_every == 0 and k != tr.steps:
                val_losses.append((k, self.evaluate()))
                emit({"event": "eval", "step": k, "val_loss": val_losses[-1][1]})
            if self.ckpt:
                self.ckpt.poll()
                if self.cfg.checkpoint.every and k % self.cfg.checkpoint.every == 0:
                    self.ckpt.save(k)
                    emit({"event": "checkpoint", "step": k, "async": self.cfg.checkpoint.async_save,
                          **({"blocked_s": self.ckpt.events[-1]["blocked_s"]} if not self.ckpt.pending else {})})
        bar.close()
        if self.ckpt:
            self.ckpt.wait()
        if self.watchdog:
            self.watchdog.stop()
        if self.pipeline and tr.timeline:
            lay = self.cfg.layout
            write_run_timeline(self.pipeline, self.mesh, tr.timeline,
                               f"{format_layout(lay)} {lay.schedule}, {lay.microbatches} micro-batches (step {tr.steps})")
        val = self.evaluate()
        val_losses.append((tr.steps, val))
        steady = times[1:] or times  # the first step pays for warm-up; leave it out if we can
        throughput = self.tokens_per_step * len(steady) / sum(steady) if steady else 0.0
        # model FLOP/s per device, and on a known GPU in bf16/fp16 their share of its peak (MFU)
        tflops = throughput * flops_per_token(PRESETS[self.cfg.model.name], tr.seq_len) / self.mesh.world_size / 1e12
        peak = gpu_peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        mfu = tflops * 1e12 / peak if peak and self.dtype != torch.float32 else None
        if last is None:  # resumed from a checkpoint of the last step: nothing left to train
            first = last = StepStats(tr.steps, float("nan"), 0, 1.0, 0, 0, 0.0, 0.0)
            self.peak_per_rank = [peak_memory_bytes(self.device)] * self.mesh.world_size
        # under ZeRO-3 every dp rank takes part in the gathers of the parameters
        samplers = ((self.mesh.coord("dp") == 0 or self.cfg.layout.zero == 3)
                    and not self.pipeline and not self.cfg.layout.sequence_parallel)
        sample = self.sample() if samplers else ""
        memory = self.memory_report()
        steady_steps = steps_seen[1:] or steps_seen
        pipe = self.pipeline_report(steady_steps) if self.pipeline else {}
        summary = {
            "event": "end",
            "steps": tr.steps,
            "final_loss": last.loss,
            "first_loss": first.loss,
            "val_loss": val,
            "tokens_per_s": throughput,
            "tflops_per_device": tflops,
            "mfu": mfu,
            "peak_mem_bytes_per_rank": self.peak_per_rank,
            "param_bytes_per_rank": [m["params"] for m in memory],
            "memory_per_rank": memory,
            "checkpoints": self.ckpt.events if self.ckpt else [],
            "resumed_from": self.resumed_from,
            "layout": layout,
            "sample": sample,
            **pipe,
        }
        emit(summary)
        if metrics:
            metrics.close()
        if lead:
            mem = ", ".join(f"rank {r} {b / 2**20:,.0f} MiB" for r, b in enumerate(self.peak_per_rank))
            mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
            states = "; ".join(f"rank {r} {mib(m['params'])} + {mib(m['grads'])} + {mib(m['optimizer'])}"
                               for r, m in enumerate(memory))
            print(f"paratrain: done. loss {first.loss:.3f} (step {first.step}) -> {last.loss:.3f} (step {tr.steps}), "
                  f"validation loss {val:.3f}", flush=True)
            flops = f"{tflops:.3g} TFLOP/s per device" + (f", MFU {mfu:.1%}" if mfu is not None else "")
            print(f"  throughput {throughput:,.0f} tokens/s over steps 2-{tr.steps} ({flops}); peak memory: {mem}")
            print(f"  model states (MiB, parameters + gradients + optimizer): {states}")
            if pipe:
                idle = ", ".join(f"stage {i} {f:.1%}" for i, f in enumerate(pipe["pipeline_idle_per_stage"]))
                print(f"  pipeline idle (measured): {idle}; schedule bubble (theory) {self.bubble_theory:.1%}")
            if sample:
                print(f"  sample: {sample!r}", flush=True)
        return {"losses": losses, "val_losses": val_losses, **summary}
