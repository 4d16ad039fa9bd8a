"""Pipeline timelines: Chrome trace-event JSON (Perfetto, chrome://tracing) and a PNG per run.

An event is {"rank": int, "name": str, "kind": "F" | "B" | "send" | "recv" | "idle" | ...,
"start": float, "end": float}, times in seconds; the executor records them from a real run and
`events_from_simulation` makes them from `schedule.simulate`.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from paratrain.parallel.pipeline.schedule import Timeline

COLOURS = {"F": "#4C72B0", "B": "#55A868", "send": "#C44E52", "recv": "#DD8452", "idle": "#DDDDDD"}
THIN = ("send", "recv")


def events_from_simulation(sim: Timeline) -> list[dict]:
    """Events (kind F/B, name str(action)) from `simulate`'s per-rank (action, start, end)."""
    return [{"rank": rank, "name": str(a), "kind": a.kind, "start": start, "end": end}
            for rank, steps in enumerate(sim) for a, start, end in steps]


def chrome_trace(events: list[dict], path: str) -> None:
    """Write the Chrome trace-event format: one complete ("X") event per entry, one thread per rank."""
    ranks = sorted({int(e["rank"]) for e in events})
    trace: list[dict] = [{"ph": "M", "name": "process_name", "pid": 0, "tid": 0,
                          "args": {"name": "pipeline"}}]
    for r in ranks:
        trace.append({"ph": "M", "name": "thread_name", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
        trace.append({"ph": "M", "name": "thread_sort_index", "pid": 0, "tid": r, "args": {"sort_index": r}})
    for e in events:
        trace.append({"ph": "X", "name": str(e["name"]), "cat": str(e["kind"]), "pid": 0,
                      "tid": int(e["rank"]), "ts": float(e["start"]) * 1e6,
                      "dur": max(float(e["end"]) - float(e["start"]), 0.0) * 1e6,
                      "args": {"kind": e["kind"]}})
    with open(path, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f)


def _label(e: dict) -> str:
    """Micro-batch part of the name: "F3.1" -> "3.1"; other names are kept."""
    name, kind = str(e["name"]), str(e["kind"])
    return name[len(kind):] if kind in ("F", "B") and name.startswith(kind) else name


def plot_timeline(events: list[dict], path: str, title: str = "", row: str = "rank") -> None:
    """Save a PNG: one row per rank (rank 0 on top), F and B boxes labelled with the micro-batch,
    send/recv as thin bars under them, x axis time in seconds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ranks = sorted({int(e["rank"]) for e in events}) or [0]
    index = {r: i for i, r in enumerate(ranks)}
    t_end = max((float(e["end"]) for e in events), default=1.0) or 1.0
    fig = Figure(figsize=(max(8.0, min(24.0, 0.25 * len(events) / len(ranks) + 4)), 1 + 0.6 * len(ranks)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for e in events:
        kind, start = str(e["kind"]), float(e["start"])
        width = max(float(e["end"]) - start, 0.0)
        y = index[int(e["rank"])]
        colour = COLOURS.get(kind, "#8172B2")
        if kind in THIN:
            ax.barh(y + 0.48, width, left=start, height=0.1, color=colour)
            continue
        ax.barh(y, width, left=start, height=0.8, color=colour, edgecolor="black", linewidth=0.4)
        if kind in ("F", "B") and width > 0.012 * t_end:
            ax.text(start + width / 2, y, _label(e), ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks(range(len(ranks)), [f"{row} {r}" for r in ranks])
    ax.set_ylim(len(ranks) - 0.5, -0.5)
    ax.set_xlim(0, t_end)
    ax.set_xlabel("time (s)")
    if title:
        ax.set_title(title)
    kinds = [k for k in COLOURS if any(e["kind"] == k for e in events)]
    ax.legend(handles=[Patch(color=COLOURS[k], label=k) for k in kinds], loc="upper left",
              bbox_to_anchor=(1.005, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_run_timeline(executor, mesh, folder: str, title: str) -> None:
    """The executor's last run, every stage (dp and tp coordinate 0), as a Chrome trace
    (`timeline.json`) and a PNG (`timeline.png`), written by rank 0. Collective: every rank calls it."""
    mine = []
    if mesh.coord("dp") == 0 and mesh.coord("tp") == 0:
        mine = [{**e, "rank": mesh.coord("pp")} for e in executor.events]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (executor.wall_start, mine))
    if mesh.rank != 0:
        return
    t0 = min(w for w, ev in gathered if ev)
    events = [{**e, "start": e["start"] + w - t0, "end": e["end"] + w - t0} for w, ev in gathered for e in ev]
    os.makedirs(folder, exist_ok=True)
    chrome_trace(events, os.path.join(folder, "timeline.json"))
    plot_timeline(events, os.path.join(folder, "timeline.png"), title=title, row="stage")
    print(f"paratrain: pipeline timeline written to {folder}/timeline.json and timeline.png", flush=True)
