"""Model FLOPs utilisation (MFU) of `paratrain train` on one GPU.

MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, with model FLOPs per token
6 N + 12 L T d (forward and backward of every weight, plus attention scores and values; PaLM,
Chowdhery et al. 2022, appendix B), N counting every parameter (the tied embedding once).
Runs `paratrain train` as a subprocess per configuration and reads tokens/s from its metrics.

    python benchmarks/mfu.py                      # gpt2 and gpt2-medium (~350M), bf16, compiled
    python benchmarks/mfu.py --models gpt2 --no-compile
    python benchmarks/mfu.py --device cpu --peak-tflops 1.5 --models tiny --batch 4 --seq-len 64 \
        --steps 6 --warmup 2 --no-compile --precision fp32   # the same path on a CPU, its peak given
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM, vendor specifications


def peak_flops(args: argparse.Namespace) -> tuple[str, float]:
    import torch

    if args.peak_tflops:
        return args.device, args.peak_tflops * 1e12
    if args.device != "cuda":
        raise SystemExit("--device cpu: give the processor's peak with --peak-tflops")
    name = torch.cuda.get_device_name()
    for key, flops in PEAK_BF16.items():
        if key in name:
            return name, flops
    raise SystemExit(f"no peak FLOP/s known for {name}; add it to PEAK_BF16")


def flops_per_token(model: str, seq_len: int) -> float:
    from paratrain.models.gpt import PRESETS, build_model, count_params

    cfg = PRESETS[model]
    n = count_params(build_model(model, 0))
    return 6 * n + 12 * cfg.n_layer * seq_len * cfg.d_model


def run(model: str, args: argparse.Namespace, compile_: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        metrics = os.path.join(tmp, "m.jsonl")
        cmd = [sys.executable, "-m", "paratrain", "train", "--model", model, "--device", args.device, "--dp", "1",
               "--precision", args.precision, "--steps", str(args.steps), "--global-batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--metrics", metrics, "--no-progress", "--eval-every", "0"]
        subprocess.run(cmd + (["--compile"] if compile_ else []), check=True)
        steps = [json.loads(x) for x in open(metrics) if '"step"' in x and '"loss"' in x]
    timed = steps[args.warmup:]
    return len(timed) * timed[0]["tokens"] / sum(s["step_time_s"] for s in timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["gpt2", "gpt2-medium"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10, help="steps left out (compilation, allocator warm-up)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-only", action="store_true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--peak-tflops", type=float, help="the device's peak FLOP/s in TFLOP/s (default: from its name)")
    args = p.parse_args()
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    gpu, peak = peak_flops(args)
    rows = []
    for model in args.models:
        for compile_ in ([False] if args.no_compile else [True] if args.compile_only else [False, True]):
            tps = run(model, args, compile_)
            achieved = tps * flops_per_token(model, args.seq_len)
            rows.append((model, compile_, tps, achieved))
    print(f"\n{gpu}, peak {peak / 1e12:g} TFLOP/s; {args.batch} x {args.seq_len} tokens per step, "
          f"{args.precision}, steps {args.warmup + 1}-{args.steps}")
    print(f"{'model':<12} {'compile':<8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}")
    for model, compile_, tps, achieved in rows:
        print(f"{model:<12} {'yes' if compile_ else 'no':<8} {tps:>10,.0f} {achieved / 1e12:>8.1f} {achieved / peak:>6.1%}")


if __name__ == "__main__":
    main()
