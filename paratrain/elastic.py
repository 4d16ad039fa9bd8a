"""Elastic runs: the data-parallel degree taken from the world at every (re)start.

Under `torchrun --nnodes MIN:MAX` a lost node comes back as a smaller world at the next
rendezvous, a joining one as a larger. With `--dp auto` (or no --dp under torchrun), each start
keeps tp and pp and gives dp the rest of the world, so lost capacity comes out of dp, and keeps
the global batch, as Horovod Elastic and DeepSpeed's elasticity do: synchronous SGD's math does
not change with the world, since the batches depend only on (seed, step) and the loss is
normalised by the global token count. Each rank's share grows or shrinks; the micro-batch stays
as large as the run's newest checkpoint had it, by more (or fewer) micro-batches per step, so a
smaller world needs no more activation memory. The trainer resumes from that checkpoint in any
layout, and the metrics file records the change (fit.membership_change).
"""

from __future__ import annotations

import os
import re

from paratrain.config import ConfigError, RunConfig


def derive_dp(cfg: RunConfig, world: int) -> None:
    """Set cfg.layout.dp from a world of `world` ranks, and the micro-batches that keep the newest
    checkpoint's micro-batch size; ConfigError (one line) where the world does not fit."""
    lay, tr = cfg.layout, cfg.train
    if tr.sync == "ps":
        raise ConfigError("--dp auto: parameter-server runs have a fixed set of servers and workers; give --dp")
    rest = lay.tp * lay.pp
    if world % rest:
        raise ConfigError(f"--dp auto: the world of {world} ranks does not divide by tp x pp = {rest}; "
                          f"start a multiple of {rest} ranks")
    dp = world // rest
    if tr.global_batch % dp:
        raise ConfigError(f"--dp auto: --global-batch {tr.global_batch} does not split over dp={dp} "
                          f"({world} ranks / tp x pp {rest}); choose a global batch that every dp size divides")
    before = previous_micro_batch(cfg)
    lay.dp = dp
    if before is not None:
        lay.microbatches = micro_batches_for(tr.global_batch // dp, before, lay.microbatches)


def previous_micro_batch(cfg: RunConfig) -> int | None:
    """Sequences per micro-batch per rank of the newest checkpoint in --checkpoint-dir (its
    manifest's layout), when this start will resume from it; else None."""
    from paratrain.checkpoint.runs import joins_running_job
    from paratrain.checkpoint.store import checkpoints, read_manifest

    ck = cfg.checkpoint
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or (ck.dir and joins_running_job(ck.dir))
    if not ck.dir or not (restart or ck.resume):
        return None
    for folder in checkpoints(ck.dir):
        try:
            layout = read_manifest(folder)["layout"]
        except (OSError, ValueError, KeyError):
            continue  # an interrupted save: the trainer skips it too
        dp = re.search(r"dp=(\d+)", layout)
        mb = re.search(r"microbatches=(\d+)", layout)
        if dp and mb:
            return max(1, cfg.train.global_batch // (int(dp.group(1)) * int(mb.group(1))))
    return None


def micro_batches_for(per_rank: int, micro_batch: int, at_least: int) -> int:
    """The fewest micro-batches (at least `at_least`) that split `per_rank` sequences evenly into
    micro-batches of at most `micro_batch`."""
    for m in range(max(1, at_least), per_rank + 1):
        if per_rank % m == 0 and per_rank // m <= micro_batch:
            return m
    return per_rank
