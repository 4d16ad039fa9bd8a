"""A checkpoint on disk: the folder, its manifest, verification, publication and export.

A checkpoint is written under `DIR/.tmp-step_N`, then one rank adds `manifest.json` (step, model
identity, layout, aliases of tied tensors, every file's size and CRC-32) and renames the folder
to `DIR/step_N` in one atomic step; the last `keep` checkpoints are kept. A folder without a
manifest, with a missing, truncated or altered file, is skipped with a warning in favour of the
previous good one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
import zlib

import torch
import torch.distributed as dist

from paratrain.checkpoint.boxes import planners, quiet
from paratrain.models.spec import gpt_identity

FORMAT = 1
MANIFEST = "manifest.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


# ------------------------------------------------------------------ manifest and verification
def _crc(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_manifest(folder: str, info: dict) -> None:
    files = {f: {"bytes": os.path.getsize(os.path.join(folder, f)), "crc32": _crc(os.path.join(folder, f))}
             for f in sorted(os.listdir(folder)) if f != MANIFEST}
    path = os.path.join(folder, MANIFEST)
    with open(path + ".part", "w") as fh:
        json.dump({"format": FORMAT, **info, "files": files}, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(path + ".part", path)


def read_manifest(folder: str) -> dict:
    with open(os.path.join(folder, MANIFEST)) as fh:
        return json.load(fh)


def verify(folder: str) -> dict:
    """The manifest of a complete, intact checkpoint; CheckpointError (one line) otherwise."""
    name = os.path.basename(folder.rstrip("/"))
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        raise CheckpointError(f"{name} has no {MANIFEST} (an interrupted save)") from None
    except json.JSONDecodeError:
        raise CheckpointError(f"{name}/{MANIFEST} is not valid JSON") from None
    for f, meta in manifest.get("files", {}).items():
        path = os.path.join(folder, f)
        if not os.path.exists(path):
            raise CheckpointError(f"{name}/{f} is missing")
        size = os.path.getsize(path)
        if size != meta["bytes"]:
            raise CheckpointError(f"{name}/{f} is truncated or altered: {size} bytes, "
                                  f"the manifest says {meta['bytes']}")
        if _crc(path) != meta["crc32"]:
            raise CheckpointError(f"{name}/{f} is corrupt: its CRC-32 does not match the manifest")
    return manifest


def checkpoints(root: str) -> list[str]:
    """Published checkpoint folders under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[len(PREFIX):]), reverse=True)]


def latest_good(root: str, identity: dict | None = None) -> tuple[str | None, list[str]]:
    """(newest intact checkpoint or None, warnings about the broken ones skipped). With
    `identity` (what the run's model must match), another model's checkpoint is an error, not a
    fallback."""
    skipped = []
    for folder in checkpoints(root):
        try:
            manifest = verify(folder)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        theirs = manifest.get("model")
        if identity is not None and theirs != identity:
            name = theirs.get("name") if isinstance(theirs, dict) else None
            hint = f"use --model {name} or another --checkpoint-dir" if name else "use another checkpoint folder"
            raise CheckpointError(f"{folder} holds model {theirs} but this run trains {identity}; {hint}")
        return folder, skipped
    return None, skipped


def agree_on_latest(root: str, identity: dict | None) -> str | None:
    """The newest good checkpoint under `root` for a model of `identity`, chosen by rank 0
    (broken ones skipped with a warning) and told to every rank; None if there is none yet."""
    choice = [None]
    if dist.get_rank() == 0:
        choice[0], skipped = latest_good(root, identity)
        for reason in skipped:
            print(f"paratrain: warning: skipped checkpoint {reason}", file=sys.stderr, flush=True)
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def run_info(identity: dict, config: dict | None, step: int, layout: str,
             aliases: dict[str, str] | None = None) -> dict:
    """What the manifest says of the run besides the files."""
    return {"step": step, "model": identity, "layout": layout, "world_size": dist.get_world_size(),
            "config": config or {}, "aliases": dict(aliases or {}), "time": time.time()}


# ------------------------------------------------------------------ saving
def publish(root: str, tmp: str, step: int, info: dict, keep: int) -> None:
    """One rank, once all have written: manifest (sizes, CRC-32), one atomic rename of `tmp` to
    `root/step_N`, then drop the oldest beyond `keep`."""
    write_manifest(tmp, info)
    final = os.path.join(root, f"{PREFIX}{step:08d}")
    if os.path.exists(final):  # the same step saved again after a restart
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in checkpoints(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def tmp_folder(root: str, step: int) -> str:
    return os.path.join(root, f".tmp-{PREFIX}{step:08d}")


def begin_save(root: str, step: int, group, first: bool) -> str:
    """The group's first rank makes a clean temporary folder for `step`; all wait for it."""
    tmp = tmp_folder(root, step)
    if first:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier(group)
    return tmp


def write_and_publish(state: dict, tmp: str, group, first: bool, root: str, step: int, info: dict, keep: int) -> None:
    """Every rank of `group` writes its part; DCP's save returns on the first rank once all parts
    and the metadata are written, so that rank then publishes."""
    import torch.distributed.checkpoint as dcp

    with quiet():
        dcp.save(state, checkpoint_id=tmp, process_group=group, planner=planners()[0])
    if first:
        publish(root, tmp, step, info, keep)


# ------------------------------------------------------------------ paratrain's GPT presets
def model_identity(cfg) -> dict:
    """What must match between a checkpoint of the run's GPT preset and the run that loads it
    (the identity of its model spec, `models.spec.gpt_identity`)."""
    return gpt_identity(cfg.model.name, cfg.model.tie_embeddings)


def gpt_aliases(cfg) -> dict[str, str]:
    """The tied names of a GPT preset: its head is the embedding."""
    return {"head.weight": "wte.weight"} if cfg.model.tie_embeddings else {}


# ------------------------------------------------------------------ one process: read and export
def read_tensors(folder: str, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint under `prefix`, whole (one process, no process group):
    {name without the prefix: tensor}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder)
    md = reader.read_metadata()
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():  # no_dist=True is the intent: DCP need not say it assumed it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len(prefix):]: v for k, v in state.items()}


def load_full_model(folder: str) -> dict[str, torch.Tensor]:
    """The consolidated model of a checkpoint, each tensor under its kept name: {name: tensor}."""
    return read_tensors(folder, "model/")


def export(root_or_folder: str, out: str) -> str:
    """Write the consolidated model of the newest good checkpoint (or of the given one) to
    `out` (.safetensors or .pt), every tied name too (a copy each: safetensors refuses shared
    storage), so that it loads into the model with `load_state_dict(strict=True)`; returns the
    folder exported."""
    folder = root_or_folder
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        folder, skipped = latest_good(root_or_folder)
        for s in skipped:
            print(f"paratrain: warning: skipped {s}")
        if folder is None:
            raise CheckpointError(f"no complete checkpoint under {root_or_folder}")
    manifest = verify(folder)
    tensors = {k: v.contiguous() for k, v in load_full_model(folder).items()}
    for alias, kept in manifest.get("aliases", {}).items():
        if kept in tensors and alias not in tensors:
            tensors[alias] = tensors[kept].clone()
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, out, metadata={"paratrain_checkpoint": os.path.abspath(folder)})
    else:
        torch.save(tensors, out)
    return folder
