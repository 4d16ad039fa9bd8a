"""The planner: predicted step time and memory per device for every layout (no processes).

`hardware` holds the GPU presets and the calibrated `cpu-local`, `cost` the FLOP, memory and
time model of one layout (pricing collectives with `collectives` and pipeline ranks with
`pipeline`), `search` the enumeration and ranking behind `paratrain plan` and
`paratrain train --layout auto`.
"""

from paratrain.planner.collectives import all_reduce_time, ring_time
from paratrain.planner.cost import (
    Candidate,
    Estimate,
    activation_bytes_per_layer,
    estimate,
    flops_per_token,
    model_state_bytes,
    param_count,
)
from paratrain.planner.calibrate import calibrate
from paratrain.planner.hardware import Hardware, Link, cpu_local, get_hardware, gpu_peak_flops
from paratrain.planner.search import PlanResult, plan, predict_layout

__all__ = [
    "Candidate", "Estimate", "Hardware", "Link", "PlanResult", "activation_bytes_per_layer", "all_reduce_time",
    "calibrate", "cpu_local", "estimate", "flops_per_token", "get_hardware", "gpu_peak_flops", "model_state_bytes",
    "param_count",
    "plan", "predict_layout", "ring_time",
]
