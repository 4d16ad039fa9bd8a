"""Tokens/s of a Horovod-style training loop through `paratrain.horovod` against the same model
under torch DistributedDataParallel, same run.

The Horovod contender is written as a Horovod script is (`hvd.init()`, `hvd.DistributedOptimizer`
around AdamW with `named_parameters`, `hvd.broadcast_parameters`, the loss a rank's local mean,
`optimizer.zero_grad(); loss.backward(); optimizer.step()`); under it paratrain's bucketed data
parallelism averages the gradients. Both train the same GPT preset from the same seed on the same
batches with the same world size, global batch and bucket size (25 MB, DDP's default); they
alternate in rounds so the noise of a shared machine falls on both, and the median tokens/s of each
is reported with the ratio horovod / DDP and the first-step losses (which must agree).

    python benchmarks/horovod_vs_ddp.py --world 2
    python benchmarks/horovod_vs_ddp.py --world 4 --model tiny --json horovod_vs_ddp.json
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
import paratrain.horovod as hvd
from paratrain.data import TokenLoader, load_corpus
from paratrain.launch import threads_per_worker
from paratrain.models.gpt import build_model


def build(contender: str, args: argparse.Namespace):
    """The same model from the same seed and its AdamW, the Horovod way or under DDP."""
    model = build_model(args.model, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if contender == "horovod":
        optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(optimizer, root_rank=0)
        return model, optimizer
    return DistributedDataParallel(model), optimizer


def train_steps(model, optimizer, loader: TokenLoader, first: int, n: int, world: int) -> float:
    """Run `n` steps from batch `first`; return this rank's local mean loss of the first step."""
    rank, first_loss = dist.get_rank(), 0.0
    for step in range(first, first + n):
        b = loader.local_batch(step, rank, world)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(b.inputs).flatten(0, 1), b.targets.flatten())  # both average over ranks
        loss.backward()
        optimizer.step()
        if step == first:
            first_loss = float(loss.detach()) / world
    return first_loss


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(threads_per_worker(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    hvd.init()  # joins the group already there, as under horovodrun
    loader = TokenLoader(load_corpus("stdlib"), args.seq_len, args.global_batch, seed=0)
    tokens = args.global_batch * args.seq_len
    results: dict[str, list[float]] = {"horovod": [], "ddp": []}
    first_losses: dict[str, float] = {}
    for _ in range(args.rounds):
        for contender in results:
            model, opt = build(contender, args)
            loss = torch.tensor([train_steps(model, opt, loader, 1, args.warmup, world)])
            dist.all_reduce(loss)
            first_losses[contender] = float(loss)
            dist.barrier()
            t0 = time.perf_counter()
            train_steps(model, opt, loader, 1 + args.warmup, args.steps, world)
            dist.barrier()
            results[contender].append(tokens * args.steps / (time.perf_counter() - t0))
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"tokens_per_s": results, "first_loss": first_losses}, fh)
    dist.destroy_process_group()


def main() -> None:
    p = peer_parser(__doc__, warmup=3, steps=20)
    p.add_argument("--world", type=int, default=2)
    detail = lambda a: (f"world {a.world}, model {a.model}, batch {a.global_batch}x{a.seq_len}, "  # noqa: E731
                        f"{a.rounds} rounds of {a.steps} steps")
    run_peer(p, worker, "horovod", "ddp", detail)


if __name__ == "__main__":
    main()
