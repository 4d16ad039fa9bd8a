"""Per-rank memory of model states under ZeRO stages 0-3, measured, against the ZeRO paper.

Mixed precision as in the paper (bf16 parameters and gradients for compute, fp32 master weights
and Adam moments): for P parameters over N data-parallel ranks, each rank holds

    stage 0: 16P    stage 1: 2P + 2P + 12P/N    stage 2: 2P + 16P/N    stage 3: 16P/N  bytes.

(The paper's stage 2 has 14P/N: it counts the gradient shard in 2 bytes. Ours keeps it in fp32,
the reduction's dtype, which the optimizer reads anyway; stage 3 does too, and keeps no 2-byte
parameter shard: it gathers the fp32 master, cast on the way, as FSDP2 does.)

Every (stage, N) runs in a fresh set of N spawned gloo ranks (one thread each). A rank builds
the model, wraps it in `ZeroDataParallel`, and takes one training step with the exact sequence
of `Trainer.train_step` (zero_grad; forward and backward with the loss divided by the global
token count; finish_grad_sync; unscale_grads(1.0); AdamW over the fp32 masters; publish). The
first step is what creates Adam's moments, and after `publish()` the activations, the fp32
gradients of the masters and ZeRO-3's gathered buffers are all freed.

"Measured" is the process's current resident set size (/proc/self/statm, resident pages times
the page size) after that step and a gc.collect(), minus the RSS just before the model was
built (after a warm-up, below): real memory, not a sum over tensors. "Counted" is `engine.memory_bytes(optimizer)`, the
sum over the tensors the engine and optimizer hold, for comparison. The table shows the largest
measured value over the ranks (the per-rank values are in --json).

Freed memory must go back to the OS for RSS to mean anything. glibc serves a large malloc with
mmap and unmaps it on free, but its default threshold is dynamic: every freed mmap'd chunk raises
it (up to 32 MiB), so later tensors of a few MiB come from the heap and stay resident after
free (the fp32 model that is built before the engine flattens it into bf16 buffers, 4P bytes,
would partly survive like that, as would activations and ZeRO-3's gathered parameters). So the
workers get MALLOC_MMAP_THRESHOLD_=65536 (fixed: every block of 64 KiB or more is mmap'd and
unmapped on free) and MALLOC_TRIM_THRESHOLD_=0 (the heap top is returned at once). They are set
in os.environ before spawning; spawned interpreters inherit them and glibc reads them at start.

Before the baseline each rank takes the same step once on the `tiny` preset and drops it. The
first step of a process pays one-off costs that are not model states: building the first
torch.optim optimizer imports torch._dynamo and sympy (about 66 MiB of Python heap), and the
first forward/backward/step pages in some 15 MiB of libtorch code. Without the warm-up
(--no-warmup) they add about 94 MiB to every row. What remains is about 9 MiB of one-off state
for gpt2's shapes (a second gpt2 engine in the same process adds only its counted bytes + 1 MiB).

The optimizer's `step` counters are scalar tensors (negligible), and the model's build peak (4P
in fp32, then the engine's copies) is not what is measured: only what stays after the step.

    python benchmarks/zero_memory.py
    python benchmarks/zero_memory.py --stages 1 3 --worlds 2 --json zero_memory.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import spawn_ranks
from paratrain.data import TokenLoader, load_corpus
from paratrain.mesh import Mesh
from paratrain.models.gpt import build_model, count_params
from paratrain.parallel.zero import ZeroDataParallel

MIB = 1 << 20
TOLERANCE = 0.10


def rss_bytes() -> int:
    """The current resident set size of this process (not the peak)."""
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE")


def formula_bytes(stage: int, n: int, p: int) -> float:
    """The ZeRO paper's model-state bytes per rank (2 + 2 + 12 bytes per parameter), with the
    gradient shard of stages 2 and 3 in fp32 (4 bytes: the reduction's dtype) and no 2-byte
    parameter shard in stage 3 (the master is gathered), as ours keeps them."""
    return {0: 16 * p, 1: 2 * p + 2 * p + 12 * p / n, 2: 2 * p + 16 * p / n, 3: 16 * p / n}[stage]


def first_step(name: str, stage: int, mesh: Mesh, batch, tokens: int):
    """Build `name` under ZeRO `stage` and take one step as `Trainer.train_step` does; return
    (parameter count, engine, optimizer)."""
    model = build_model(name, seed=0)
    n_params = count_params(model)
    engine = ZeroDataParallel(model, mesh, stage, torch.bfloat16, tops=[model])
    del model  # the engine holds it as `engine.module`
    optimizer = torch.optim.AdamW([{"params": engine.master_params(True), "weight_decay": 0.1},
                                   {"params": engine.master_params(False), "weight_decay": 0.0}], lr=1e-4)
    engine.train()
    engine.zero_grad()
    logits = engine(batch.inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(), reduction="sum") / tokens
    loss.backward()
    del logits, loss
    engine.finish_grad_sync()
    engine.unscale_grads(1.0)
    optimizer.step()
    engine.publish()
    return n_params, engine, optimizer


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    mesh = Mesh.build(dp=world)
    global_batch = world * args.batch_per_rank
    loader = TokenLoader(load_corpus("stdlib", max_bytes=4 << 20), args.seq_len, global_batch, seed=0)
    batch = loader.local_batch(1, rank, world)
    tokens = global_batch * args.seq_len
    if not args.no_warmup:  # pay the one-off costs of the code path (see the docstring) on `tiny`
        first_step("tiny", args.stage, mesh, batch, tokens)
    gc.collect()
    before = rss_bytes()

    n_params, engine, optimizer = first_step(args.model, args.stage, mesh, batch, tokens)
    gc.collect()
    measured = rss_bytes() - before
    counted = sum(engine.memory_bytes(optimizer).values())

    mine = torch.tensor([measured, counted, n_params], dtype=torch.float64)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"measured": [int(t[0]) for t in every], "counted": [int(t[1]) for t in every],
                       "params": int(every[0][2])}, fh)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="data-parallel sizes N")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-per-rank", type=int, default=1, help="sequences per rank (global batch N x this)")
    p.add_argument("--stage0-once", action="store_true",
                   help="run stage 0 only at the smallest N (its per-rank memory does not depend on N)")
    p.add_argument("--no-warmup", action="store_true",
                   help="measure without the warm-up step on `tiny` (one-off costs then count as model states)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    # Before spawning: the workers inherit these, so freed large tensors go back to the OS.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "0"

    rows, t0 = [], time.perf_counter()
    for n in args.worlds:
        for stage in args.stages:
            if stage == 0 and args.stage0_once and n != min(args.worlds):
                continue
            run = copy.copy(args)
            run.stage = stage
            t = time.perf_counter()
            res = spawn_ranks(worker, n, run)
            expect = formula_bytes(stage, n, res["params"])
            measured = max(res["measured"])
            rows.append({"stage": stage, "N": n, "params": res["params"], "formula": expect,
                         "measured": measured, "measured_per_rank": res["measured"],
                         "counted": max(res["counted"]), "error": measured / expect - 1,
                         "seconds": time.perf_counter() - t})
            print(f"  stage {stage} N={n}: {time.perf_counter() - t:.0f} s", flush=True)

    print(f"\nmodel states per rank: {args.model} ({rows[0]['params']:,} parameters), bf16 compute, fp32 "
          f"master + Adam; batch {args.batch_per_rank}x{args.seq_len} per rank; measured = RSS growth")
    print(f"{'stage':>5} {'N':>3} {'formula MiB':>12} {'measured MiB':>13} {'counted MiB':>12} "
          f"{'error %':>8}  within {TOLERANCE:.0%}")
    for r in rows:
        ok = abs(r["error"]) <= TOLERANCE
        r["within"] = ok
        print(f"{r['stage']:>5} {r['N']:>3} {r['formula'] / MIB:>12.1f} {r['measured'] / MIB:>13.1f} "
              f"{r['counted'] / MIB:>12.1f} {100 * r['error']:>+8.2f}  {'yes' if ok else 'NO'}")
    print(f"total {time.perf_counter() - t0:.0f} s, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "args": vars(args)}, fh, indent=1)
    if not all(r["within"] for r in rows):
        raise SystemExit(f"measured model states differ from the ZeRO formulas by more than {TOLERANCE:.0%}")


if __name__ == "__main__":
    main()
