"""Tokens/s and peak memory of paratrain's ZeRO-3 against torch FSDP2 (`fully_shard`), same run.

Both contenders train the same GPT or Llama preset (`--model`; GPT untied unless `--tied`, no
dropout) from the same seed on the same deterministic batches, with the same world size, global
batch and AdamW (lr 1e-3, no weight decay, one parameter group), in fp32 or, with `--precision
bf16`, bf16 compute over fp32 masters with fp32 reductions (FSDP2: MixedPrecisionPolicy with
param_dtype bf16, reduce_dtype fp32). FSDP2 follows the usual recipe: `fully_shard` on each block
of `model.blocks`, then on the root. paratrain sums gradients over dp (the loss is divided by the
global token count), FSDP2 averages them (each rank takes its local mean loss), so both compute
the same gradient; their losses at the first step and at the last, after the updates, must agree
in every round (exit status 1 if not). `--timeline` profiles one more step of the first round
(memtimeline.py): live tensor bytes per phase and what is alive at the peak.

Peak memory is a per-process high-water mark, so every round spawns fresh ranks for each
contender in turn (ours, fsdp2, ours, fsdp2, ...; the noise of a shared machine falls on both).
A spawn runs the warm-up and timed steps and reports tokens/s and its peak memory: on CPU the
peak resident set (ru_maxrss) minus the resident set just before the model is built, on CUDA
torch.cuda.max_memory_allocated minus the memory allocated before it; the max over ranks. The
spawned processes get MALLOC_MMAP_THRESHOLD_=65536, so glibc serves large tensors with mmap and
returns them to the OS when freed: the resident set then follows the live tensors. Model-state
bytes per rank (parameters, gradients, optimizer state incl. ours' fp32 masters) are printed for
reference: ours from `engine.memory_bytes(optimizer)`, FSDP2's from its local shards.

    python benchmarks/zero3_vs_fsdp2.py --world 2 --rounds 2 --timeline
    python benchmarks/zero3_vs_fsdp2.py --world 4 --model llama-small --rounds 2 --precision bf16
    python benchmarks/zero3_vs_fsdp2.py --world 2 --model gpt2 --seq-len 128 --global-batch 4 --steps 3 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import memtimeline
from common import peer_parser, print_speed, spawn_ranks
from paratrain.data import TokenLoader, load_corpus
from paratrain.launch import threads_per_worker
from paratrain.mesh import Mesh
from paratrain.models.gpt import PRESETS, build_model
from paratrain.models.llama import build_llama
from paratrain.parallel.zero import ZeroDataParallel

CONTENDERS = ("zero3", "fsdp2")
MiB = 2**20


def current_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as fh:  # size resident shared ... (in pages)
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def fsdp2_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """This rank's shards of FSDP2's parameters, gradients and AdamW moments."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = list(model.parameters())
    return {"params": sum(local(p) for p in params),
            "grads": sum(local(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(local(t) for st in optimizer.state.values() for t in st.values()
                             if torch.is_tensor(t) and t.dim() > 0)}


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    """One rank of one contender (`args.contender`): warm-up, timed steps, figures to `out`."""
    torch.set_num_threads(threads_per_worker(world))
    device = torch.device(args.device, rank if args.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)
    loader = TokenLoader(load_corpus("stdlib"), args.seq_len, args.global_batch, seed=0)
    tokens = args.global_batch * args.seq_len
    zero3 = args.contender == "zero3"
    if zero3:
        mesh = Mesh.build(dp=world, device_type=device.type)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
    dist.barrier()
    base = current_bytes(device)  # the interpreter, torch, the process group, the corpus
    if args.model in PRESETS:
        model = build_model(args.model, seed=0, dropout=0.0, tie_embeddings=args.tied).to(device)
    else:
        model = build_llama(args.model, seed=0).to(device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    if zero3:
        engine = ZeroDataParallel(model, mesh, stage=3, dtype=dtype, tops=[model])
        params = engine.master_params(True) + engine.master_params(False)
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        engine, params = model, list(model.parameters())
    opt = torch.optim.AdamW([{"params": params}], lr=1e-3, weight_decay=0.0)

    def step(i: int) -> float:
        """One training step on batch `i`; returns this rank's share of the global mean loss."""
        b = loader.local_batch(i, rank, world)
        inputs, targets = b.inputs.to(device), b.targets.to(device)
        if zero3:
            engine.zero_grad()
        else:
            opt.zero_grad()
        with memtimeline.phase("forward"):
            logits = engine(inputs).float()
            if zero3:  # the global mean: gradients are summed over ranks
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / tokens
            else:  # FSDP2 averages gradients over ranks: each rank takes its local mean
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="mean")
            del logits
        with memtimeline.phase("backward"):
            loss.backward()
        if zero3:
            with memtimeline.phase("reduce"):
                engine.finish_grad_sync()
                engine.unscale_grads(1.0)
            with memtimeline.phase("optimizer"):
                opt.step()
            with memtimeline.phase("publish"):
                engine.publish()
        else:
            with memtimeline.phase("optimizer"):
                opt.step()
        return float(loss.detach()) * (1.0 if zero3 else 1.0 / world)

    first = torch.tensor([step(1)], dtype=torch.float64, device=device)
    for i in range(2, 1 + args.warmup):
        step(i)
    dist.all_reduce(first)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for i in range(1 + args.warmup, 1 + args.warmup + args.steps):
        last = step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    tps = tokens * args.steps / (time.perf_counter() - t0)
    last = torch.tensor([last], dtype=torch.float64, device=device)
    dist.all_reduce(last)
    state = engine.memory_bytes(opt) if zero3 else fsdp2_state_bytes(model, opt)
    peak = float(peak_bytes(device) - base)  # before the profiler, which holds memory of its own
    timeline = None
    if args.timeline:  # one more step, profiled (every rank runs it; rank 0 reports)
        prof = memtimeline.record(lambda: step(1 + args.warmup + args.steps), device)
        timeline = memtimeline.summary(prof, device) if rank == 0 else None
    peak_t = torch.tensor([peak], dtype=torch.float64, device=device)
    dist.all_reduce(peak_t, op=dist.ReduceOp.MAX)
    # gloo's worker thread drops its reference to a finished collective's tensors after the wait
    # returns, and that needs the GIL: were the interpreter already finalising, the thread would
    # exit inside a C++ destructor and abort the process (SIGABRT, "terminate called without an
    # active exception", seen about 1 run in 15 with --timeline). A barrier releases the GIL.
    dist.barrier()
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"tokens_per_s": tps, "first_loss": float(first), "last_loss": float(last),
                       "peak_bytes": float(peak_t), "state_bytes": state,
                       "timeline": timeline}, fh)
    dist.destroy_process_group()


def main() -> None:
    p = peer_parser(__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="what compute sees (bf16: fp32 masters and fp32 reductions, FSDP2's MixedPrecisionPolicy)")
    p.add_argument("--tied", action="store_true", help="tie the GPT's head to its embedding")
    p.add_argument("--timeline", action="store_true",
                   help="profile one more step of the first round: live memory per phase, what is alive at the peak")
    args = p.parse_args()
    if args.global_batch % args.world:
        p.error(f"--global-batch {args.global_batch} must be a multiple of --world {args.world}")
    if min(args.warmup, args.steps, args.rounds) < 1:
        p.error("--warmup, --steps and --rounds must be at least 1 (the loss check uses the first warm-up step)")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks (see the docstring)
    runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for k in range(args.rounds):
        for contender in CONTENDERS:
            spawn_args = argparse.Namespace(**{**vars(args), "timeline": args.timeline and k == 0}, contender=contender)
            runs[contender].append(spawn_ranks(worker, args.world, spawn_args))
    res = {"tokens_per_s": {c: [r["tokens_per_s"] for r in runs[c]] for c in CONTENDERS},
           "first_loss": {c: runs[c][0]["first_loss"] for c in CONTENDERS},
           "last_loss": {c: [r["last_loss"] for r in runs[c]] for c in CONTENDERS},
           "peak_bytes": {c: [r["peak_bytes"] for r in runs[c]] for c in CONTENDERS},
           "state_bytes": {c: runs[c][0]["state_bytes"] for c in CONTENDERS}}
    ratio = print_speed(res, "zero3", "fsdp2")
    print("\npeak memory above the pre-model baseline, max over ranks (median, min, max over rounds)")
    print(f"{'contender':<10} {'peak MiB median':>16} {'min':>9} {'max':>9}   model states MiB/rank "
          "(params + grads + optimizer)")
    for c in CONTENDERS:
        pk, st = [b / MiB for b in res["peak_bytes"][c]], res["state_bytes"][c]
        print(f"{c:<10} {statistics.median(pk):>16,.1f} {min(pk):>9,.1f} {max(pk):>9,.1f}   "
              f"{sum(st.values()) / MiB:,.1f} ({' + '.join(f'{v / MiB:,.1f}' for v in st.values())})")
    if args.timeline:
        print("\nmemory timeline of one step (rank 0; tensors only, as torch's memory profiler sees them)")
        for c in CONTENDERS:
            print(memtimeline.render(c, runs[c][0]["timeline"]))
    res["timeline"] = {c: runs[c][0]["timeline"] for c in CONTENDERS}
    mem_ratio = statistics.median(res["peak_bytes"]["zero3"]) / statistics.median(res["peak_bytes"]["fsdp2"])
    ours, peer = res["first_loss"]["zero3"], res["first_loss"]["fsdp2"]
    agree = math.isclose(ours, peer, rel_tol=1e-5)
    print(f"\nfirst-step loss: zero3 {ours:.6f}, fsdp2 {peer:.6f}: {'agree' if agree else 'DIFFER'}")
    last = res["last_loss"]
    agree_last = all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(last["zero3"], last["fsdp2"]))
    print(f"loss of step {args.warmup + args.steps} (after the updates; every round): zero3 "
          f"{', '.join(f'{x:.6f}' for x in last['zero3'])}, fsdp2 {', '.join(f'{x:.6f}' for x in last['fsdp2'])}: "
          f"{'agree' if agree_last else 'DIFFER'}")
    print(f"ratio zero3/fsdp2 tokens/s: {ratio:.2f}x, peak memory: {mem_ratio:.2f}x (world {args.world}, "
          f"model {args.model}, batch {args.global_batch}x{args.seq_len}, {args.device}, "
          f"{args.rounds} rounds of {args.warmup}+{args.steps} steps, torch {torch.__version__})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "ratio": ratio, "peak_ratio": mem_ratio, "first_loss_agree": agree,
                       "last_loss_agree": agree_last, "args": vars(args)}, fh, indent=1)
    if not (agree and agree_last):
        raise SystemExit("the contenders disagree on the loss: they do not compute the same thing")


if __name__ == "__main__":
    main()
