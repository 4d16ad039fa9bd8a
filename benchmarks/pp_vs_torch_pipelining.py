"""Pipeline parallelism: tokens/s of paratrain's 1F1B executor against torch's own
`torch.distributed.pipelining.Schedule1F1B`, same model split, same run.

Both contenders cut the same GPT preset (untied head, so no embedding group is needed) into the
same balanced stages (`split_gpt` + `build_stages`, one stage per rank, world = pp), start from
the same seed, train on the same deterministic batches (every rank loads the full global batch:
the first stage feeds the inputs, the last computes the loss) with the same AdamW, and split each
batch into the same micro-batches. The loss of a micro-batch is its summed cross-entropy over the
tokens of the whole global batch, so the micro-batch losses add up to the global mean; torch's
schedule is told not to rescale gradients (`scale_grads=False`), so both take the same gradient.
The first warm-up step's loss and gradient norm of each contender are printed and must agree.
Contenders alternate in rounds (ours, torch, ours, torch, ...) so that the noise of a shared
machine falls on both; the median tokens/s of each is reported with the ratio ours / torch,
and paratrain's measured idle fraction per rank beside the schedule's theoretical bubble.

    python benchmarks/pp_vs_torch_pipelining.py --pp 2
    python benchmarks/pp_vs_torch_pipelining.py --pp 4 --microbatches 8
    python benchmarks/pp_vs_torch_pipelining.py --pp 2 --microbatches 8 --json pp_vs_pipelining.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage as TorchPipelineStage
from torch.distributed.pipelining import Schedule1F1B

from common import peer_parser, print_speed, spawn_ranks
from paratrain.data import Batch, TokenLoader, load_corpus, split_microbatches
from paratrain.launch import threads_per_worker
from paratrain.mesh import Mesh
from paratrain.models.gpt import PRESETS, build_model
from paratrain.parallel.pipeline.executor import PipelineExecutor
from paratrain.parallel.pipeline.partition import build_stages, split_gpt
from paratrain.parallel.pipeline.schedule import bubble_fraction, build_schedule

CONTENDERS = ("paratrain", "pipelining")
DEVICE = torch.device("cpu")


def build(contender: str, args: argparse.Namespace, mesh: Mesh, tokens: int):
    """The same stage of the same model from the same seed, driven by `contender`; returns
    (step function, executor or None, optimizer). `step(batch)` runs forward and backward of the
    whole global batch and returns this rank's part of the global mean loss (zero except on the
    last stage)."""
    pp, pp_rank, m = args.pp, mesh.coord("pp"), args.microbatches
    model = build_model(args.model, seed=0, dropout=0.0, tie_embeddings=False)
    splits = split_gpt(PRESETS[args.model], args.seq_len, pp)
    (stage,) = build_stages(model, splits, pp_rank, pp)
    opt = torch.optim.AdamW(stage.parameters(), lr=1e-3)

    def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Summed over the micro-batch, divided by the tokens of the global batch: the m losses
        # add up to the global mean, as in paratrain's Trainer.
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum") / tokens

    if contender == "paratrain":
        micro_shape = (args.global_batch // m, args.seq_len, PRESETS[args.model].d_model)
        executor = PipelineExecutor([stage], mesh, build_schedule("1f1b", pp, m)[pp_rank], pp, micro_shape, DEVICE)

        def step(b: Batch) -> torch.Tensor:
            micro = split_microbatches(b, m)
            return executor.run([mb.inputs for mb in micro], lambda logits, i: loss_of(logits, micro[i].targets))

        return step, executor, opt

    peer_stage = TorchPipelineStage(stage, pp_rank, pp, DEVICE, group=mesh.group("pp"))
    # scale_grads=False: the loss is already normalised by the global token count, so torch must
    # not divide the gradients by the number of micro-batches (its default, meant for mean losses).
    schedule = Schedule1F1B(peer_stage, n_microbatches=m, loss_fn=loss_of, scale_grads=False)

    def step(b: Batch) -> torch.Tensor:
        if pp_rank == 0:
            schedule.step(b.inputs, return_outputs=False)
        elif pp_rank == pp - 1:
            losses: list[torch.Tensor] = []
            schedule.step(target=b.targets, losses=losses, return_outputs=False)
            return torch.stack(losses).detach().sum()
        else:
            schedule.step(return_outputs=False)
        return torch.zeros((), device=DEVICE)

    return step, None, opt


def grad_norm(params) -> float:
    """Global L2 norm of the gradients of all stages (each rank holds a disjoint part)."""
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is not None:
            sq += p.grad.detach().double().pow(2).sum()
    dist.all_reduce(sq)
    return math.sqrt(float(sq))


def run_steps(step: Callable, opt: torch.optim.Optimizer, loader: TokenLoader, first: int, n: int,
              executor: PipelineExecutor | None = None, idle: list[float] | None = None
              ) -> tuple[float, float]:
    """Run `n` training steps from batch `first`; return the first step's global mean loss and
    gradient norm (collectives, so only outside timing); collect ours' idle fraction in `idle`."""
    loss = norm = 0.0
    params = [p for g in opt.param_groups for p in g["params"]]
    for k in range(first, first + n):
        opt.zero_grad()
        part = step(loader.batch(k))  # the full global batch on every rank
        if executor is not None and idle is not None:
            idle.append(executor.idle_fraction())
        if k == first and idle is None:  # the check step, before the update
            t = part.detach().clone().reshape(1).double()
            dist.all_reduce(t)  # only the last stage holds a non-zero part
            loss, norm = float(t), grad_norm(params)
        opt.step()
    return loss, norm


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(threads_per_worker(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = Mesh.build(pp=world)
    loader = TokenLoader(load_corpus("stdlib"), args.seq_len, args.global_batch, seed=0)
    tokens = args.global_batch * args.seq_len
    speed: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    first_loss: dict[str, float] = {}
    first_norm: dict[str, float] = {}
    idle: list[float] = []  # ours, this rank, every timed step of every round
    for _ in range(args.rounds):
        for contender in CONTENDERS:
            step, executor, opt = build(contender, args, mesh, tokens)
            first_loss[contender], first_norm[contender] = run_steps(step, opt, loader, 1, args.warmup)
            dist.barrier()
            t0 = time.perf_counter()
            run_steps(step, opt, loader, 1 + args.warmup, args.steps, executor, idle)
            dist.barrier()
            speed[contender].append(tokens * args.steps / (time.perf_counter() - t0))
    mine = torch.tensor([sum(idle) / len(idle)], dtype=torch.float64)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        table = build_schedule("1f1b", args.pp, args.microbatches)
        splits = split_gpt(PRESETS[args.model], args.seq_len, args.pp)
        with open(out, "w") as fh:
            json.dump({
                "tokens_per_s": speed,
                "first_loss": first_loss,
                "first_grad_norm": first_norm,
                "idle_per_rank": [float(t) for t in gathered],
                "bubble_theory": (args.pp - 1) / (args.microbatches + args.pp - 1),
                "bubble_simulated": bubble_fraction(table, args.pp),
                "stages": [[r.start, r.stop - 1] for r in splits],
            }, fh)
    dist.destroy_process_group()


def main() -> None:
    p = peer_parser(__doc__)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    args = p.parse_args()
    if args.model not in PRESETS:
        p.error(f"--model must be one of {', '.join(PRESETS)}")
    if args.pp < 2:
        p.error("--pp must be at least 2")
    if args.pp > PRESETS[args.model].n_layer:
        p.error(f"--pp {args.pp} exceeds the {PRESETS[args.model].n_layer} blocks of {args.model}")
    if args.microbatches < args.pp:
        p.error(f"--microbatches {args.microbatches} must be at least --pp {args.pp} (1F1B)")
    if args.global_batch % args.microbatches:
        p.error(f"--global-batch {args.global_batch} must be a multiple of --microbatches {args.microbatches}")
    if args.seq_len > PRESETS[args.model].max_seq_len:
        p.error(f"--seq-len {args.seq_len} exceeds {args.model}'s max_seq_len {PRESETS[args.model].max_seq_len}")
    if min(args.warmup, args.steps, args.rounds) < 1:
        p.error("--warmup, --steps and --rounds must be at least 1 (the checks use the first warm-up step)")
    res = spawn_ranks(worker, args.pp, args)
    print("stages (blocks): " + " ".join(f"{s}:[{a}-{b}]" for s, (a, b) in enumerate(res["stages"])))
    ratio = print_speed(res, "paratrain", "pipelining")
    ours, peer = res["first_loss"]["paratrain"], res["first_loss"]["pipelining"]
    loss_agree = math.isclose(ours, peer, rel_tol=1e-5)
    print(f"first-step loss: paratrain {ours:.6f}, torch pipelining {peer:.6f}: "
          f"{'agree' if loss_agree else 'DIFFER'}")
    g_ours, g_peer = res["first_grad_norm"]["paratrain"], res["first_grad_norm"]["pipelining"]
    norm_agree = math.isclose(g_ours, g_peer, rel_tol=1e-4)
    print(f"first-step grad norm: paratrain {g_ours:.6f}, torch pipelining {g_peer:.6f}: "
          f"{'agree' if norm_agree else 'DIFFER'}")
    idle = ", ".join(f"stage {r} {f:.1%}" for r, f in enumerate(res["idle_per_rank"]))
    print(f"paratrain idle (measured, mean of timed steps): {idle}; mean "
          f"{sum(res['idle_per_rank']) / len(res['idle_per_rank']):.1%}; bubble (theory) "
          f"(p-1)/(m+p-1) = {res['bubble_theory']:.1%}, simulated schedule {res['bubble_simulated']:.1%}")
    print(f"ratio paratrain / torch pipelining: {ratio:.2f}x (pp {args.pp}, microbatches {args.microbatches}, "
          f"model {args.model}, batch {args.global_batch}x{args.seq_len}, {args.rounds} rounds of "
          f"{args.steps} steps, torch {torch.__version__})")
    agree = loss_agree and norm_agree
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "ratio": ratio, "first_loss_agree": loss_agree, "grad_norm_agree": norm_agree,
                       "args": vars(args)}, fh, indent=1)
    if not agree:
        raise SystemExit("the contenders disagree on the first step: they do not compute the same thing")


if __name__ == "__main__":
    main()
