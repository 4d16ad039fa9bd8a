"""The ZeRO optimizer trap: under ZeRO-1/2/3 each dp rank's optimizer holds only its shard's
state, so `torch.save(optimizer.state_dict())` on rank 0, loaded on every rank, would resume
silently wrong. A guarded optimizer's state dict records which shard it is, and loading another
rank's shard, or one of another dp degree or ZeRO stage, is refused in one line.
"""

from __future__ import annotations

import torch

KEY = "paratrain_shard"
ADVICE = ("save and resume with paratrain's checkpoints (trainer.save_checkpoint(dir), "
          "or paratrain.checkpoint.Checkpointer), which load into any layout")


def shard_of(dp_rank: int, dp: int, stage: int) -> dict:
    """What the state of this rank's optimizer covers: one shard of dp, or (stage 0, or dp 1)
    the whole model, which any rank may load."""
    sharded = stage > 0 and dp > 1
    return {"dp_rank": dp_rank if sharded else 0, "dp": dp if sharded else 1, "stage": stage}


def describe(shard: dict) -> str:
    if shard["dp"] == 1:
        return f"the whole model's optimizer state (ZeRO-{shard['stage']})"
    return f"dp rank {shard['dp_rank']}'s shard of {shard['dp']} (ZeRO-{shard['stage']})"


def guard_sharded_optimizer(optimizer: torch.optim.Optimizer, dp_rank: int, dp: int, stage: int) -> None:
    """Record in `optimizer.state_dict()` which ZeRO shard it is; `load_state_dict` of another
    shard raises ValueError."""
    mine = shard_of(dp_rank, dp, stage)

    def record(opt, state_dict: dict) -> dict:
        state_dict[KEY] = dict(mine)
        return state_dict

    def check(opt, state_dict: dict) -> dict:
        theirs = state_dict.get(KEY)
        if theirs is None and mine["dp"] > 1:
            raise ValueError(f"this optimizer holds {describe(mine)}, and the state given records no shard; {ADVICE}")
        if theirs is not None and theirs != mine:
            raise ValueError(f"this optimizer state is {describe(theirs)}, but this rank's optimizer holds "
                             f"{describe(mine)}; {ADVICE}")
        return {k: v for k, v in state_dict.items() if k != KEY}

    optimizer.register_state_dict_post_hook(record)
    optimizer.register_load_state_dict_pre_hook(check)
