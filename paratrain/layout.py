"""A layout: how a run is split over processes (dp x tp x pp, the ZeRO stage, the pipeline's
schedule and micro-batches), and its one spelling. Apart from the run's settings so that the
planner can speak of layouts without the settings' validation (which reads the models)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LayoutConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    zero: int = 0
    schedule: str = "1f1b"
    microbatches: int = 1  # per optimizer step: gradient accumulation in dp, pipeline micro-batches in pp
    sequence_parallel: bool = False  # with tp > 1: norms and dropout on sequence shards
    virtual_stages: int = 2  # model chunks per pipeline rank with the interleaved schedule
    pp_split: str = "auto"  # the stage split: auto (by modelled cost), auto-measured (by timed layers)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def __str__(self) -> str:
        return format_layout(self)


def format_layout(layout: LayoutConfig) -> str:
    """The one spelling of a layout used everywhere: `dp=2,tp=1,pp=1,zero=0`."""
    return f"dp={layout.dp},tp={layout.tp},pp={layout.pp},zero={layout.zero}"
