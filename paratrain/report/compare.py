"""`paratrain compare`: run layouts side by side on this machine and write a report.

Each layout trains the same model from the same seed on the same global batches, one after the
other, through the same path as `paratrain train` (its metrics file, and the pipeline timeline
for pp layouts). The report gathers, per layout: tokens/s, step time, peak memory per rank and
the model states in it, bytes communicated per step, the pipeline's measured idle time against
the schedule's bubble, the final loss, and (when the planner is available) its predicted time
and memory. It writes `report.md`, a self-contained `report.html` (images inlined),
`results.json` and PNG plots, and a recommendation computed from what was measured. A layout
that is refused or fails is reported with its error; the others still run.
"""

from __future__ import annotations

import base64
import copy
import html
import json
import os
import statistics

from paratrain.config import ConfigError, RunConfig, format_layout, parse_layout, validate

MiB = 2**20


def default_layouts(world: int) -> list[str]:
    """A sensible comparison for `world` local ranks: each strategy alone, then hybrids."""
    if world <= 1:
        return ["dp=1", "dp=1,zero=0,mb=4"]
    layouts = [f"dp={world}", f"tp={world}", f"pp={world},schedule=1f1b,mb={2 * world}", f"dp={world},zero=3"]
    if world >= 4:
        half = world // 2
        layouts += [f"dp={half},tp=2", f"dp={half},pp=2,mb=4"]
    return layouts


def slug(text: str) -> str:
    return text.replace("=", "").replace(",", "-")


def run_layout(base: RunConfig, spec: str, out: str) -> dict:
    """Train one layout; its figures, or {"error": ...} if it was refused or failed."""
    from paratrain.launch import WorkerFailed, launch

    cfg = copy.deepcopy(base)
    name = slug(spec)
    try:
        lay = parse_layout(spec)
        for key in ("dp", "tp", "pp", "zero", "schedule", "microbatches", "virtual_stages", "sequence_parallel"):
            setattr(cfg.layout, key, getattr(lay, key))
        cfg.train.metrics = os.path.join(out, "runs", f"{name}.jsonl")
        cfg.train.timeline = os.path.join(out, "runs", f"{name}-timeline") if lay.pp > 1 else None
        validate(cfg)
        result = launch(cfg)
    except (ConfigError, WorkerFailed, ValueError) as e:
        return {"layout": spec, "error": str(e).splitlines()[0] if str(e) else type(e).__name__}
    records = [json.loads(line) for line in open(cfg.train.metrics)]
    steps = [r for r in records if "step" in r and "loss" in r]
    steady = steps[1:] or steps
    memory = result["memory_per_rank"]
    row = {
        "layout": spec,
        "canonical": format_layout(cfg.layout),
        "world_size": cfg.layout.world_size,
        "tokens_per_s": result["tokens_per_s"],
        "tflops_per_device": result["tflops_per_device"],
        "mfu": result["mfu"],
        "step_time_s": statistics.median(s["step_time_s"] for s in steady),
        "peak_mem_bytes": max(m["peak"] for m in memory),
        "model_state_bytes": max(m["params"] + m["grads"] + m["optimizer"] for m in memory),
        "param_bytes": max(m["params"] for m in memory),
        "comm_bytes_per_step": statistics.median(s["comm_bytes"] for s in steady),
        "final_loss": result["final_loss"],
        "val_loss": result["val_loss"],
        "losses": [s["loss"] for s in steps],
        "bubble_measured": None,
        "bubble_theory": None,
        "timeline_png": None,
    }
    if "pipeline_idle_per_stage" in result:
        row["bubble_measured"] = statistics.mean(result["pipeline_idle_per_stage"])
        row["bubble_theory"] = result["pipeline_bubble_theory"]
        row["timeline_png"] = os.path.join(cfg.train.timeline, "timeline.png")
    row.update(predict(cfg))
    return row


def predict(cfg: RunConfig) -> dict:
    """The planner's predicted step time and peak memory for this layout (None without it)."""
    try:
        from paratrain.planner import predict_layout  # type: ignore[attr-defined]
    except ImportError:
        return {"predicted_step_time_s": None, "predicted_peak_mem_bytes": None}
    try:
        p = predict_layout(cfg)
    except Exception as e:  # a prediction is a bonus; its failure must not fail the comparison
        return {"predicted_step_time_s": None, "predicted_peak_mem_bytes": None, "prediction_error": str(e)}
    return {"predicted_step_time_s": p["step_time_s"], "predicted_peak_mem_bytes": p["peak_mem_bytes"]}


# ------------------------------------------------------------------ plots
def _figure(width=7.0, height=3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def plot_losses(rows: list[dict], path: str) -> None:
    fig, ax = _figure()
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(rows):
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], styles[i % 4], label=r["layout"], linewidth=1.4)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("loss per step (the same math in every layout: the curves coincide)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_bars(rows: list[dict], key: str, scale: float, ylabel: str, title: str, path: str) -> None:
    fig, ax = _figure()
    names = [r["layout"] for r in rows]
    values = [r[key] / scale for r in rows]
    bars = ax.bar(range(len(rows)), values, color="#4C72B0")
    ax.bar_label(bars, labels=[f"{v:,.1f}" if v < 100 else f"{v:,.0f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=15, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_memory(rows: list[dict], path: str) -> None:
    fig, ax = _figure()
    x = range(len(rows))
    states = [r["model_state_bytes"] / MiB for r in rows]
    rest = [max(0.0, (r["peak_mem_bytes"] - r["model_state_bytes"]) / MiB) for r in rows]
    ax.bar(x, states, color="#55A868", label="model states (params, grads, optimizer)")
    ax.bar(x, rest, bottom=states, color="#CCCCCC", label="rest of the peak (activations, runtime)")
    ax.set_xticks(list(x), [r["layout"] for r in rows], rotation=15, fontsize=8)
    ax.set_ylabel("MiB, largest rank")
    ax.set_title("peak memory per rank")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------ the words
def _fmt_bytes(n: float) -> str:
    return f"{n / MiB:,.1f} MiB" if n >= MiB else f"{n / 1024:,.1f} KiB"


def recommend(rows: list[dict], model: str) -> str:
    """One paragraph from the measured figures: what wins here, and what it trades."""
    if not rows:
        return "No layout completed, so there is nothing to recommend; see the errors above."
    fast = max(rows, key=lambda r: r["tokens_per_s"])
    slow = min(rows, key=lambda r: r["tokens_per_s"])
    lean = min(rows, key=lambda r: r["model_state_bytes"])
    words = [f"On this machine `{fast['layout']}` is the fastest layout for `{model}` "
             f"({fast['tokens_per_s']:,.0f} tokens/s, {fast['tokens_per_s'] / slow['tokens_per_s']:.2f}x "
             f"`{slow['layout']}`)."]
    lay = parse_layout(fast["layout"])
    plain = [r for r in rows if parse_layout(r["layout"]).tp == 1 and parse_layout(r["layout"]).pp == 1
             and parse_layout(r["layout"]).zero == 0]
    ref = plain[0] if plain else max(rows, key=lambda r: r["model_state_bytes"])
    if lay.tp == 1 and lay.pp == 1 and lay.zero == 0:
        words.append(f"Each of its ranks runs the whole model and communicates once per step "
                     f"({_fmt_bytes(fast['comm_bytes_per_step'])} per step over all ranks), so nothing waits on a "
                     f"neighbour inside the step.")
    elif lay.tp == 1 and lay.pp == 1:
        words.append(f"It shards the model states over its ranks ({_fmt_bytes(fast['model_state_bytes'])} per rank "
                     f"against {_fmt_bytes(ref['model_state_bytes'])} for `{ref['layout']}`) and sends "
                     f"{_fmt_bytes(fast['comm_bytes_per_step'])} per step, gathers and reduce-scatters that overlap "
                     f"with compute.")
    elif lay.pp > 1 and lay.tp == 1:
        words.append(f"It gives each rank a contiguous part of the layers and sends only activations and their "
                     f"gradients between stages ({_fmt_bytes(fast['comm_bytes_per_step'])} per step), with model "
                     f"states of {_fmt_bytes(fast['model_state_bytes'])} per rank against "
                     f"{_fmt_bytes(ref['model_state_bytes'])} for `{ref['layout']}`.")
    elif lay.tp > 1:
        words.append(f"It splits every block over its ranks: {_fmt_bytes(fast['model_state_bytes'])} of model states "
                     f"per rank and {_fmt_bytes(fast['comm_bytes_per_step'])} of per-block all-reduces per step, "
                     f"which this machine's links carry cheaply enough.")
    for r in rows:
        other = parse_layout(r["layout"])
        if other.tp > 1 and r is not fast:
            words.append(f"`{r['layout']}` splits every block, cutting model states per rank to "
                         f"{_fmt_bytes(r['model_state_bytes'])} (against {_fmt_bytes(ref['model_state_bytes'])} for "
                         f"`{ref['layout']}`), but sends {_fmt_bytes(r['comm_bytes_per_step'])} per step in per-block "
                         f"all-reduces that the compute must wait for.")
            break
    piped = [r for r in rows if r["bubble_measured"] is not None]
    if piped:
        p = piped[0]
        words.append(f"`{p['layout']}` leaves its ranks idle {p['bubble_measured']:.0%} of the step "
                     f"(the schedule's bubble alone is {p['bubble_theory']:.0%}); more micro-batches shrink it.")
    if lean is not fast and lean["model_state_bytes"] < 0.9 * fast["model_state_bytes"]:
        words.append(f"If memory is what limits you, `{lean['layout']}` holds the least model state per rank "
                     f"({_fmt_bytes(lean['model_state_bytes'])} against {_fmt_bytes(fast['model_state_bytes'])}).")
    words.append("Timings on a shared machine vary by several percent between runs; the losses do not.")
    return " ".join(words)


def _row_cells(r: dict) -> list[str]:
    def opt(v, f):
        return f(v) if v is not None else "-"

    bubble = "-" if r["bubble_measured"] is None else f"{r['bubble_measured']:.1%} / {r['bubble_theory']:.1%}"
    flops = f"{r['tflops_per_device']:.3g}" + ("" if r["mfu"] is None else f" ({r['mfu']:.1%})")
    return [r["layout"], f"{r['tokens_per_s']:,.0f}", flops, f"{r['step_time_s'] * 1e3:,.0f}",
            opt(r.get("predicted_step_time_s"), lambda v: f"{v * 1e3:,.0f}"),
            f"{r['peak_mem_bytes'] / MiB:,.0f}", opt(r.get("predicted_peak_mem_bytes"), lambda v: f"{v / MiB:,.0f}"),
            f"{r['model_state_bytes'] / MiB:,.1f}", _fmt_bytes(r["comm_bytes_per_step"]), bubble,
            f"{r['final_loss']:.4f}"]


HEAD = ["layout", "tokens/s", "TFLOP/s per device (MFU)", "step ms", "predicted ms", "peak MiB", "predicted MiB", "model states MiB",
        "comm per step", "pp idle / bubble", "final loss"]


def write_report(out: str, model: str, args_line: str, rows: list[dict], failed: list[dict], plots: list[str]) -> None:
    text = recommend(rows, model)
    md = [f"# paratrain compare: {model}", "", f"`{args_line}`", "",
          "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(_row_cells(r)) + " |" for r in rows]
    md += [""] + [f"- `{f['layout']}` failed: {f['error']}" for f in failed] + ([""] if failed else [])
    md += ["## Recommendation", "", text, ""] + [f"![{os.path.basename(p)}]({os.path.relpath(p, out)})" for p in plots]
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write("\n".join(md) + "\n")

    def img(p):
        data = base64.b64encode(open(p, "rb").read()).decode()
        return f'<img alt="{html.escape(os.path.basename(p))}" src="data:image/png;base64,{data}">'

    cells = "".join(f"<th>{html.escape(h)}</th>" for h in HEAD)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in _row_cells(r)) + "</tr>" for r in rows)
    fails = "".join(f"<li><code>{html.escape(f['layout'])}</code> failed: {html.escape(f['error'])}</li>" for f in failed)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>paratrain compare: {html.escape(model)}</title>"
            "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>paratrain compare: {html.escape(model)}</h1><p><code>{html.escape(args_line)}</code></p>"
            f"<table><tr>{cells}</tr>{body}</table><ul>{fails}</ul><h2>Recommendation</h2><p>{html.escape(text)}</p>"
            + "".join(img(p) for p in plots) + "</body></html>")
    with open(os.path.join(out, "report.html"), "w") as fh:
        fh.write(page)


def compare(base: RunConfig, layouts: list[str], out: str, args_line: str) -> dict:
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    results = []
    for spec in layouts:
        print(f"paratrain compare: {spec}", flush=True)
        results.append(run_layout(base, spec, out))
    rows = [r for r in results if "error" not in r]
    failed = [r for r in results if "error" in r]
    plots = []
    if rows:
        plots = [os.path.join(out, n) for n in ("loss.png", "throughput.png", "memory.png", "comm.png")]
        plot_losses(rows, plots[0])
        plot_bars(rows, "tokens_per_s", 1.0, "tokens/s", "throughput (higher is better)", plots[1])
        plot_memory(rows, plots[2])
        plot_bars(rows, "comm_bytes_per_step", MiB, "MiB per step, all ranks", "bytes communicated per step", plots[3])
        for r in rows:
            if r["timeline_png"]:
                plots.append(os.path.join(out, f"timeline-{slug(r['layout'])}.png"))
                os.replace(r["timeline_png"], plots[-1])
                r["timeline_png"] = plots[-1]
    summary = {"model": base.model.name, "steps": base.train.steps, "global_batch": base.train.global_batch,
               "seq_len": base.train.seq_len, "seed": base.train.seed, "results": results,
               "recommendation": recommend(rows, base.model.name)}
    with open(os.path.join(out, "results.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    write_report(out, base.model.name, args_line, rows, failed, plots)
    return summary
