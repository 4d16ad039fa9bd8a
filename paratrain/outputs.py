"""The folders a run writes to, made (or refused in one line) before any worker starts."""

from __future__ import annotations

import os
import stat

from paratrain.config import ConfigError, RunConfig
from paratrain.files import kind


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


def check_output_file(flag: str, path: str, example: str) -> None:
    """`path` must be a file the run can append to, checked by opening it so (never truncated, and
    never written here): an existing regular file outside /proc and /sys, a new file in a folder
    that can be made and written, or /dev/null. Anything else (a folder, a device such as
    /dev/full, a FIFO, a dangling link, a kernel file) is a ConfigError before any worker starts."""
    if os.path.isdir(path):
        raise ConfigError(f"{flag}: {path!r} is a folder; give a file such as {os.path.join(path, example)}")
    if not os.path.exists(path):
        if os.path.islink(path):
            raise ConfigError(f"{flag}: {path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist")
        make_folder(flag, os.path.dirname(path) or ".")
        return
    st, real = os.stat(path), os.path.realpath(path)
    if stat.S_ISCHR(st.st_mode) and os.path.samefile(path, os.devnull):
        return
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{flag}: {path!r} is a {kind(st.st_mode)}, not a regular file; give a file such as {example}")
    if real.startswith(("/proc/", "/sys/")):
        raise ConfigError(f"{flag}: {path!r} is a kernel file under /{real.split('/')[1]}, not a file to write to; "
                          f"give a file such as {example}")
    try:
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag}: cannot append to {path!r} ({e.strerror}); give a writable file") from None


def prepare_outputs(cfg: RunConfig) -> None:
    """Create the folders the run writes to (the --metrics file's, --profile, --timeline, and
    --checkpoint-dir when it saves) before any worker starts."""
    tr = cfg.train
    if tr.metrics:
        check_output_file("--metrics", tr.metrics, "metrics.jsonl")
    for flag, path in (("--profile", tr.profile), ("--timeline", tr.timeline),
                       ("--checkpoint-dir", cfg.checkpoint.dir if cfg.checkpoint.every else None)):
        if path:
            make_folder(flag, path)
