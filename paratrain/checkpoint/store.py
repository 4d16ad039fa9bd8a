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

from torch.distributed.checkpoint.api import CheckpointException

from paratrain.checkpoint.boxes import planners, quiet
from paratrain.checkpoint.runs import mismatch, new_run_id, read_lock, run_identity
from paratrain.stops import SaveFailed

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


def _manifest(folder: str, name: str) -> dict:
    """The manifest as a JSON object holding a step and a list of files, or CheckpointError."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        raise CheckpointError(f"{name} has no {MANIFEST} (an interrupted save)")
    if not os.path.isfile(path):
        raise CheckpointError(f"{name}/{MANIFEST} is not a file")
    try:
        manifest = read_manifest(folder)
    except (ValueError, OSError) as e:  # bad JSON, not UTF-8, unreadable
        raise CheckpointError(f"{name}/{MANIFEST} cannot be read ({getattr(e, 'strerror', None) or 'not valid JSON'})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{name}/{MANIFEST} is not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(m, dict) for m in files.values()):
        raise CheckpointError(f"{name}/{MANIFEST} lists no files")
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("layout"), str):
        raise CheckpointError(f"{name}/{MANIFEST} has no step or layout")
    return manifest


def _verify_files(folder: str, name: str, files: dict) -> None:
    for f, meta in files.items():
        path = os.path.join(folder, f)
        if os.path.dirname(f) or not os.path.isfile(path):
            raise CheckpointError(f"{name}/{f} is missing")
        size = os.path.getsize(path)
        if size != meta.get("bytes"):
            raise CheckpointError(f"{name}/{f} is truncated or altered: {size} bytes, "
                                  f"the manifest says {meta.get('bytes')}")
        if _crc(path) != meta.get("crc32"):
            raise CheckpointError(f"{name}/{f} is corrupt: its CRC-32 does not match the manifest")


def _verify_data(folder: str, name: str, files: dict) -> None:
    """What DCP's metadata names is there: every storage file it reads from, listed in the
    manifest and long enough for every item, and the training state's meta among the items."""
    import torch.distributed.checkpoint as dcp

    if ".metadata" not in files:
        raise CheckpointError(f"{name} holds no DCP metadata (.metadata)")
    try:
        md = dcp.FileSystemReader(folder).read_metadata()
        need: dict[str, int] = {}
        for info in (md.storage_data or {}).values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        keys = set(md.state_dict_metadata)
    except Exception as e:  # an unpickling error of any kind: the metadata is not DCP's
        raise CheckpointError(f"{name}/.metadata cannot be read ({type(e).__name__})") from None
    if not need or not any(k.startswith("meta") for k in keys):
        raise CheckpointError(f"{name} holds no training state (DCP's metadata names no data)")
    for path, end in sorted(need.items()):
        if path not in files:
            raise CheckpointError(f"{name}/{path}, which DCP's metadata reads from, is not in the manifest")
        if files[path]["bytes"] < end:
            raise CheckpointError(f"{name}/{path} holds {files[path]['bytes']} bytes; DCP's metadata reads to {end}")


def verify(folder: str) -> dict:
    """The manifest of a complete, intact checkpoint (every file with its recorded size and
    CRC-32, and whatever DCP's metadata reads present); CheckpointError (one line) otherwise."""
    name = os.path.basename(folder.rstrip("/"))
    if not os.path.isdir(folder):
        raise CheckpointError(f"{name} is not a folder")
    manifest = _manifest(folder, name)
    _verify_files(folder, name, manifest["files"])
    _verify_data(folder, name, manifest["files"])
    return manifest


def checkpoints(root: str) -> list[str]:
    """Entries named like a checkpoint (`step_N`) under `root`, newest first (verify() tells
    which of them are checkpoints)."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[len(PREFIX):]), reverse=True)]


def run_of(folder: str) -> str | None:
    """The run id a checkpoint's manifest records (a cheap look, no verification)."""
    try:
        run = read_manifest(folder).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return run.get("id") if isinstance(run, dict) else None


def _model_mismatch(folder: str, theirs, identity: dict) -> CheckpointError:
    name = theirs.get("name") if isinstance(theirs, dict) else None
    hint = f"use --model {name} or another --checkpoint-dir" if name else "use another checkpoint folder"
    return CheckpointError(f"{folder} holds model {theirs} but this run trains {identity}; {hint}")


def latest_good(root: str, identity: dict | None = None, run_id: str | None = None) -> tuple[str | None, list[str]]:
    """(newest intact checkpoint or None, warnings about the broken ones skipped). With
    `run_id`, only that run's checkpoints count; with `identity` (what the run's model must
    match), another model's checkpoint is an error, not a fallback."""
    skipped = []
    for folder in checkpoints(root):
        if run_id is not None and run_of(folder) != run_id:
            continue
        try:
            manifest = verify(folder)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        theirs = manifest.get("model")
        if identity is not None and theirs != identity:
            raise _model_mismatch(folder, theirs, identity)
        return folder, skipped
    return None, skipped


def warn_skipped(skipped: list[str]) -> None:
    for reason in skipped:
        print(f"paratrain: warning: skipped checkpoint {reason}", file=sys.stderr, flush=True)


def resumable(root: str, run: dict) -> tuple[str, dict]:
    """The newest good checkpoint under `root` that this run (`run`: run_identity) may continue,
    with its manifest; CheckpointError (one line) naming the model or the first setting that
    differs. Warns of broken ones skipped."""
    folder, skipped = latest_good(root, run["model"])
    warn_skipped(skipped)
    if folder is None:
        why = f" ({skipped[0]})" if skipped else ""
        raise CheckpointError(f"no complete checkpoint in {root!r}{why}")
    manifest = read_manifest(folder)
    theirs = manifest.get("run", {}).get("identity") if isinstance(manifest.get("run"), dict) else None
    if theirs is None:  # written before runs had an identity: the settings of its config
        theirs = run_identity(manifest.get("config") or {}, manifest.get("model"))
    differs = mismatch(theirs, run)
    if differs:
        raise CheckpointError(f"{folder} {differs}")
    return folder, manifest


def start_point(root: str, run: dict, resume: bool, restart: bool) -> tuple[str, str | None]:
    """(run id, checkpoint to load or None) for a run starting on `root`, whose lock this
    process's launcher or agent holds: a restart continues its own run from its newest good
    checkpoint; `--resume` continues the run it loads; a fresh run needs a folder without
    checkpoints (CheckpointError otherwise: nothing of another run is overwritten or pruned)."""
    held = read_lock(root) or {}
    if restart and held.get("run"):
        folder, skipped = latest_good(root, run["model"], held["run"])
        warn_skipped(skipped)
        return held["run"], folder
    if resume:
        folder, manifest = resumable(root, run)
        return (run_of(folder) or new_run_id()), folder
    folder, _ = latest_good(root)
    if folder is not None and not restart:
        raise CheckpointError(f"{root!r} already holds checkpoints ({os.path.basename(folder)}, step "
                              f"{read_manifest(folder)['step']}); add --resume to continue that run, or give "
                              f"an empty --checkpoint-dir")
    return new_run_id(), None


def agree_on_latest(root: str, identity: dict | None, run_id: str | None = None) -> str | None:
    """The newest good checkpoint under `root` for a model of `identity` (of run `run_id` if
    given), chosen by rank 0 (broken ones skipped with a warning) and told to every rank; None
    if there is none yet."""
    choice = [None]
    if dist.get_rank() == 0:
        choice[0], skipped = latest_good(root, identity, run_id)
        warn_skipped(skipped)
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


def run_info(identity: dict, config: dict | None, step: int, layout: str,
             aliases: dict[str, str] | None = None, run_id: str | None = None) -> dict:
    """What the manifest says of the run besides the files."""
    return {"step": step, "model": identity, "layout": layout, "world_size": dist.get_world_size(),
            "config": config or {}, "aliases": dict(aliases or {}), "time": time.time(),
            "run": {"id": run_id, "identity": run_identity(config, identity)}}


# ------------------------------------------------------------------ saving
def _replaceable(folder: str, run_id: str | None) -> bool:
    """A same-named entry publication may replace: this run's own (a step saved again after a
    restart), or not a checkpoint at all (junk, an interrupted save)."""
    if run_of(folder) == run_id:
        return True
    try:
        verify(folder)
    except CheckpointError:
        return True
    return False


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def publish(root: str, tmp: str, step: int, info: dict, keep: int) -> None:
    """One rank, once all have written: manifest (sizes, CRC-32), one atomic rename of `tmp` to
    `root/step_N`, then drop this run's oldest beyond `keep` and the leftovers of interrupted saves."""
    write_manifest(tmp, info)
    run_id = info.get("run", {}).get("id")
    final = os.path.join(root, f"{PREFIX}{step:08d}")
    if os.path.lexists(final):
        if not _replaceable(final, run_id):
            raise CheckpointError(f"{final} holds another run's checkpoint; give each run its own --checkpoint-dir")
        _remove(final)
    os.rename(tmp, final)
    mine = [c for c in checkpoints(root) if run_of(c) == run_id]
    for old in mine[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for name in os.listdir(root):
        if name.startswith(f".tmp-{PREFIX}"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def tmp_folder(root: str, step: int) -> str:
    return os.path.join(root, f".tmp-{PREFIX}{step:08d}")


def begin_save(root: str, step: int, group, first: bool) -> str:
    """The group's first rank makes a clean temporary folder for `step`; all wait for it. A
    folder that cannot be made stops the save on every rank (SaveFailed)."""
    tmp = tmp_folder(root, step)
    error = None
    if first:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            error = cause(e)
    agree(error, group, step, tmp, first)
    return tmp


def cause(e: BaseException) -> str:
    """One line for why a write failed: the OS error inside DCP's exception if there is one."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"rank {r}: {cause(exc[0] if isinstance(exc, tuple) else exc)}"
                         for r, exc in sorted(failures.items()))
    seen = e
    while seen is not None and not isinstance(seen, OSError):
        seen = seen.__cause__ or seen.__context__
    if isinstance(seen, OSError) and seen.strerror:
        where = f" ({seen.filename})" if seen.filename else ""
        return f"{seen.strerror}{where}"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def agree(error: str | None, group, step: int, tmp: str, first: bool) -> None:
    """Every rank of `group` learns whether any failed; if one did, the partial folder is
    removed and every rank raises SaveFailed with the causes (a save that cannot succeed is not
    retried: the run stops)."""
    errors: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    failed = [e for e in errors if e]
    if not failed:
        return
    if first:
        shutil.rmtree(tmp, ignore_errors=True)
    causes = "; ".join(dict.fromkeys(failed))
    raise SaveFailed(f"the checkpoint of step {step} could not be written: {causes}; the partial folder was removed "
                     f"and the run stopped (the last published checkpoint is intact)", step)


def write_and_publish(state: dict, tmp: str, group, first: bool, root: str, step: int, info: dict, keep: int,
                      planner=None) -> None:
    """Every rank of `group` writes its part; DCP's save returns on the first rank once all parts
    and the metadata are written, so that rank then publishes. Every rank returns once the
    checkpoint is published, or raises SaveFailed on every rank."""
    import torch.distributed.checkpoint as dcp

    error = None
    try:
        with quiet():
            dcp.save(state, checkpoint_id=tmp, process_group=group, planner=planner or planners()[0])
        if first:
            publish(root, tmp, step, info, keep)
    except (Exception, CheckpointException) as e:
        error = cause(e)
    agree(error, group, step, tmp, first)


# ------------------------------------------------------------------ the run's model
def model_identity(cfg) -> dict:
    """What must match between a checkpoint of the run's model and the run that loads it (the
    identity of its model spec, `models.catalog.model_identity`)."""
    from paratrain.models.catalog import model_identity as identity

    return identity(cfg)


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
