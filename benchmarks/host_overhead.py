"""Host-side cost of one training step: paratrain's Trainer against a plain PyTorch loop.

On a GPU the host launches every kernel of a step; if launching takes longer than the kernels
run, the device waits and MFU falls whatever the kernels do. This script measures what the host
spends per step with the layer structure of a preset (gpt2: 12 blocks, 12 heads) but a width so
narrow (d_model 48, vocabulary 256, 1 x 8 tokens) that the arithmetic is negligible: what is
left is Python, the dispatcher and the autograd engine, per operator, as on a GPU.

Contenders, both bf16 compute with fp32 weights for the optimizer, one process (dp=1):
- paratrain: `Trainer.step` (bf16 weights, fp32 masters, global-norm clipping, metrics);
- torch: the usual loop (fp32 model under torch.autocast, AdamW, clip_grad_norm_, float(loss)).

    python benchmarks/host_overhead.py                 # gpt2's structure
    python benchmarks/host_overhead.py --model gpt2-medium
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def narrow(name: str):
    """The preset's depth and heads at a negligible width, registered as preset 'narrow'."""
    from paratrain.models import gpt

    cfg = gpt.PRESETS[name]
    gpt.PRESETS["narrow"] = gpt.GPTConfig(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=4 * cfg.n_head,
                                          vocab_size=256, max_seq_len=64)
    return gpt.PRESETS["narrow"]


def paratrain_step():
    from paratrain.config import RunConfig
    from paratrain.mesh import Mesh
    from paratrain.train import Trainer

    cfg = RunConfig.from_dict({"model": {"name": "narrow"}, "train": {
        "precision": "bf16", "global_batch": 1, "seq_len": 8, "steps": 10**6, "progress": False}})
    trainer = Trainer.from_config(cfg, Mesh.build())
    steps = iter(range(1, 10**6))
    return lambda: trainer.run_step(next(steps))


def torch_step():
    from paratrain.models.gpt import build_model

    model = build_model("narrow", 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (1, 9))

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.bfloat16):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss.detach())

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gpt2", help="preset whose depth and heads are kept")
    p.add_argument("--steps", type=int, default=30, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per contender")
    args = p.parse_args()
    torch.set_num_threads(1)  # one host thread launches a GPU's kernels
    cfg = narrow(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'init')}", rank=0, world_size=1)
        contenders = {"paratrain": paratrain_step(), "torch": torch_step()}
        for fn in contenders.values():  # warm-up: first-call costs
            for _ in range(5):
                fn()
        ms = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, fn in contenders.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn()
                ms[name].append((time.perf_counter() - t0) / args.steps * 1e3)
        dist.destroy_process_group()
    print(f"host time per step, {args.model}'s structure ({cfg.n_layer} blocks, {cfg.n_head} heads) at d_model "
          f"{cfg.d_model}, 1 x 8 tokens, bf16; median (min-max) of {args.rounds} rounds of {args.steps} steps")
    for name, xs in ms.items():
        print(f"  {name:<10} {statistics.median(xs):7.2f} ms  ({min(xs):.2f}-{max(xs):.2f})")
    print(f"  paratrain / torch: {statistics.median(ms['paratrain']) / statistics.median(ms['torch']):.2f}x")


if __name__ == "__main__":
    main()
