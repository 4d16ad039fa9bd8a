"""Tokens/s of paratrain's data parallelism against torch DistributedDataParallel, same run.

Both contenders train the same GPT preset from the same seed on the same deterministic batches,
with the same world size, global batch, bucket size and AdamW optimizer. They alternate in
rounds (ours, ddp, ours, ddp, ...) so that the noise of a shared machine falls on both, and the
median tokens/s of each is reported with the ratio ours / DDP.

    python benchmarks/dp_vs_ddp.py --world 2
    python benchmarks/dp_vs_ddp.py --world 2 --bucket-mb 1 --json dp_vs_ddp.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from common import peer_parser, run_peer
from paratrain.data import TokenLoader, load_corpus
from paratrain.launch import threads_per_worker
from paratrain.mesh import Mesh
from paratrain.models.gpt import build_model
from paratrain.parallel.data import DataParallel


Wrapped = DataParallel | DistributedDataParallel


def build(contender: str, args: argparse.Namespace, mesh: Mesh) -> tuple[Wrapped, torch.optim.Optimizer]:
    """The same model from the same seed, wrapped by `contender`, and its AdamW."""
    model = build_model(args.model, seed=0)
    wrapped: Wrapped
    if contender == "paratrain":
        wrapped = DataParallel(model, mesh, bucket_mb=args.bucket_mb)
    else:
        wrapped = DistributedDataParallel(model, bucket_cap_mb=args.bucket_mb)
    return wrapped, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_steps(contender: str, model: Wrapped, optimizer: torch.optim.Optimizer, loader: TokenLoader,
                first: int, n: int, world: int) -> float:
    """Run `n` steps from batch `first`; return this rank's share of the first step's global mean
    loss (the shares sum to it over ranks)."""
    rank, tokens = dist.get_rank(), loader.global_batch * loader.seq_len
    first_loss = 0.0
    for step in range(first, first + n):
        b = loader.local_batch(step, rank, world)
        model.zero_grad()
        logits = model(b.inputs)
        if contender == "paratrain":  # the global mean: summed over ranks by the all-reduce
            loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten(), reduction="sum") / tokens
        else:  # DDP averages gradients over ranks, so each rank takes its local mean
            loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten())
        loss.backward()
        if contender == "paratrain":
            model.finish_grad_sync()
        optimizer.step()
        if step == first:
            first_loss = float(loss.detach()) * (1 if contender == "paratrain" else 1 / world)
    return first_loss


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(threads_per_worker(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = Mesh.build(dp=world)
    loader = TokenLoader(load_corpus("stdlib"), args.seq_len, args.global_batch, seed=0)
    tokens = args.global_batch * args.seq_len
    results: dict[str, list[float]] = {"paratrain": [], "ddp": []}
    first_losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for contender in results:
            model, opt = build(contender, args, mesh)
            loss = train_steps(contender, model, opt, loader, 1, args.warmup, world)
            t = torch.tensor([loss])
            dist.all_reduce(t)
            first_losses[contender] = float(t)
            dist.barrier()
            t0 = time.perf_counter()
            train_steps(contender, model, opt, loader, 1 + args.warmup, args.steps, world)
            dist.barrier()
            results[contender].append(tokens * args.steps / (time.perf_counter() - t0))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"tokens_per_s": results, "first_loss": first_losses}, fh)
    dist.destroy_process_group()


def main() -> None:
    p = peer_parser(__doc__, warmup=3, steps=20)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--bucket-mb", type=float, default=25.0)
    detail = lambda a: (f"world {a.world}, model {a.model}, batch {a.global_batch}x{a.seq_len}, "  # noqa: E731
                        f"bucket {a.bucket_mb:g} MB, {a.rounds} rounds of {a.steps} steps")
    run_peer(p, worker, "paratrain", "ddp", detail)


if __name__ == "__main__":
    main()
