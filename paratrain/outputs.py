"""The folders a run writes to, made (or refused in one line) before any worker starts."""

from __future__ import annotations

import os

from paratrain.config import ConfigError, RunConfig


def make_folder(flag: str, path: str) -> None:
    """Create the output folder `path` and its parents, as the workers would, but now: one that
    cannot be made or written is a ConfigError before any worker starts."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{flag}: cannot create the folder {path!r}: a file has that name; give another path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{flag}: cannot create the folder {path!r} ({e.strerror}); give a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag}: cannot write in {path!r}; give a writable folder")


def prepare_outputs(cfg: RunConfig) -> None:
    """Create the folders the run writes to (the --metrics file's, --profile, --timeline, and
    --checkpoint-dir when it saves) before any worker starts."""
    tr = cfg.train
    if tr.metrics:
        if os.path.isdir(tr.metrics):
            raise ConfigError(f"--metrics: {tr.metrics!r} is a folder; give a file such as "
                              f"{os.path.join(tr.metrics, 'metrics.jsonl')}")
        make_folder("--metrics", os.path.dirname(tr.metrics) or ".")
    for flag, path in (("--profile", tr.profile), ("--timeline", tr.timeline),
                       ("--checkpoint-dir", cfg.checkpoint.dir if cfg.checkpoint.every else None)):
        if path:
            make_folder(flag, path)
