"""`paratrain train --profile DIR`: torch.profiler over the last steps of a run.

The last `--profile-steps` steps (warm by then: compiled, allocator settled) run under
torch.profiler, each inside a `paratrain step N` range. Every rank writes to DIR
- `trace_rank{r}.json`: a Chrome trace (chrome://tracing, Perfetto), kernels on their streams;
- `ops_rank{r}.txt`: the profiler's table of operators and kernels, by self time;
- `ops_rank{r}.json`: the same as data, for scripts such as benchmarks/mfu.py --breakdown:
  {"device", "steps", "wall_s", "ops": [{"name", "calls", "self_device_s", "self_cpu_s",
  "on_device", "annotation"}]}, where `wall_s` is the wall-clock time of the profiled steps
  together. The device's busy time is the sum of `self_device_s` over the entries `on_device`
  (kernels, copies) that are not an `annotation` (a named range's copy on the GPU timeline);
  an operator that launched kernels also carries their time as its own, so only the kernels
  count. On a CPU the operators carry the time.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import nullcontext

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function


class StepProfiler:
    """Profiles steps `first`..`last` of a run (none without a folder); `around(step)` wraps one step."""

    def __init__(self, folder: str | None, first: int, last: int, rank: int, device: torch.device):
        self.folder, self.first, self.last, self.rank, self.device = folder, first, last, rank, device
        if not folder:
            self.first, self.last = 1, 0
        self.prof: profile | None = None
        self.wall = 0.0

    def around(self, step: int):
        if not self.first <= step <= self.last:
            return nullcontext()
        if self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities)
            self.prof.start()
        return _Timed(self, step)

    def _done(self, step: int, seconds: float) -> None:
        self.wall += seconds
        if step == self.last:
            self.prof.stop()
            self.write()

    def write(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        path = lambda kind: os.path.join(self.folder, f"{kind}_rank{self.rank}")  # noqa: E731
        self.prof.export_chrome_trace(path("trace") + ".json")
        events = self.prof.key_averages()
        by = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        with open(path("ops") + ".txt", "w") as f:
            f.write(events.table(sort_by=by, row_limit=60, max_name_column_width=90) + "\n")
        ops = [{"name": e.key, "calls": e.count, "self_device_s": e.self_device_time_total / 1e6,
                "self_cpu_s": e.self_cpu_time_total / 1e6, "on_device": e.device_type != DeviceType.CPU,
                "annotation": bool(e.is_user_annotation)} for e in events]
        ops.sort(key=lambda o: (o["self_device_s"], o["self_cpu_s"]), reverse=True)
        with open(path("ops") + ".json", "w") as f:
            json.dump({"device": self.device.type, "steps": self.last - self.first + 1, "wall_s": self.wall,
                       "ops": ops}, f, indent=1)


class _Timed:
    """One profiled step: a named range, and its wall-clock time once the device is done."""

    def __init__(self, owner: StepProfiler, step: int):
        self.owner, self.step = owner, step
        self.range = record_function(f"paratrain step {step}")

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.range.__enter__()

    def __exit__(self, *exc):
        self.range.__exit__(*exc)
        if self.owner.device.type == "cuda":
            torch.cuda.synchronize(self.owner.device)
        if exc[0] is None:
            self.owner._done(self.step, time.perf_counter() - self.t0)
        return False
