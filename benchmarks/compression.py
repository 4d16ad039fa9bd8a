"""Gradient compression: bytes sent per step and the loss reached, per `--compress` mode.

Trains the same model from the same seed on the same batches through `paratrain train`'s code
path (`paratrain.launch.launch`, a metrics file per run) uncompressed and with each mode, and
prints per mode: the measured bytes per step after the compression warm-up (the metrics'
`comm_bytes`, summed over ranks), its reduction against the uncompressed run, the reduction the
compressor's formula predicts, the reduction over the whole run (warm-up included), the final
loss (mean of the last 10 steps) and its distance from the uncompressed run, and tokens/s.

Then torch DDP with `powerSGD_hook` (same model, seed, batches, AdamW, schedule and clipping; DDP
averages, so each rank takes its local mean loss) at the same rank and the same uncompressed
start (`start_powerSGD_iter` = our warm-up): its bytes are counted by
wrapping `torch.distributed.all_reduce` while the hook runs (payload x the ring factor
2(n-1)/n, as paratrain counts), beside ours.

    python benchmarks/compression.py                         # 200 steps of small, dp=2
    python benchmarks/compression.py --steps 50 --modes none,powersgd:4 --json compression.json

Exit status 1 if some mode's final loss is further than --tolerance (5%) from the uncompressed run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common import spawn_ranks
from paratrain.comm.collectives import RING_FACTOR
from paratrain.comm.compress import NoCompression, PowerSGD, parse_compress
from paratrain.config import RunConfig, validate
from paratrain.launch import launch, threads_per_worker
from paratrain.models.gpt import build_model

LAST = 10  # the final loss is the mean over the last LAST steps


def make_config(args: argparse.Namespace, compress: str, metrics: str | None = None) -> RunConfig:
    cfg = RunConfig()
    cfg.model.name = args.model
    cfg.layout.dp = args.dp
    tr = cfg.train
    tr.steps, tr.global_batch, tr.seq_len, tr.seed = args.steps, args.global_batch, args.seq_len, args.seed
    tr.compress, tr.metrics, tr.progress = compress, metrics, False
    if args.compress_warmup is not None:
        tr.compress_warmup = args.compress_warmup
    validate(cfg)
    return cfg


def run_ours(args: argparse.Namespace, compress: str, folder: str) -> dict:
    """One `paratrain train` run; its figures from the metrics file."""
    path = os.path.join(folder, f"{compress.replace(':', '_')}.jsonl")
    launch(make_config(args, compress, path))
    with open(path) as fh:
        lines = [json.loads(x) for x in fh]
    steps = [x for x in lines if "step" in x and "comm_bytes" in x]
    end = next(x for x in lines if x.get("event") == "end")
    return {"losses": [s["loss"] for s in steps], "comm_bytes": [s["comm_bytes"] for s in steps],
            "tokens_per_s": end["tokens_per_s"]}


def expected_factor(args: argparse.Namespace, compress: str) -> float:
    """Uncompressed bytes over the compressor's formula, for the model's gradients in one bucket
    (`small` fits in one 25 MB bucket)."""
    compressor = parse_compress(compress)
    if compressor is None:
        return 1.0
    shapes = [p.shape for p in build_model(args.model, args.seed).parameters()]
    return NoCompression().sent_bytes(shapes, args.dp) / compressor.sent_bytes(shapes, args.dp)


# ---------------------------------------------------------------- torch DDP + powerSGD_hook
def ddp_worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.data import TokenLoader, load_corpus
    from paratrain.optim import lr_at

    torch.set_num_threads(threads_per_worker(world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cfg = make_config(args, "none")
    tr = cfg.train
    torch.manual_seed(tr.seed)  # as the Trainer does
    model = build_model(cfg.model.name, tr.seed, cfg.model.dropout, cfg.model.tie_embeddings)
    ddp = DistributedDataParallel(model, bucket_cap_mb=tr.bucket_mb)
    state = powersgd.PowerSGDState(process_group=None, matrix_approximation_rank=args.torch_rank,
                                   # ours compresses from step W = torch's iteration W - 1 (from 0)
                                   start_powerSGD_iter=max(2, tr.compress_warmup - 1),  # 2: torch's least
                                   use_error_feedback=True, warm_start=True)
    ddp.register_comm_hook(state, powersgd.powerSGD_hook)

    sent = [0]
    plain_all_reduce = dist.all_reduce

    def counted_all_reduce(tensor, *a, **kw):  # what the hook sends, counted as paratrain does
        sent[0] += round(tensor.numel() * tensor.element_size() * RING_FACTOR["all_reduce"](world))
        return plain_all_reduce(tensor, *a, **kw)

    dist.all_reduce = counted_all_reduce
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tr.lr, betas=(tr.beta1, tr.beta2))
    loader = TokenLoader(load_corpus(cfg.data.path), tr.seq_len, tr.global_batch, tr.seed, cfg.data.val_fraction)
    losses, comm, times = [], [], []
    for step in range(1, tr.steps + 1):
        sent[0] = 0
        t0 = time.perf_counter()
        b = loader.next(rank, world)
        opt.zero_grad()
        loss = F.cross_entropy(ddp(b.inputs).flatten(0, 1), b.targets.flatten())  # local mean
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr.grad_clip)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tr.lr, tr.warmup_steps, tr.steps, tr.min_lr_ratio)
        opt.step()
        dt = torch.tensor([time.perf_counter() - t0])
        figures = torch.tensor([float(loss.detach()) / world, float(sent[0])], dtype=torch.float64)
        plain_all_reduce(figures)  # not counted: the benchmark's own bookkeeping
        plain_all_reduce(dt, op=dist.ReduceOp.MAX)  # the step time is the slowest rank's, as ours
        losses.append(float(figures[0]))
        comm.append(int(figures[1]))
        times.append(float(dt))
    dist.all_reduce = plain_all_reduce
    if rank == 0:
        steady = times[1:] or times
        with open(out, "w") as fh:
            json.dump({"losses": losses, "comm_bytes": comm,
                       "tokens_per_s": tr.global_batch * tr.seq_len * len(steady) / sum(steady)}, fh)
    dist.destroy_process_group()


# ---------------------------------------------------------------- report
def final_loss(run: dict) -> float:
    return statistics.fmean(run["losses"][-LAST:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--modes", default="none,fp16,topk:0.01,topk:0.1,powersgd:4,powersgd:8",
                   help="comma-separated --compress values; `none` (the reference) is always run first")
    p.add_argument("--no-torch", action="store_true", help="skip the DDP + powerSGD_hook run")
    p.add_argument("--tolerance", type=float, default=0.05, help="allowed relative final-loss difference")
    p.add_argument("--compress-warmup", type=int, help="steps over which compression ramps in "
                   "(default: paratrain's, %d)" % RunConfig().train.compress_warmup)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    modes = ["none"] + [m for m in args.modes.split(",") if m and m != "none"]
    for m in modes:
        make_config(args, m)  # refuse a bad mode before anything runs
    if args.steps < LAST + 2:
        p.error(f"--steps must be at least {LAST + 2}")
    psgd = [m for m in modes if isinstance(parse_compress(m), PowerSGD)]
    args.torch_rank = parse_compress(psgd[0]).rank if psgd else None

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for m in modes:
            t0 = time.perf_counter()
            runs[m] = run_ours(args, m, folder)
            print(f"  ran {m}: {time.perf_counter() - t0:.0f} s", flush=True)
    torch_run = None
    if args.torch_rank and not args.no_torch:
        t0 = time.perf_counter()
        torch_run = spawn_ranks(ddp_worker, args.dp, args)
        print(f"  ran torch DDP + powerSGD_hook rank {args.torch_rank}: {time.perf_counter() - t0:.0f} s", flush=True)

    warm = make_config(args, "none").train.compress_warmup
    after = max(warm, 1) - 1  # the index of step `warm`, the first fully compressed one
    ref_bytes, ref_loss = statistics.fmean(runs["none"]["comm_bytes"]), final_loss(runs["none"])
    print(f"\n{args.model}, dp={args.dp}, {args.steps} steps of {args.global_batch}x{args.seq_len} tokens, "
          f"seed {args.seed}, compression warm-up {warm} steps, torch {torch.__version__}; bytes are per "
          f"step from step {after + 1} on, summed over ranks ('whole run': all steps); final loss = mean "
          f"of the last {LAST} steps")
    print(f"{'mode':<12} {'bytes/step':>12} {'reduction':>10} {'expected':>9} {'whole run':>10} {'final loss':>11} "
          f"{'vs none':>8} {'within':>7} {'tokens/s':>9}")
    failed = []
    rows = {}
    for m, r in runs.items():
        b, loss = statistics.fmean(r["comm_bytes"][after:]), final_loss(r)
        whole = ref_bytes / statistics.fmean(r["comm_bytes"])
        diff = (loss - ref_loss) / ref_loss
        within = abs(diff) <= args.tolerance
        if not within:
            failed.append(m)
        rows[m] = {"bytes_per_step": b, "reduction": ref_bytes / b, "expected": expected_factor(args, m),
                   "reduction_whole_run": whole, "final_loss": loss, "loss_diff": diff,
                   "tokens_per_s": r["tokens_per_s"]}
        print(f"{m:<12} {b:>12,.0f} {ref_bytes / b:>9.2f}x {rows[m]['expected']:>8.2f}x {whole:>9.2f}x {loss:>11.4f} "
              f"{diff:>+8.2%} {'yes' if within else 'NO':>7} {r['tokens_per_s']:>9,.0f}")
    if torch_run:
        ours = runs[psgd[0]]
        # both all-reduce uncompressed before step max(warm, 3) (torch's least start is iteration 2)
        start = max(after, 2)
        ob, tb = statistics.fmean(ours["comm_bytes"][start:]), statistics.fmean(torch_run["comm_bytes"][start:])
        ol, tl = final_loss(ours), final_loss(torch_run)
        first_agree = math.isclose(torch_run["losses"][0], runs["none"]["losses"][0], rel_tol=1e-5)
        print(f"\nPowerSGD rank {args.torch_rank}, ours vs torch DDP powerSGD_hook (bytes: steps {start + 1}-"
              f"{args.steps}; both send uncompressed before: {torch_run['comm_bytes'][0]:,} bytes)")
        print(f"{'':<12} {'bytes/step':>12} {'final loss':>11} {'vs none':>8} {'tokens/s':>9}")
        for name, b, loss, tps in (("paratrain", ob, ol, ours["tokens_per_s"]),
                                   ("torch", tb, tl, torch_run["tokens_per_s"])):
            print(f"{name:<12} {b:>12,.0f} {loss:>11.4f} {(loss - ref_loss) / ref_loss:>+8.2%} {tps:>9,.0f}")
        print(f"bytes ours / torch: {ob / tb:.3f}; final loss ours - torch: {ol - tl:+.4f}; first-step loss "
              f"{'agrees' if first_agree else 'DIFFERS'} with the uncompressed run "
              f"({torch_run['losses'][0]:.6f} vs {runs['none']['losses'][0]:.6f})")
        rows["torch-powersgd"] = {"bytes_per_step": tb, "ours_bytes_per_step": ob, "from_step": start + 1,
                                  "final_loss": tl, "first_step_loss_agrees": first_agree}
    print(f"\nfinal loss within {args.tolerance:.0%} of the uncompressed run: "
          + ("every mode" if not failed else f"all but {', '.join(failed)}"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "runs": runs, "torch": torch_run, "args": vars(args)}, fh, indent=1)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
