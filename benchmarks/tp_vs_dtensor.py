"""Tensor parallelism: paratrain's Megatron-style layers against torch's own DTensor tensor
parallel (`torch.distributed.tensor.parallel`), same model, world size and batches, same run.

Both split the same GPT (untied head, so torch's plan needs no special case) the same way:
q, k, v and the MLP's first linear by columns, the projections by rows, embedding and head by
vocabulary, with the loss computed on vocabulary shards (ours: `vocab_parallel_cross_entropy`,
torch: `loss_parallel`). Contenders alternate in rounds; medians are reported with the ratio.
It also reports the parameter bytes each rank holds (block weights and all), which fall as 1/tp.

    python benchmarks/tp_vs_dtensor.py --tp 2
    python benchmarks/tp_vs_dtensor.py --tp 4 --model small
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    loss_parallel,
    parallelize_module,
)

from common import peer_parser, print_speed, spawn_ranks
from paratrain.data import TokenLoader, load_corpus
from paratrain.launch import threads_per_worker
from paratrain.mesh import Mesh
from paratrain.models.gpt import build_model
from paratrain.parallel.tensor import GPT_PLAN, TPGroup, parallelize_tensor, vocab_parallel_cross_entropy

TORCH_PLAN = {
    "wte": RowwiseParallel(input_layouts=Replicate()),
    "head": ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
}
for _name in ("attn.q", "attn.k", "attn.v", "mlp.fc"):
    TORCH_PLAN[f"blocks.*.{_name}"] = ColwiseParallel()
for _name in ("attn.proj", "mlp.proj"):
    TORCH_PLAN[f"blocks.*.{_name}"] = RowwiseParallel()


def local_bytes(model: torch.nn.Module, prefix: str = "") -> int:
    total = 0
    for name, p in model.named_parameters():
        if name.startswith(prefix):
            t = p.to_local() if hasattr(p, "to_local") else p
            total += t.numel() * t.element_size()
    return total


def build(contender: str, args: argparse.Namespace, mesh: Mesh):
    model = build_model(args.model, seed=0, tie_embeddings=False)
    if contender == "paratrain":
        model = parallelize_tensor(model, mesh, GPT_PLAN)
    else:
        model = parallelize_module(model, mesh.device_mesh["tp"], TORCH_PLAN)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)


def run_steps(contender: str, model, opt, loader: TokenLoader, first: int, n: int, tp: TPGroup) -> float:
    loss_value = 0.0
    for step in range(first, first + n):
        b = loader.batch(step)  # every tp rank sees the whole batch
        opt.zero_grad()
        logits = model(b.inputs)
        if contender == "paratrain":
            loss = vocab_parallel_cross_entropy(logits, b.targets, tp).mean()
            loss.backward()
        else:
            with loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten())
                loss.backward()
        opt.step()
        loss = loss.detach()
        loss_value = float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)
    return loss_value


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(threads_per_worker(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = Mesh.build(tp=world)
    tp = TPGroup.from_mesh(mesh)
    loader = TokenLoader(load_corpus("stdlib"), args.seq_len, args.global_batch, seed=0)
    tokens = args.global_batch * args.seq_len
    speed: dict[str, list[float]] = {"paratrain": [], "torch-tp": []}
    first_loss, memory = {}, {}
    for _ in range(args.rounds):
        for contender in speed:
            model, opt = build(contender, args, mesh)
            memory[contender] = {"blocks": local_bytes(model, "blocks."), "all": local_bytes(model)}
            first_loss[contender] = run_steps(contender, model, opt, loader, 1, 1, tp)
            run_steps(contender, model, opt, loader, 2, args.warmup, tp)
            dist.barrier()
            t0 = time.perf_counter()
            run_steps(contender, model, opt, loader, 2 + args.warmup, args.steps, tp)
            dist.barrier()
            speed[contender].append(tokens * args.steps / (time.perf_counter() - t0))
    full = build_model(args.model, seed=0, tie_embeddings=False)
    memory["unsharded"] = {"blocks": local_bytes(full, "blocks."), "all": local_bytes(full)}
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"tokens_per_s": speed, "first_loss": first_loss, "param_bytes_rank0": memory}, fh)
    dist.destroy_process_group()


def main() -> None:
    p = peer_parser(__doc__, global_batch=8)
    p.add_argument("--tp", type=int, default=2)
    args = p.parse_args()
    res = spawn_ranks(worker, args.tp, args)
    ratio = print_speed(res, "paratrain", "torch-tp")
    mem = res["param_bytes_rank0"]
    for name, m in mem.items():
        print(f"parameter bytes on rank 0, {name:<10}: blocks {m['blocks'] / 2**20:7.2f} MiB, "
              f"all {m['all'] / 2**20:7.2f} MiB")
    print(f"block weights per rank / unsharded: {mem['paratrain']['blocks'] / mem['unsharded']['blocks']:.3f} "
          f"(1/tp = {1 / args.tp:.3f})")
    print(f"ratio paratrain/torch-tp tokens/s: {ratio:.2f}x (tp {args.tp}, model {args.model}, "
          f"batch {args.global_batch}x{args.seq_len}, {args.rounds} rounds of {args.steps} steps, "
          f"torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "ratio": ratio, "args": vars(args)}, fh, indent=1)


if __name__ == "__main__":
    main()
