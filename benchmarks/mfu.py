"""Model FLOPs utilisation (MFU) of `paratrain train` on one GPU, and where the time goes.

MFU = achieved model FLOP/s / the GPU's peak dense bf16 FLOP/s, with model FLOPs per token
6 N + 12 L T d (forward and backward of every weight, plus attention scores and values; PaLM,
Chowdhery et al. 2022, appendix B), N counting the weights of matrix products (the tied
embedding once, as the head): the planner's formula (planner/cost.py), which `paratrain train`
also reports.
Runs `paratrain train` as a subprocess per configuration and reads tokens/s from its metrics.

--ceiling times, alone on the device and in the run's dtype, every matrix multiplication of one
training step (for each nn.Linear at M = batch x seq_len rows: forward X W^T, backward dY W and
dY^T X) and causal attention forward and backward. Their sum is the floor of a step's time were
nothing else to run, hence a ceiling on MFU; achieved / ceiling is the share of the step that
those kernels fill, and the GEMMs' own TFLOP/s tell how far the kernels themselves are from peak.

--breakdown profiles the last PROFILE_STEPS steps of each run (`paratrain train --profile`; those
steps are left out of the tokens/s) and sorts their time into categories (matmul, attention,
optimizer, ...), with, on a GPU, the time the device sat idle waiting for the host.

    python benchmarks/mfu.py                      # gpt2 and gpt2-medium (~350M), bf16, compiled
    python benchmarks/mfu.py --models gpt2 --no-compile
    python benchmarks/mfu.py --models gpt2 --compile-only --ceiling --breakdown   # where the time goes
    python benchmarks/mfu.py --device cpu --peak-tflops 1.5 --models tiny --batch 4 --seq-len 64 \
        --steps 6 --warmup 2 --no-compile --precision fp32   # the same path on a CPU, its peak given
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

from paratrain.models.gpt import PRESETS, build_model
from paratrain.optim import DTYPES
from paratrain.planner import flops_per_token as formula_flops_per_token
from paratrain.planner import gpu_peak_flops
from paratrain.planner.calibrate import median_time

PROFILE_STEPS = 3  # the last steps of a run that --breakdown profiles


def peak_flops(args: argparse.Namespace) -> tuple[str, float]:
    if args.peak_tflops:
        return args.device, args.peak_tflops * 1e12
    if args.device != "cuda":
        raise SystemExit("--device cpu: give the processor's peak with --peak-tflops")
    name = torch.cuda.get_device_name()
    peak = gpu_peak_flops(name)
    if peak is None:
        raise SystemExit(f"no peak FLOP/s known for {name}: give it with --peak-tflops")
    return name, peak


def flops_per_token(model: str, seq_len: int) -> int:
    return int(formula_flops_per_token(PRESETS[model], seq_len))


def run(model: str, args: argparse.Namespace, compile_: bool) -> tuple[float, dict | None]:
    """Tokens/s of one `paratrain train` run, and with --breakdown its profile (`ops_rank0.json`)."""
    with tempfile.TemporaryDirectory() as tmp:
        metrics, profile = os.path.join(tmp, "m.jsonl"), os.path.join(tmp, "profile")
        cmd = [sys.executable, "-m", "paratrain", "train", "--model", model, "--device", args.device, "--dp", "1",
               "--precision", args.precision, "--steps", str(args.steps), "--global-batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--metrics", metrics, "--no-progress", "--eval-every", "0"]
        cmd += ["--compile"] if compile_ else []
        cmd += ["--profile", profile, "--profile-steps", str(PROFILE_STEPS)] if args.breakdown else []
        subprocess.run(cmd, check=True)
        steps = [json.loads(x) for x in open(metrics) if '"step"' in x and '"loss"' in x]
        ops = json.load(open(os.path.join(profile, "ops_rank0.json"))) if args.breakdown else None
    # The profiled steps run slower (the profiler's own overhead): they are not timed.
    timed = steps[args.warmup:len(steps) - (PROFILE_STEPS if args.breakdown else 0)]
    return len(timed) * timed[0]["tokens"] / sum(s["step_time_s"] for s in timed), ops


# --ceiling ---------------------------------------------------------------------------------------

def median_seconds(fn, device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median time of one call of `fn`, after `warmup` calls left out (kernel selection, caches)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        # Events are recorded on the stream between the kernels, so they time the device; the
        # host only waits once, at the end, and its waiting is in none of the intervals.
        torch.cuda.synchronize(device)
        pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in pairs:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in pairs)
    return median_time(fn, iters, warmup=0)


def linear_gemms(model: nn.Module, tokens: int) -> list[dict]:
    """The model's nn.Linear layers grouped by GEMM shape M x K x N (M = tokens per step, K in,
    N out), with how many layers have it and their names within a block (`attn.q`, `head`)."""
    groups: dict[tuple[int, int, int], dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            shape = (tokens, module.in_features, module.out_features)
            g = groups.setdefault(shape, {"M": shape[0], "K": shape[1], "N": shape[2], "count": 0, "layers": []})
            g["count"] += 1
            layer = re.sub(r"^blocks\.\d+\.", "", name)
            if layer not in g["layers"]:
                g["layers"].append(layer)
    return list(groups.values())


def time_linear(M: int, K: int, N: int, dtype, device, warmup: int, iters: int) -> tuple[float, float, float]:
    """Seconds of the three GEMMs of one nn.Linear in a training step, in the layouts autograd
    gives them (the weight W is stored N x K): forward X W^T, then dX = dY W and dW = dY^T X."""
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = torch.randn(N, K, dtype=dtype, device=device)
    dy = torch.randn(M, N, dtype=dtype, device=device)
    return (median_seconds(lambda: x @ w.t(), device, warmup, iters),
            median_seconds(lambda: dy @ w, device, warmup, iters),
            median_seconds(lambda: dy.t() @ x, device, warmup, iters))


def time_attention(B: int, H: int, T: int, head_dim: int, dtype, device, warmup: int, iters: int) -> float:
    """Seconds of causal attention forward and backward, q, k, v and the output's gradient laid out
    as in the model (heads split off the projections by a view and a transpose)."""
    def heads(grad: bool) -> torch.Tensor:
        return torch.randn(B, T, H, head_dim, dtype=dtype, device=device).transpose(1, 2).requires_grad_(grad)

    q, k, v, dy = heads(True), heads(True), heads(True), heads(False)

    def step():
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.autograd.grad(y, (q, k, v), dy)  # not backward(): accumulating into .grad adds kernels

    return median_seconds(step, device, warmup, iters)


def gemm_ceiling(model: nn.Module, batch: int, seq_len: int, dtype: torch.dtype, device: str | torch.device,
                 warmup: int = 3, iters: int = 10) -> dict:
    """Time every GEMM and the attention of one training step of `model` alone (see the docstring).

    Returns per-shape `rows` (M, K, N, count, layers, seconds of one forward / dX / dW GEMM, and
    `flops` and `seconds` per step: count x 3 GEMMs), `attention` (its shape, count = layers, FLOPs
    as the MFU formula counts them, seconds per step), and totals: `gemm_flops`, `gemm_s`, `floor_s`
    (GEMMs + attention) and `model_flops` (the MFU formula's FLOPs per step).
    """
    device = torch.device(device)
    cfg, tokens = model.cfg, batch * seq_len
    rows = linear_gemms(model, tokens)
    for r in rows:
        r["fwd_s"], r["dx_s"], r["dw_s"] = time_linear(r["M"], r["K"], r["N"], dtype, device, warmup, iters)
        r["flops"] = r["count"] * 3 * 2 * r["M"] * r["K"] * r["N"]
        r["seconds"] = r["count"] * (r["fwd_s"] + r["dx_s"] + r["dw_s"])
    rows.sort(key=lambda r: r["seconds"], reverse=True)
    head_dim = cfg.d_model // cfg.n_head
    one = time_attention(batch, cfg.n_head, seq_len, head_dim, dtype, device, warmup, iters)
    # FLOPs as the MFU formula counts them (12 L T d per token: the full T x T, where the causal
    # kernel skips about half), so that rows and model_flops add up.
    attention = {"B": batch, "H": cfg.n_head, "T": seq_len, "head_dim": head_dim, "count": cfg.n_layer,
                 "flops": 12 * cfg.n_layer * seq_len * cfg.d_model * tokens, "seconds": cfg.n_layer * one}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # give the memory back for the next `paratrain train`
    gemm_s = sum(r["seconds"] for r in rows)
    return {"rows": rows, "attention": attention, "gemm_flops": sum(r["flops"] for r in rows), "gemm_s": gemm_s,
            "floor_s": gemm_s + attention["seconds"], "model_flops": int(formula_flops_per_token(cfg, seq_len)) * tokens}


def measure_ceiling(model: str, args: argparse.Namespace) -> dict:
    return gemm_ceiling(build_model(model, 0), args.batch, args.seq_len, DTYPES[args.precision], args.device)


def print_ceiling(model: str, c: dict, peak: float) -> None:
    a = c["attention"]
    print(f"\nceiling {model}: MFU {c['model_flops'] / c['floor_s'] / peak:.1%} at most; floor "
          f"{c['floor_s'] * 1e3:.2f} ms per step = GEMMs {c['gemm_s'] * 1e3:.2f} + attention {a['seconds'] * 1e3:.2f}")
    print(f"  {'GEMM M x K x N':<22} {'count':>5} {'ms/step':>8} {'TFLOP/s':>8} {'fwd':>7} {'dX':>7} {'dW':>7}  layers")
    for r in c["rows"]:
        tflops = [2 * r["M"] * r["K"] * r["N"] / s / 1e12 for s in (r["fwd_s"], r["dx_s"], r["dw_s"])]
        shape = f"{r['M']} x {r['K']} x {r['N']}"
        print(f"  {shape:<22} {r['count']:>5} "
              f"{r['seconds'] * 1e3:>8.3f} {r['flops'] / r['seconds'] / 1e12:>8.4g} "
              + " ".join(f"{t:>7.4g}" for t in tflops) + "  " + ", ".join(r["layers"]))
    shape = f"attention {a['B']}x{a['H']}x{a['T']}x{a['head_dim']}"
    print(f"  {shape:<22} {a['count']:>5} {a['seconds'] * 1e3:>8.3f} {a['flops'] / a['seconds'] / 1e12:>8.4g}"
          f"  {'':>23}  causal, forward + backward")
    print("  count: layers of that shape per step, each 3 GEMMs (fwd, dX, dW: their TFLOP/s on the right); "
          "attention FLOPs counted as the MFU formula does (full T x T)")


# --breakdown -------------------------------------------------------------------------------------

COMPILED = "compiled (fused by torch.compile)"
# Checked in order, on the lower-cased name, after compiled kernels; the first match wins.
RULES = [
    # Before matmul: flash and cutlass attention kernels carry "cutlass" in their template names.
    ("attention", ("flash", "attention", "fmha", "sdpa")),
    ("matmul", ("gemm", "nvjet", "xmma", "s16816", "cutlass", "cublas", "splitkreduce",
                "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
    # GPU: the fused AdamW kernel and foreach kernels; CPU: foreach ops, or the single-tensor
    # AdamW's own ops (lerp_, addcmul_, addcdiv_ appear nowhere else in a step).
    ("optimizer", ("adam", "multi_tensor_apply", "_foreach_", "aten::lerp_", "aten::addcmul_", "aten::addcdiv_")),
    ("loss (softmax/cross-entropy)", ("softmax", "nll_loss", "cross_entropy")),
    ("copies/memset", ("memcpy", "memset", "copy", "fill", "aten::zero_")),
]


def categorize(name: str) -> str:
    """The category of a profiler entry (a GPU kernel or, on a CPU, an aten operator) by its name."""
    n = name.lower()
    if n.startswith("triton_tem_"):  # inductor's templates (max-autotune): GEMMs, or flex attention
        return "attention" if "attention" in n else "matmul"
    if n.startswith(("triton_", "cpp_fused")):
        return COMPILED
    for category, keys in RULES:
        if any(k in n for k in keys):
            return category
    return "other elementwise"


def counted_ops(ops_json: dict) -> list[tuple[str, int, float]]:
    """(name, calls, seconds) of the entries whose times add up to the step's busy time, each once.

    Self times never count a nested operator twice (self = own time less its children's). On a
    GPU the kernels, copies and memsets count (`on_device`), not the operators that launched them
    (aten::mm carries its kernel's time as its own self device time) and not the copies of named
    ranges on the GPU timeline (`annotation`), as in torch's own table total. On a CPU only
    operators count (aten:: and compiled kernels); the rest is Python, the autograd engine and
    the ranges around them.
    """
    ops = [o for o in ops_json["ops"] if not o["name"].startswith(("ProfilerStep", "paratrain"))]
    if ops_json["device"] == "cuda":
        return [(o["name"], o["calls"], o["self_device_s"]) for o in ops
                if o["on_device"] and not o["annotation"] and o["self_device_s"] > 0]
    return [(o["name"], o["calls"], o["self_cpu_s"]) for o in ops
            if o["name"].startswith("aten::") or categorize(o["name"]) == COMPILED]


def breakdown(ops_json: dict) -> list[tuple[str, float, float]]:
    """(category, seconds per step, share of the step's wall-clock time), largest first; on a GPU
    a last row for the time the device did nothing (waiting for the host: launches, Python)."""
    steps = ops_json["steps"]
    step_s = ops_json["wall_s"] / steps
    per_category: dict[str, float] = {}
    for name, _, seconds in counted_ops(ops_json):
        category = categorize(name)
        per_category[category] = per_category.get(category, 0.0) + seconds / steps
    rows = sorted(per_category.items(), key=lambda kv: kv[1], reverse=True)
    if ops_json["device"] == "cuda":  # negative if kernels overlapped on several streams
        rows.append(("idle / host (step wall - busy)", step_s - sum(s for _, s in rows)))
    return [(category, seconds, seconds / step_s) for category, seconds in rows]


def print_breakdown(model: str, compile_: bool, ops_json: dict, top: int = 12) -> None:
    steps, device = ops_json["steps"], ops_json["device"]
    print(f"\nbreakdown {model}{' compiled' if compile_ else ''}: {steps} profiled steps, "
          f"{ops_json['wall_s'] / steps * 1e3:.2f} ms per step (under the profiler), "
          f"{'GPU kernel' if device == 'cuda' else 'CPU operator'} self times")
    print(f"  {'category':<36} {'ms/step':>9} {'of step':>8}")
    for category, seconds, share in breakdown(ops_json):
        print(f"  {category:<36} {seconds * 1e3:>9.3f} {share:>8.1%}")
    print(f"  {'top ' + str(top):<72} {'calls/step':>10} {'ms/step':>9}  category")
    for name, calls, seconds in sorted(counted_ops(ops_json), key=lambda o: o[2], reverse=True)[:top]:
        short = name if len(name) <= 72 else name[:69] + "..."
        print(f"  {short:<72} {calls / steps:>10.1f} {seconds / steps * 1e3:>9.3f}  {categorize(name)}")


# -------------------------------------------------------------------------------------------------

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
    p.add_argument("--ceiling", action="store_true", help="also time the step's GEMMs and attention alone: the MFU ceiling")
    p.add_argument("--breakdown", action="store_true",
                   help=f"profile the last {PROFILE_STEPS} steps of each run and show where their time goes")
    args = p.parse_args()
    if args.steps <= args.warmup + (PROFILE_STEPS if args.breakdown else 0):
        p.error("--steps must exceed --warmup" + (f" + {PROFILE_STEPS} profiled steps" if args.breakdown else ""))
    gpu, peak = peak_flops(args)
    rows, ceilings, profiles = [], {}, []
    for model in args.models:
        for compile_ in ([False] if args.no_compile else [True] if args.compile_only else [False, True]):
            tps, ops = run(model, args, compile_)
            rows.append((model, compile_, tps, tps * flops_per_token(model, args.seq_len)))
            if ops:
                profiles.append((model, compile_, ops))
        if args.ceiling:  # after the runs, so that they have the device to themselves
            ceilings[model] = measure_ceiling(model, args)
    print(f"\n{gpu}, peak {peak / 1e12:g} TFLOP/s; {args.batch} x {args.seq_len} tokens per step, "
          f"{args.precision}, steps {args.warmup + 1}-{args.steps - (PROFILE_STEPS if args.breakdown else 0)}")
    print(f"{'model':<12} {'compile':<8} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}"
          + (f" {'ceiling':>8} {'of ceiling':>10}" if args.ceiling else ""))
    for model, compile_, tps, achieved in rows:
        line = f"{model:<12} {'yes' if compile_ else 'no':<8} {tps:>10,.0f} {achieved / 1e12:>8.1f} {achieved / peak:>6.1%}"
        if args.ceiling:
            c = ceilings[model]
            line += f" {c['model_flops'] / c['floor_s'] / peak:>8.1%} {achieved * c['floor_s'] / c['model_flops']:>10.1%}"
        print(line)
    for model, c in ceilings.items():
        print_ceiling(model, c, peak)
    for model, compile_, ops in profiles:
        print_breakdown(model, compile_, ops)


if __name__ == "__main__":
    main()
