"""Layout-agnostic, sharded checkpoints of any model on torch.distributed.checkpoint (DCP).

What is saved is the *canonical* training state, independent of the layout: every parameter of
the vanilla model under its global name (`model/blocks.3.attn.q.weight`, `model/features.0.weight`;
fp32, the master weights under mixed precision), Adam's two moments under the same names
(`optim/exp_avg/...`, `optim/exp_avg_sq/...`), every persistent buffer and frozen parameter
(`model/...` only), and the meta: the optimizer's step count and the `state_dict()` of each
object the run gives (the data position, the fp16 loss scale), plus each rank's RNG state. A
tensor held under two names (a tied head) is kept once; the manifest lists the other names as
`aliases`, and `export` writes them too, so an exported file loads into a fresh instance of the
model with `load_state_dict(strict=True)`.

A rank owns boxes of these global tensors (boxes.py): a tensor-parallel shard is a box, a ZeRO
flat shard cuts a parameter of any shape into a few contiguous boxes. Every rank writes only what
it owns (one owner per box: replicas across dp, and across tp for replicated tensors, do not
write twice; the last pipeline stage's copy of a tied embedding is not written) and DCP's planner
reads, for any other layout, exactly the overlapping regions each rank needs. Layout changes
between save and load (dp, tp, pp, zero, schedule) need nothing more.

boxes.py: the boxes and DCP's protocol; entries.py: what a rank holds, and `full_state_dict`;
store.py: folders, manifest, verification, atomic publication, export; checkpointer.py: the
`Checkpointer`; guard.py: `guard_sharded_optimizer` against saving one ZeRO shard as the whole.
"""

from paratrain.checkpoint import runs
from paratrain.checkpoint.boxes import (Boxes, Entry, Piece, boxes_state, flat_range_boxes, planners, quiet,
                                        shifted_pieces, tp_box)
from paratrain.checkpoint.checkpointer import Checkpointer, open_run
from paratrain.checkpoint.entries import Held, checkpoint_entries, derived_aliases, full_state_dict, global_modules
from paratrain.checkpoint.guard import guard_sharded_optimizer
from paratrain.checkpoint.store import (FORMAT, MANIFEST, PREFIX, CheckpointError, agree_on_latest, begin_save,
                                        checkpoints, export, gpt_aliases, latest_good, load_full_model,
                                        model_identity, publish, read_manifest, read_tensors, resumable, run_info,
                                        start_point, tmp_folder, verify, write_and_publish, write_manifest)

__all__ = [
    "Boxes", "Entry", "Piece", "boxes_state", "flat_range_boxes", "planners", "quiet", "shifted_pieces", "tp_box",
    "runs", "open_run", "resumable", "start_point", "Checkpointer", "Held", "checkpoint_entries", "derived_aliases", "full_state_dict", "global_modules",
    "guard_sharded_optimizer", "FORMAT", "MANIFEST", "PREFIX", "CheckpointError",
    "agree_on_latest", "begin_save", "checkpoints", "export", "gpt_aliases", "latest_good", "load_full_model",
    "model_identity", "publish", "read_manifest", "read_tensors", "run_info", "tmp_folder", "verify",
    "write_and_publish", "write_manifest",
]
