"""Layout-agnostic, sharded checkpoints on torch.distributed.checkpoint (DCP).

What is saved is the *canonical* training state, independent of the layout: every parameter of
the vanilla model under its global name (`model/blocks.3.attn.q.weight`, fp32, the master
weights under mixed precision), Adam's two moments under the same names (`optim/exp_avg/...`,
`optim/exp_avg_sq/...`), and the step, the loader's position, the optimizer's step count, the
fp16 loss scale and each rank's RNG state. A rank owns boxes of these global tensors: a tensor-
parallel shard is a box (rows for column-parallel and vocabulary-parallel weights, columns for
row-parallel ones), and a ZeRO flat shard cuts it further into at most three boxes per
parameter (a partial row, whole rows, a partial row). DCP takes the boxes as the chunks of a
checkpointable object (`Boxes`, the protocol DTensor implements), so every rank writes only what it owns (one owner per box: replicas across dp,
and across tp for replicated norms, do not write twice; the last pipeline stage's copy of the
tied embedding is not written) and DCP's planner reads, for any other layout, exactly the
overlapping regions each rank needs. Layout changes between save and load (dp, tp, pp, zero,
schedule) need nothing more.

A checkpoint is written under `DIR/.tmp-step_N`, then rank 0 adds `manifest.json` (step, model,
layout, every file's size and CRC-32) and renames the folder to `DIR/step_N` in one atomic step;
the last `keep` checkpoints are kept. A folder without a manifest, with a missing, truncated or
altered file, is skipped with a warning in favour of the previous good one. With `async_save`,
each rank copies what it writes to host memory (the only time training waits) and a
background thread runs DCP's save on a process group of its own while training continues; the
folder is published once every rank's write is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

FORMAT = 1
MANIFEST = "manifest.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message is one line."""


@contextmanager
def quiet():
    """DCP's planners warn about features we do not use (ShardedTensor deprecation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# ------------------------------------------------------------------ boxes of global tensors
@dataclass
class Piece:
    offset: tuple[int, ...]  # in the global tensor
    tensor: torch.Tensor  # a view of this rank's storage, shaped like the box


@dataclass
class Entry:
    key: str
    shape: tuple[int, ...]  # global
    pieces: list[Piece]
    owner: bool  # this rank writes its pieces (one owner per box over the world)


def flat_range_boxes(a: int, b: int, shape: tuple[int, ...]) -> list[tuple[tuple[int, ...], tuple[int, ...], int, int]]:
    """Elements [a, b) of a row-major tensor of `shape` (1-D or 2-D) as boxes:
    (offset, size, first flat index, end flat index) each."""
    if len(shape) == 1:
        return [((a,), (b - a,), a, b)] if a < b else []
    if len(shape) != 2:
        raise ValueError(f"checkpoint boxes support 1-D and 2-D parameters, got shape {tuple(shape)}")
    cols, boxes = shape[1], []
    while a < b:
        r, c = divmod(a, cols)
        if c or b - a < cols:  # a partial row
            n = min(cols - c, b - a)
            boxes.append(((r, c), (1, n), a, a + n))
        else:
            n = (b - a) // cols * cols
            boxes.append(((r, 0), (n // cols, cols), a, a + n))
        a += n
    return boxes


def tp_box(local_shape: tuple[int, ...], tp_dim: int | None, tp_rank: int, tp: int):
    """(global shape, offset of this rank's tensor-parallel shard) of a parameter."""
    if tp_dim is None:
        return tuple(local_shape), (0,) * len(local_shape)
    shape = list(local_shape)
    shape[tp_dim] *= tp
    offset = [0] * len(local_shape)
    offset[tp_dim] = tp_rank * local_shape[tp_dim]
    return tuple(shape), tuple(offset)


def shifted_pieces(boxes, base: tuple[int, ...], data: torch.Tensor, start: int) -> list[Piece]:
    """Pieces from flat boxes of a local tensor whose flat element `start` is data[0]."""
    return [Piece(tuple(o + b for o, b in zip(off, base)), data[lo - start : hi - start].view(size))
            for off, size, lo, hi in boxes]


def training_entries(engine, optimizer: torch.optim.Optimizer, mesh, names: dict[int, str]) -> list[Entry]:
    """The canonical entries this rank holds, for the data-parallel or ZeRO engine in use."""
    from paratrain.parallel.zero import ZeroDataParallel

    tp, tp_rank, dp_rank = mesh.size("tp"), mesh.coord("tp"), mesh.coord("dp")
    entries: list[Entry] = []

    def add(name, shape, pieces, owner):
        """The parameter (pieces(None)) and its two Adam moments, under the same global name."""
        entries.append(Entry(f"model/{name}", shape, pieces(None), owner))
        for moment in ("exp_avg", "exp_avg_sq"):
            entries.append(Entry(f"optim/{moment}/{name}", shape, pieces(moment), owner))

    def moments(param):
        state = optimizer.state[param]
        if "exp_avg" not in state:  # a fresh optimizer: create the state to load into
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        return state

    if isinstance(engine, ZeroDataParallel):
        for g in engine.groups:
            dup, replicated = g.flags.get("pp_duplicate", False), not g.flags.get("tp_sharded", False)
            owner = not dup and (tp_rank == 0 or not replicated) and (engine.stage > 0 or dp_rank == 0)
            for s in g.slots:
                a, b = max(s.offset, g.lo) - s.offset, min(s.offset + s.numel, g.hi) - s.offset
                if a >= b:
                    continue
                shape, base = tp_box(tuple(s.shape), s.tp_dim, tp_rank, tp)
                boxes = flat_range_boxes(a, b, tuple(s.shape))
                start = g.lo - s.offset  # flat index (in the parameter) of the shard's element 0

                def pieces(moment, g=g, boxes=boxes, base=base, start=start):
                    data = g.master.data if moment is None else moments(g.master)[moment]
                    return shifted_pieces(boxes, base, data, start)

                assert s.name, "ZeroDataParallel needs `names` for checkpoints"
                add(s.name, shape, pieces, owner)
        return entries
    for p in engine.parameters():
        dup, replicated = getattr(p, "pp_duplicate", False), not getattr(p, "tp_sharded", False)
        owner = not dup and (tp_rank == 0 or not replicated) and dp_rank == 0
        shape, base = tp_box(tuple(p.shape), getattr(p, "tp_dim", None), tp_rank, tp)
        boxes = flat_range_boxes(0, p.numel(), tuple(p.shape)) if p.dim() <= 2 else None

        def pieces(moment, p=p, boxes=boxes, base=base):
            data = p.data if moment is None else moments(p)[moment]
            if boxes is None:
                return [Piece(base, data)]
            return shifted_pieces(boxes, base, data.reshape(-1), 0)

        add(names[id(p)], shape, pieces, owner)
    return entries


class Boxes:
    """A rank's boxes of one global tensor, in the form DCP's planners ask of a checkpointable
    object (the protocol DTensor implements): the chunks it writes or wants, and the tensor of
    each. Unlike a DTensor, the boxes may be any regions, several per rank, and replicas may
    overlap when loading; DCP's planner matches them against the saved chunks."""

    def __init__(self, shape: tuple[int, ...], pieces: list[Piece]):
        self.shape, self.pieces = torch.Size(shape), pieces
        self.by_offset = {tuple(p.offset): p.tensor for p in pieces}

    def __create_write_items__(self, fqn: str, obj) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        return [WriteItem(index=MetadataIndex(fqn, torch.Size(p.offset)), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(
                              chunk=ChunkStorageMetadata(offsets=torch.Size(p.offset), sizes=p.tensor.shape),
                              properties=TensorProperties.create_from_tensor(p.tensor), size=self.shape))
                for p in self.pieces]

    def __create_chunk_list__(self) -> list:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        return [ChunkStorageMetadata(offsets=torch.Size(p.offset), sizes=p.tensor.shape) for p in self.pieces]

    def __get_tensor_shard__(self, index) -> torch.Tensor:
        return self.by_offset[tuple(index.offset)]


def boxes_state(entries: list[Entry], saving: bool) -> dict:
    """{key: Boxes}: for saving, the boxes this rank owns; for loading, all it holds."""
    return {e.key: Boxes(e.shape, e.pieces) for e in entries if e.pieces and (e.owner or not saving)}


def planners():
    """DCP's default planners, taught to find a `Boxes` piece by its offset."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner

    class SavePlanner(DefaultSavePlanner):
        def lookup_object(self, index):
            obj = self.state_dict[index.fqn]
            return obj.__get_tensor_shard__(index) if isinstance(obj, Boxes) else super().lookup_object(index)

    class LoadPlanner(DefaultLoadPlanner):
        def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
            boxes = {k: v for k, v in state_dict.items() if isinstance(v, Boxes)}
            super().set_up_planner(state_dict, metadata, is_coordinator)  # it resets unknown leaves
            state_dict.update(boxes)
            self.state_dict.update(boxes)

        def lookup_tensor(self, index):
            obj = self.state_dict[index.fqn]
            return obj.__get_tensor_shard__(index) if isinstance(obj, Boxes) else super().lookup_tensor(index)

    return SavePlanner(), LoadPlanner()


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
            raise CheckpointError(f"{name}/{f} is truncated or altered: {size} bytes, the manifest says {meta['bytes']}")
        if _crc(path) != meta["crc32"]:
            raise CheckpointError(f"{name}/{f} is corrupt: its CRC-32 does not match the manifest")
    return manifest


def checkpoints(root: str) -> list[str]:
    """Published checkpoint folders under `root`, newest first."""
    if not os.path.isdir(root):
        return []
    names = [n for n in os.listdir(root) if n.startswith(PREFIX) and n[len(PREFIX):].isdigit()]
    return [os.path.join(root, n) for n in sorted(names, key=lambda n: int(n[len(PREFIX):]), reverse=True)]


def latest_good(root: str, model: dict | None = None) -> tuple[str | None, list[str]]:
    """(newest intact checkpoint or None, warnings about the broken ones skipped). With `model`
    (the run's model config), a checkpoint of another model is an error, not a fallback."""
    skipped = []
    for folder in checkpoints(root):
        try:
            manifest = verify(folder)
        except CheckpointError as e:
            skipped.append(str(e))
            continue
        if model is not None and manifest.get("model") != model:
            raise CheckpointError(
                f"{folder} holds model {manifest.get('model')} but this run trains {model}; "
                f"use --model {manifest.get('model', {}).get('name')} or another --checkpoint-dir")
        return folder, skipped
    return None, skipped


# ------------------------------------------------------------------ saving and loading
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


def run_info(cfg, step: int, layout: str) -> dict:
    """What the manifest says of the run besides the files."""
    return {"step": step, "model": model_identity(cfg), "layout": layout, "world_size": dist.get_world_size(),
            "config": cfg.to_dict(), "time": time.time()}


def agree_on_latest(root: str, cfg) -> str | None:
    """The newest good checkpoint under `root`, chosen by rank 0 (broken ones skipped with a
    warning) and told to every rank; None if there is none yet."""
    choice = [None]
    if dist.get_rank() == 0:
        choice[0], skipped = latest_good(root, model_identity(cfg))
        for reason in skipped:
            print(f"paratrain: warning: skipped checkpoint {reason}", file=sys.stderr, flush=True)
    dist.broadcast_object_list(choice, src=0)
    return choice[0]


class Checkpointer:
    """Saves and loads one Trainer's state (see the module docstring)."""

    def __init__(self, trainer):
        self.t = trainer
        c = trainer.cfg.checkpoint
        self.root, self.every, self.keep, self.async_save = c.dir, c.every, c.keep, c.async_save
        self.rank = dist.get_rank()
        self.group = dist.new_group(backend="gloo")  # checkpoint traffic apart from training's
        self.pending = None  # (future, tmp folder, step, t0) of an asynchronous save
        self.events: list[dict] = []  # per save: step, blocked_s, total_s

    def _entries(self):
        t = self.t
        return training_entries(t.model, t.optimizer, t.mesh, t.param_names)

    def _meta(self) -> dict:
        t = self.t
        steps = [float(s["step"]) for s in t.optimizer.state.values() if "step" in s]
        return {"loader": t.loader.state_dict(), "optim_step": max(steps, default=0.0),
                "scaler": {"scale": t.scaler.scale, "good": t.scaler.good}}

    def save(self, step: int) -> None:
        t0 = time.perf_counter()
        self.wait()  # one save at a time
        tmp = begin_save(self.root, step, self.group, self.rank == 0)
        entries = self._entries()
        if self.async_save:  # stage: copy what this rank writes to host memory, then write behind
            entries = [Entry(e.key, e.shape, [Piece(p.offset, p.tensor.detach().to("cpu", copy=True))
                                              for p in e.pieces], True) for e in entries if e.owner]
        state = boxes_state(entries, saving=True)
        state["meta"] = self._meta()
        state[f"rng/{self.rank}"] = torch.get_rng_state()
        info = run_info(self.t.cfg, step, self.t.layout_name)

        def write() -> float:
            """Write and publish; returns when the save ended."""
            write_and_publish(state, tmp, self.group, self.rank == 0, self.root, step, info, self.keep)
            return time.perf_counter()

        if self.async_save:
            from concurrent.futures import ThreadPoolExecutor

            self.writer = getattr(self, "writer", None) or ThreadPoolExecutor(1, thread_name_prefix="paratrain-ckpt")
            self.pending = (self.writer.submit(write), step, t0, time.perf_counter() - t0)
            return
        end = write()
        dist.barrier(self.group)  # rank 0 has published
        self.events.append({"step": step, "blocked_s": time.perf_counter() - t0, "total_s": end - t0})

    def poll(self) -> None:
        """Raise a failed asynchronous save's error early (local: no collective)."""
        if self.pending is not None and self.pending[0].done():
            self.pending[0].result()

    def wait(self) -> None:
        """Wait for the asynchronous save in flight (before the next one, and at the end)."""
        if self.pending is None:
            return
        future, step, t0, blocked = self.pending
        self.pending = None
        w0 = time.perf_counter()
        end = future.result()
        dist.barrier(self.group)  # every rank's write, and rank 0's publication, are done
        self.events.append({"step": step, "blocked_s": blocked + time.perf_counter() - w0, "total_s": end - t0})

    def load(self, folder: str) -> int:
        """Load `folder` into this layout; returns the step it was saved at."""
        import torch.distributed.checkpoint as dcp

        manifest = read_manifest(folder)
        state = boxes_state(self._entries(), saving=False)
        state["meta"] = self._meta()
        same_layout = manifest["layout"] == self.t.layout_name and manifest["world_size"] == dist.get_world_size()
        if same_layout:
            state[f"rng/{self.rank}"] = torch.get_rng_state()
        with quiet():
            dcp.load(state, checkpoint_id=folder, process_group=self.group, planner=planners()[1])
        meta = state["meta"]
        t = self.t
        t.loader.load_state_dict(meta["loader"])
        for s in t.optimizer.state.values():
            s["step"] = torch.tensor(float(meta["optim_step"]))
        t.scaler.scale, t.scaler.good = meta["scaler"]["scale"], meta["scaler"]["good"]
        if same_layout:
            torch.set_rng_state(state[f"rng/{self.rank}"])
        t.after_load()
        return manifest["step"]


def model_identity(cfg) -> dict:
    """What must match between a checkpoint and the run that loads it."""
    from paratrain.models.gpt import PRESETS

    p = PRESETS[cfg.model.name]
    return {"name": cfg.model.name, "n_layer": p.n_layer, "d_model": p.d_model, "n_head": p.n_head,
            "vocab_size": p.vocab_size, "tie_embeddings": cfg.model.tie_embeddings}


def load_full_model(folder: str) -> dict[str, torch.Tensor]:
    """The consolidated model of a checkpoint (one process, no process group): {name: tensor}."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(folder)
    md = reader.read_metadata()
    state = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
             if k.startswith("model/") and isinstance(v, TensorStorageMetadata)}
    with warnings.catch_warnings():  # no_dist=True is the intent: DCP need not say it assumed it
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {k[len("model/"):]: v for k, v in state.items()}


def export(root_or_folder: str, out: str) -> str:
    """Write the consolidated model of the newest good checkpoint (or of the given one) to
    `out` (.safetensors or .pt); returns the folder exported."""
    folder = root_or_folder
    if not os.path.exists(os.path.join(folder, MANIFEST)):
        folder, skipped = latest_good(root_or_folder)
        for s in skipped:
            print(f"paratrain: warning: skipped {s}")
        if folder is None:
            raise CheckpointError(f"no complete checkpoint under {root_or_folder}")
    verify(folder)
    tensors = {k: v.contiguous() for k, v in load_full_model(folder).items()}
    if out.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(tensors, out, metadata={"paratrain_checkpoint": os.path.abspath(folder)})
    else:
        torch.save(tensors, out)
    return folder
