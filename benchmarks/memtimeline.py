"""A memory timeline of one training step: what is allocated, by phase, and what is alive at the peak.

torch.profiler's memory events (`profile_memory=True`: every block the allocator hands out or takes
back on the device, with the op that asked for it) are replayed in time order, each block tagged
with the phase it was allocated in (the `record_function` ranges named `phase:NAME` around forward,
backward, reduction, optimizer step) and the op and caller that allocated it. Bytes are counted
from the step's start (the model states that exist before it are not in the profile; a block of
theirs that is freed takes the count below zero). `summary()` gives, for each phase, the count at
its start, its highest and its end, and at the step's peak the live bytes by allocating phase and
the live bytes by allocating phase and op. (torch's tensor-level categories, `export_memory_timeline`, fail on the
aliasing of flat-buffer engines: "version mismatch" in its data-flow graph; so they are not used.)
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.profiler import ProfilerActivity, profile, record_function

PREFIX = "phase:"
MiB = 2**20


@contextmanager
def phase(name: str):
    with record_function(PREFIX + name):
        yield


def record(step, device: torch.device):
    """Run `step()` under the memory profiler; returns the profile."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step()
    return prof


def _phases(prof) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of the phase ranges, in order."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.name().startswith(PREFIX):
            out.append((e.name()[len(PREFIX):], e.start_ns(), e.start_ns() + e.duration_ns()))
    return sorted(out, key=lambda x: x[1])


def _origin(node) -> str:
    """The op that allocated a block and the nearest caller that is not an aten op (autograd's
    backward nodes, the engine's own functions, the phase)."""
    names, p = [], node.parent
    while p is not None and len(names) < 2:
        name = p.name
        if not names or not name.startswith("aten::"):
            names.append(name[len(PREFIX):] if name.startswith(PREFIX) else name)
        p = p.parent
    return " < ".join(names) or "?"


def summary(prof, device: torch.device, top: int = 8) -> dict:
    """Bytes allocated since the step began, per phase, and what is alive at the peak."""
    from torch._C._profiler import _EventType
    from torch.profiler._memory_profiler import OpTree

    phases = _phases(prof)
    allocs = [(n.start_time_ns, n.typed[1], n) for n in OpTree(prof.profiler.kineto_results).sorted_nodes
              if n.typed[0] == _EventType.Allocation and n.typed[1].device == device]

    def phase_at(t: int) -> str:
        name = "before"
        for n, lo, _ in phases:
            if t >= lo:
                name = n
        return name

    live: dict[int, tuple[int, str, str]] = {}  # ptr -> (bytes, allocating phase, origin)
    total, peak, peak_t, peak_live = 0, 0, 0, {}
    per_phase = {n: {"start": None, "high": None, "end": None} for n, _, _ in phases}
    for t, a, node in sorted(allocs, key=lambda x: x[0]):
        now = phase_at(t)
        if a.alloc_size > 0:
            live[a.ptr] = (a.alloc_size, now, _origin(node))
        else:
            live.pop(a.ptr, None)  # a block from before the step is freed: the total goes below its start
        total += a.alloc_size
        if now in per_phase:
            v = per_phase[now]
            v["start"] = total - a.alloc_size if v["start"] is None else v["start"]
            v["high"] = total if v["high"] is None else max(v["high"], total)
            v["end"] = total
        if total > peak:
            peak, peak_t, peak_live = total, t, dict(live)
    by_phase: dict[str, int] = {}
    for size, born, _ in peak_live.values():
        by_phase[born] = by_phase.get(born, 0) + size
    groups: dict[tuple[str, str], list[int]] = {}  # (phase, origin) -> [bytes, blocks]
    for size, born, origin in peak_live.values():
        v = groups.setdefault((born, origin), [0, 0])
        v[0], v[1] = v[0] + size, v[1] + 1
    largest = sorted(((v[0], born, f"{origin} (x{v[1]})") for (born, origin), v in groups.items()),
                     key=lambda v: -v[0])[:top]
    return {"peak": peak, "peak_phase": phase_at(peak_t), "per_phase": per_phase,
            "by_phase": dict(sorted(by_phase.items(), key=lambda kv: -kv[1])),
            "largest": [{"bytes": sz, "allocated_in": born, "by": origin} for sz, born, origin in largest]}


def render(name: str, s: dict) -> str:
    """A few lines of text for one contender's summary."""
    def mib(x):
        return f"{(x or 0) / MiB:,.1f}"

    lines = [f"{name}: peak {mib(s['peak'])} MiB above the step's start, in {s['peak_phase']}",
             "  phase          start MiB    high MiB     end MiB"]
    for n, v in s["per_phase"].items():
        lines.append(f"  {n:<12} {mib(v['start']):>10} {mib(v['high']):>11} {mib(v['end']):>11}")
    lines.append("  alive at the peak, by the phase that allocated it: " +
                 ", ".join(f"{k} {mib(b)}" for k, b in s["by_phase"].items()))
    lines.append("  alive at the peak, by phase and allocating op (largest first):")
    lines += [f"    {mib(x['bytes']):>8} MiB  {x['allocated_in']:<9} {x['by']}" for x in s["largest"]]
    return "\n".join(lines)
