"""The memory a run needs at least on this machine, known before any worker starts.

A floor, not an estimate (the planner's cost model gives those): each local cpu worker's
measured baseline, the int64 token windows of the whole global batch that every worker draws
(data.TokenLoader.batch), and on cpu a worker's share of one micro-batch's activations: each of
its blocks keeps at least its input for backward, and without pipeline stages it holds the
fp32 logits. A run past the floor would be killed for memory once its workers had started.
"""

from __future__ import annotations

from paratrain.planner.hardware import cpu_local


def local_memory_problem(cfg, world_size: int | None) -> str | None:
    """One line naming the flag when the RunConfig `cfg` cannot fit this machine's memory, else
    None. `world_size` is the launcher's (torchrun: this process only is counted)."""
    from paratrain.models.catalog import run_shape

    hw, lay, tr, m = cpu_local(), cfg.layout, cfg.train, run_shape(cfg)
    local_cpu, workers = tr.device == "cpu" and world_size is None, lay.world_size if world_size is None else 1
    if local_cpu and cfg.world_size * hw.reserve_bytes > hw.memory_bytes:
        return (f"layout: {cfg.world_size} local workers need about {cfg.world_size * hw.reserve_bytes / 2**30:.0f} "
                f"GiB ({hw.reserve_bytes / 2**20:.0f} MiB each before the model) but this machine has "
                f"{hw.memory_bytes / 2**30:.0f} GiB; use fewer --dp/--tp/--pp, or torchrun across machines")
    tokens = 8 * tr.global_batch * (tr.seq_len + 1)
    rows = tr.global_batch // (lay.dp * lay.microbatches) * tr.seq_len  # tokens of one micro-batch
    acts = 0.0
    if tr.device == "cpu" and m is not None:
        acts = rows * m.d_model * (m.n_layer // lay.pp) * (4 if tr.precision == "fp32" else 2) / lay.tp
        acts += 4 * rows * m.vocab_size / lay.tp if lay.pp == 1 else 0
    need = workers * (tokens + acts) + (cfg.world_size * hw.reserve_bytes if local_cpu else 0)
    if need <= hw.memory_bytes:
        return None
    return (f"--global-batch: {tr.global_batch} sequences of {tr.seq_len} tokens need at least "
            f"{need / 2**30:,.1f} GiB here ({workers} worker{'s' * (workers > 1)}, each with "
            f"{tokens / 2**30:,.1f} GiB of token ids" + (f" and {acts / 2**30:,.1f} GiB of activations" if acts else "")
            + f") but this machine has {hw.memory_bytes / 2**30:.0f} GiB; use a smaller --global-batch or --seq-len"
            + (" or more --microbatches" if acts else ""))
