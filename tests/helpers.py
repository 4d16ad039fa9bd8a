"""Start N gloo ranks on CPU for a test and collect what each returns."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist


def _entry(fn: Callable, rank: int, world: int, init_file: str, queue, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        # plain pickle: tensors travel by value, not as shared memory that dies with the process
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # The answer is sent: leave without the interpreter's teardown of torch's modules (about a
    # second of CPU per rank, which the parent's join would wait for).
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn: Callable, world: int, *args: Any, timeout: float = 180) -> list[Any]:
    """Run `fn(*args)` on `world` ranks (process group already initialised); return per-rank results."""
    # The ranks fork from a server process that has imported torch and paratrain once (a fresh
    # interpreter per rank would import them again: seconds of CPU each on a small machine).
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "paratrain", "helpers"])
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [ctx.Process(target=_entry, args=(fn, r, world, init_file, queue, args)) for r in range(world)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        for _ in range(world):
            try:
                rank, ok, value = queue.get(timeout=timeout)
            except Exception as e:
                errors.append(f"no answer from some rank within {timeout} s ({e!r})")
                break
            if ok:
                results[rank] = pickle.loads(value)
            else:
                errors.append(f"rank {rank}:\n{value}")
            if errors:
                break
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]


def run_tiny(steps: int = 10, global_batch: int = 16, seq_len: int = 32, seed: int = 5, **settings) -> dict:
    """Train the `tiny` preset in-process through the launcher (as `paratrain train` does) and
    return Trainer.fit's result. `settings` name LayoutConfig or TrainConfig fields."""
    from paratrain.config import LayoutConfig, RunConfig, TrainConfig, validate
    from paratrain.launch import launch

    cfg = RunConfig()
    cfg.model.name = "tiny"
    cfg.train.steps, cfg.train.global_batch, cfg.train.seq_len = steps, global_batch, seq_len
    cfg.train.seed, cfg.train.progress, cfg.train.lr, cfg.train.warmup_steps = seed, False, 3e-3, 2
    layout_keys = {f for f in LayoutConfig.__dataclass_fields__}
    for key, value in (settings.pop("checkpoint", None) or {}).items():
        setattr(cfg.checkpoint, key, value)
    for key, value in settings.items():
        assert key in layout_keys or key in TrainConfig.__dataclass_fields__, key
        setattr(cfg.layout if key in layout_keys else cfg.train, key, value)
    validate(cfg)
    return launch(cfg)


def cli(*args, timeout=300):
    """`python -m paratrain ARGS` in a fresh process: its CompletedProcess (text output)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "paratrain", *args], capture_output=True, text=True, timeout=timeout)


def refused(capsys, *args):
    """`paratrain ARGS` in this process, for runs refused before any worker starts (no interpreter
    start-up): the exit status and what went to stderr."""
    import pytest

    from paratrain.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    return exit_.value.code, capsys.readouterr().err
