"""Does the planner predict this machine? Calibrate cpu-local, train `small` in several layouts,
and compare predicted with measured step time and peak memory.

    python benchmarks/planner_validation.py [--steps 20] [--no-calibrate] [--json out.json]

Measured time: the median `step_time_s` over steps 2.. of the metrics file (step 1 pays for
warm-up). Measured memory: the largest `peak_mem_bytes_per_rank` of the end record. On CPU that is
the process's peak resident set, which includes the interpreter, torch, gloo and the corpus;
cpu-local's memory model adds that worker baseline, measured by the calibration in a worker
process that has loaded everything but the model, so the two are compared as they are.
Machines shared with other jobs are noisy: the load average is printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from paratrain.models.gpt import PRESETS  # noqa: E402
from paratrain.planner.cost import Candidate, estimate  # noqa: E402
from paratrain.planner.calibrate import calibrate  # noqa: E402
from paratrain.planner.hardware import cpu_local  # noqa: E402

MODEL, GLOBAL_BATCH, SEQ = "small", 16, 128

# (flags for `paratrain train`, the same layout for the planner)
CUDA_LAYOUTS = [  # --cuda: gpt2 in bf16 on one GPU, against the preset of that GPU
    (["--dp", "1"], Candidate(dp=1, precision="bf16")),
    (["--dp", "1", "--microbatches", "2"], Candidate(dp=1, microbatches=2, precision="bf16")),
    (["--dp", "1", "--microbatches", "4"], Candidate(dp=1, microbatches=4, precision="bf16")),
    (["--dp", "1", "--activation-checkpointing"], Candidate(dp=1, activation_checkpointing=True, precision="bf16")),
]
LAYOUTS = [
    (["--dp", "1"], Candidate(dp=1)),
    (["--dp", "2"], Candidate(dp=2)),
    (["--dp", "2", "--microbatches", "2"], Candidate(dp=2, microbatches=2)),
    (["--dp", "2", "--zero", "1"], Candidate(dp=2, zero=1)),
    (["--dp", "2", "--zero", "3"], Candidate(dp=2, zero=3)),
    (["--tp", "2"], Candidate(tp=2)),
    (["--tp", "2", "--sequence-parallel"], Candidate(tp=2, sequence_parallel=True)),
    (["--pp", "2", "--schedule", "1f1b", "--microbatches", "4"], Candidate(pp=2, schedule="1f1b", microbatches=4)),
    (["--pp", "2", "--schedule", "gpipe", "--microbatches", "4"], Candidate(pp=2, schedule="gpipe", microbatches=4)),
    (["--dp", "1", "--activation-checkpointing"], Candidate(dp=1, activation_checkpointing=True)),
]


def describe(c: Candidate) -> str:
    extra = []
    if c.pp > 1:
        extra.append(f"{c.schedule} m={c.microbatches}")
    elif c.microbatches > 1:
        extra.append(f"m={c.microbatches}")
    if c.sequence_parallel:
        extra.append("SP")
    if c.activation_checkpointing:
        extra.append("AC")
    return c.label + (" " + " ".join(extra) if extra else "")


def measure(flags: list[str], steps: int, device: str = "cpu") -> tuple[float, int, list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.jsonl")
        cmd = [sys.executable, "-m", "paratrain", "train", "--model", MODEL, "--steps", str(steps), "--global-batch",
               str(GLOBAL_BATCH), "--seq-len", str(SEQ), "--device", device, "--metrics", path, "--no-progress", *flags]
        if device == "cuda":
            cmd += ["--precision", "bf16"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(flags)} failed:\n{r.stderr[-2000:]}")
        records = [json.loads(line) for line in open(path)]
    times = [s["step_time_s"] for s in records if "step" in s and "event" not in s and s["step"] >= 2]
    end = records[-1]
    return statistics.median(times), max(end["peak_mem_bytes_per_rank"]), times


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = v.argsort()
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # ties share their mean rank
            r[v == val] = r[v == val].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-calibrate", action="store_true", help="use the saved calibration")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--cuda", action="store_true",
                    help="gpt2 (bf16, global batch 8 x 1024) on this machine's GPU against its preset; measured "
                         "memory is the allocator's peak, so the prediction is shown without the preset's reserve")
    args = ap.parse_args()
    global MODEL, GLOBAL_BATCH, SEQ
    print(f"load average before: {os.getloadavg()[0]:.1f}; {len(os.sched_getaffinity(0))} cores for this run",
          flush=True)
    if args.cuda:
        from dataclasses import replace

        import torch

        from paratrain.planner.search import local_hardware

        MODEL, GLOBAL_BATCH, SEQ = "gpt2", 8, 1024
        hw, _, _ = local_hardware("cuda")
        hw = replace(hw, reserve_bytes=0.0)
        print(f"{torch.cuda.get_device_name(0)}: priced as {hw.name}", flush=True)
    else:
        hw = cpu_local() if args.no_calibrate else calibrate(log=lambda m: print(m, flush=True))
    print(f"{hw.name}: {hw.note}", flush=True)
    cfg = PRESETS[MODEL]
    rows = []
    for flags, cand in CUDA_LAYOUTS if args.cuda else LAYOUTS:
        e = estimate(cfg, SEQ, GLOBAL_BATCH, cand, hw, gpus_per_node=cand.world)
        t, mem, times = measure(flags, args.steps, "cuda" if args.cuda else "cpu")
        rows.append({"layout": describe(cand), "pred_s": e.step_time_s, "meas_s": t, "pred_mem": e.peak_mem_bytes,
                     "meas_mem": mem, "steps_s": times, "breakdown": e.as_dict()["time_breakdown_s"]})
        r = rows[-1]
        print(f"  {r['layout']:<40} predicted {r['pred_s']:.3f} s measured {t:.3f} s "
              f"(steps {min(times):.3f}-{max(times):.3f}); memory {e.peak_mem_bytes / 2**20:.0f} vs {mem / 2**20:.0f} MiB",
              flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print()
    print(f"{'layout':<40} {'pred s':>7} {'meas s':>7} {'err':>6}   {'pred MiB':>8} {'meas MiB':>8} {'err':>6}")
    terr, merr = [], []
    for r in rows:
        te = (r["pred_s"] - r["meas_s"]) / r["meas_s"]
        me = (r["pred_mem"] - r["meas_mem"]) / r["meas_mem"]
        terr.append(abs(te))
        merr.append(abs(me))
        print(f"{r['layout']:<40} {r['pred_s']:>7.3f} {r['meas_s']:>7.3f} {te:>+6.0%}   "
              f"{r['pred_mem'] / 2**20:>8.0f} {r['meas_mem'] / 2**20:>8.0f} {me:>+6.0%}")
    rho = spearman([r["pred_s"] for r in rows], [r["meas_s"] for r in rows])
    print()
    print(f"median |error|: time {statistics.median(terr):.1%} (target < 25%), memory {statistics.median(merr):.1%} "
          f"(target < 15%); Spearman rank correlation of times {rho:.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "median_time_error": statistics.median(terr),
                       "median_memory_error": statistics.median(merr), "spearman": rho}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
