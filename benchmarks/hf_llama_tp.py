"""Tensor parallelism on a Hugging Face Llama: paratrain's Trainer against torch's DTensor tensor
parallel, the same `LlamaForCausalLM`, weights, batches and AdamW, in the same run.

The model is built here from a `LlamaConfig` (grouped-query attention, untied head) and saved to a
temporary folder, from which every contender loads the same weights. Its own plan
(`model.tp_plan`: q, k, v, gate and up by columns, o and down by rows, the embedding by
vocabulary, the head by columns with its logits gathered) is applied four ways:
- paratrain: `paratrain.Trainer(model, mesh, loss_fn, data=..., tp_plan=model.tp_plan)`, the
  cross-entropy of `out.logits` (full logits, as the plan gathers them);
- paratrain-vocab: `Trainer(hf_spec(folder, ...))`, the spec `--model DIR` builds: the head
  stays vocabulary-parallel and the loss is computed on the vocabulary shards;
- torch-tp: `parallelize_module` with the plan translated to `ColwiseParallel` / `RowwiseParallel`
  (embedding `RowwiseParallel(input_layouts=Replicate())`, head `ColwiseParallel(output_layouts=
  Replicate())`); attention needs no change, it reshapes q, k and v with `view(..., -1, head_dim)`;
- torch-tp-vocab: the same with the head's logits left `Shard(-1)` and torch's `loss_parallel`.
Transformers' own `from_pretrained(..., tp_plan="auto")` (DTensor underneath) runs on CPU and
gloo only with the `accelerate` package installed, which paratrain does not need; when it is
importable it is measured too, as hf-tp. Clipping is off, the learning rate constant and the
weight decay grouped as paratrain groups it (matrices only), so every contender does the same
update; the losses printed at the first step (the forward) and the last timed step (the
gradients and updates in between) show that they compute the same thing. Batches are random
tokens over the whole vocabulary. All contenders live side by side and take turns step by step
(the order rotating), so that the load of a shared machine falls on each alike; each round of
timed steps gives one figure per contender, and the medians are reported with the ratios.

    python benchmarks/hf_llama_tp.py
    python benchmarks/hf_llama_tp.py --hidden 512 --layers 8 --intermediate 1376
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, loss_parallel, parallelize_module

from common import spawn_ranks
from paratrain import Trainer
from paratrain.data import token_batches
from paratrain.launch import threads_per_worker
from paratrain.mesh import Mesh
from paratrain.models.hf import build_hf, hf_spec

SEED, BETAS, WEIGHT_DECAY = 0, (0.9, 0.95), 0.1
SETTINGS = dict(warmup_steps=0, min_lr_ratio=1.0, grad_clip=0.0, weight_decay=WEIGHT_DECAY, beta1=BETAS[0],
                beta2=BETAS[1], steps=10**6, progress=False)


def write_model(args: argparse.Namespace, folder: str) -> None:
    """The Llama of the flags, initialised from the seed, as a Hugging Face folder with its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seq_len,
                         tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(SEED)
    LlamaForCausalLM(config).save_pretrained(folder)


def torch_plan(hf_plan: dict[str, str], vocab_head: bool) -> dict:
    """Hugging Face's plan in torch's styles; `vocab_head`: the logits stay vocabulary shards."""
    head = (ColwiseParallel(output_layouts=Shard(-1), use_local_output=False) if vocab_head
            else ColwiseParallel(output_layouts=Replicate()))
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel,
              "embedding_rowwise": lambda: RowwiseParallel(input_layouts=Replicate()),
              "colwise_gather_output": lambda: head}
    return {name: styles[style]() for name, style in hf_plan.items()}


def lm_cross_entropy(out, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())


def adamw(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """paratrain's AdamW: matrices decay, vectors do not (optim.param_groups)."""
    ps = list(model.parameters())
    groups = [{"params": [p for p in ps if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, foreach=False)


def torch_stepper(model, lr: float, loader, vocab_head: bool):
    """`step(k) -> loss` of the usual loop over a DTensor-parallel model."""
    opt = adamw(model, lr)

    def step(k: int) -> float:
        b = loader.batch(k)  # every tp rank sees the whole batch
        opt.zero_grad()
        logits = model(b.inputs).logits
        if vocab_head:
            with loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1), b.targets.flatten())
                loss.backward()
        else:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), b.targets.flatten())
            loss.backward()
        opt.step()
        loss = loss.detach()
        return float(loss.full_tensor() if hasattr(loss, "full_tensor") else loss)
    return step


def build(contender: str, args: argparse.Namespace, mesh: Mesh, loader):
    """A fresh model of `contender` from the folder's weights, as `step(k) -> loss`."""
    settings = dict(SETTINGS, lr=args.lr, global_batch=args.global_batch, seq_len=args.seq_len)
    if contender == "paratrain":
        model = build_hf(args.folder, SEED)
        trainer = Trainer(model, mesh, lm_cross_entropy, data=loader, tp_plan=model.tp_plan, **settings)
        return lambda k: trainer.run_step(k).loss
    if contender == "paratrain-vocab":
        trainer = Trainer(hf_spec(args.folder, SEED, args.seq_len), mesh, data=loader, **settings)
        return lambda k: trainer.run_step(k).loss
    tp_mesh = mesh.device_mesh["tp"]
    if contender == "hf-tp":
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():  # `tp_plan=` moves to `distributed_config=` in later versions
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_pretrained(args.folder, tp_plan="auto", device_mesh=tp_mesh,
                                                         dtype=torch.float32, attn_implementation="sdpa",
                                                         local_files_only=True)
        return torch_stepper(model, args.lr, loader, vocab_head=False)
    model = build_hf(args.folder, SEED)
    vocab_head = contender == "torch-tp-vocab"
    model = parallelize_module(model, tp_mesh, torch_plan(model.tp_plan, vocab_head))
    return torch_stepper(model, args.lr, loader, vocab_head)


def worker(rank: int, world: int, init_file: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(threads_per_worker(world))
    os.environ.setdefault("LOCAL_RANK", str(rank))  # transformers' tp_plan reads it
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from transformers.utils import logging

    logging.disable_progress_bar()
    mesh = Mesh.build(tp=world)
    tokens = np.random.default_rng(SEED).integers(0, args.vocab, size=64 * args.global_batch * (args.seq_len + 1))
    loader = token_batches(tokens, args.seq_len, args.global_batch, seed=SEED)
    steppers = {c: build(c, args, mesh, loader) for c in args.contenders}
    first_loss = {c: step(1) for c, step in steppers.items()}
    for k in range(2, 2 + args.warmup):
        for step in steppers.values():
            step(k)
    seconds = {c: [0.0] * args.rounds for c in steppers}
    last_loss = {}
    names = list(steppers)
    for r in range(args.rounds):
        for i in range(args.steps):
            k = 2 + args.warmup + r * args.steps + i
            for c in names[k % len(names):] + names[:k % len(names)]:  # interleaved by step, order rotating
                dist.barrier()
                t0 = time.perf_counter()
                last_loss[c] = steppers[c](k)
                dist.barrier()
                seconds[c][r] += time.perf_counter() - t0
    n_tokens = args.global_batch * args.seq_len * args.steps
    speed = {c: [n_tokens / s for s in secs] for c, secs in seconds.items()}
    if rank == 0:
        with open(out, "w") as fh:
            json.dump({"tokens_per_s": speed, "first_loss": first_loss, "last_loss": last_loss}, fh)
    dist.destroy_process_group()


def refuse(message: str) -> None:
    print(f"hf_llama_tp.py: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=2)
    for flag, default in (("hidden", 256), ("layers", 4), ("heads", 8), ("kv-heads", 4), ("intermediate", 688),
                          ("vocab", 4096), ("seq-len", 128), ("global-batch", 8)):
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first")
    p.add_argument("--steps", type=int, default=8, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds of timed steps (the spread of the figures)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    for name in ("hidden", "heads", "kv_heads", "intermediate", "vocab"):
        if getattr(args, name) % args.tp:
            refuse(f"--{name.replace('_', '-')} {getattr(args, name)} is not divisible by --tp {args.tp}")
    return args


def main() -> None:
    args = parse_args()
    if importlib.util.find_spec("transformers") is None:
        refuse("a Hugging Face Llama needs the `transformers` package: pip install 'paratrain[hf]'")
    import transformers

    args.contenders = ["paratrain", "torch-tp", "paratrain-vocab", "torch-tp-vocab"]
    if importlib.util.find_spec("accelerate") is not None:
        args.contenders.append("hf-tp")
    with tempfile.TemporaryDirectory() as folder:
        args.folder = folder
        write_model(args, folder)
        res = spawn_ranks(worker, args.tp, args)
    tps = {name: statistics.median(xs) for name, xs in res["tokens_per_s"].items()}
    print(f"{'contender':<16} {'tokens/s median':>16} {'min':>9} {'max':>9}   first-step loss   last-step loss")
    for name, xs in res["tokens_per_s"].items():
        print(f"{name:<16} {tps[name]:>16,.0f} {min(xs):>9,.0f} {max(xs):>9,.0f}   {res['first_loss'][name]:>15.6f}"
              f"   {res['last_loss'][name]:>14.6f}")
    ratio = tps["paratrain"] / tps["torch-tp"]
    print(f"ratio paratrain/torch-tp tokens/s (logits gathered): {ratio:.2f}x")
    print(f"ratio paratrain-vocab/torch-tp-vocab tokens/s (vocabulary-parallel loss): "
          f"{tps['paratrain-vocab'] / tps['torch-tp-vocab']:.2f}x")
    if "hf-tp" in tps:
        print(f"ratio paratrain/hf-tp tokens/s (transformers' tp_plan='auto'): {tps['paratrain'] / tps['hf-tp']:.2f}x")
    else:
        print("hf-tp not measured: transformers' tp_plan='auto' needs the `accelerate` package")
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
          f"intermediate {args.intermediate}, vocab {args.vocab}; tp {args.tp}, batch {args.global_batch}x"
          f"{args.seq_len}, {args.rounds} rounds of {args.steps} steps")
    print(f"machine: {os.cpu_count()} cores {platform.machine()}, Python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, gloo")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**res, "ratio": ratio, "args": vars(args)}, fh, indent=1)


if __name__ == "__main__":
    main()
