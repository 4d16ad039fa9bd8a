"""What a parameter is to the parallel strategies, as one typed record.

Tensor parallelism, sequence parallelism and pipeline tying each change how a parameter's
gradient is reduced, how it counts in the global norm and how a checkpoint stores it. The
strategy that makes the change records it here; the update step, ZeRO's grouping, gradient
compression and checkpoints read it, and nothing else is attached to the parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

ATTRIBUTE = "paratrain_role"


@dataclass(frozen=True)
class ParamRole:
    tp_dim: int | None = None  # split along this dimension over the tp group (Megatron-LM)
    sequence_parallel: bool = False  # replicated over tp, but each rank saw a slice of the sequence
    pp_tied: bool = False  # one matrix on the first and the last pipeline stage (tied embedding)
    pp_duplicate: bool = False  # the last stage's copy of a tied matrix: counted and saved once

    @property
    def tp_sharded(self) -> bool:
        return self.tp_dim is not None


REPLICATED = ParamRole()


def role_of(p: torch.Tensor) -> ParamRole:
    return getattr(p, ATTRIBUTE, REPLICATED)


def set_role(p: torch.Tensor, **changes) -> None:
    """Record that a strategy changed what `p` is (fields of ParamRole)."""
    setattr(p, ATTRIBUTE, replace(role_of(p), **changes))
