"""Which run a checkpoint belongs to, and the lock that keeps one live run per folder.

A run's identity is what fixes its math whatever the layout: the model, the seed, the steps
(the learning-rate schedule decays over them; not with a constant rate after warm-up) and the other settings of the optimizer, the
batches and the data, with a hash of them all. Every manifest records it with a run id (new for
a fresh run, kept by restarts and by `--resume`, which continues the run it loads). Restarts
load only their own run's checkpoints, `--resume` refuses another run's in one line naming the
first setting that differs, and pruning drops only the run's own.

The folder's lock (`DIR/.lock`, JSON: host, pid and start time of its owner, the run id) is
held by the process that outlives the workers' restarts: `paratrain train` itself, the elastic
agent under torchrun, or the process of a Python script. A lock whose owner is gone (no such
process on this host, a process of that pid started later, or no refresh from another host for
`STALE_S`) is stale and taken over with a warning. The lock names the launcher's job too: in an
elastic run the agents of every node share it, and a node that joins continues the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
import uuid

LOCK = ".lock"
STALE_S = 600.0  # a lock of another host not refreshed for this long is stale
REFRESH_S = 30.0

# the settings that fix a run's math (layout, precision, outputs and aids are free to change)
MATH = {"model": None, "data": ("path", "val_fraction", "tokenizer", "text_field"),
        "train": ("seed", "steps", "global_batch", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                  "beta1", "beta2", "grad_clip")}


class LockHeld(RuntimeError):
    """The folder is held by another live run; the message is one line."""


def run_identity(config: dict | None, model: dict) -> dict:
    """{"model", "settings" (the MATH settings of `config`), "hash"} of a run."""
    settings = {}
    for section, names in MATH.items():
        values = (config or {}).get(section, {})
        for name in (names or sorted(values)):
            if name in values:
                settings[f"{section}.{name}"] = values[name]
    if settings.get("train.min_lr_ratio") == 1:  # a constant rate after warm-up: the steps change nothing before
        settings.pop("train.steps", None)
    text = json.dumps({"model": model, "settings": settings}, sort_keys=True, default=str)
    return {"model": model, "settings": settings, "hash": hashlib.sha256(text.encode()).hexdigest()[:16]}


def flag(setting: str) -> str:
    """'train.global_batch' -> '--global-batch', 'model.dropout' -> 'model.dropout'."""
    section, name = setting.split(".", 1)
    return "--" + name.replace("_", "-") if section == "train" else setting


def mismatch(theirs: dict, mine: dict) -> str | None:
    """The first setting in which a checkpoint's run (`theirs`) differs from this one, as
    'was trained with --seed 5; this run has --seed 1234', or None when they agree."""
    a, b = theirs.get("settings", {}), mine.get("settings", {})
    order = ["train.seed", "train.steps"] + sorted(set(a) | set(b))
    for key in dict.fromkeys(order):
        if key in a and key in b and a[key] != b[key]:
            hint = " (the learning-rate schedule follows from it)" if key == "train.steps" else ""
            return f"was trained with {flag(key)} {a[key]}{hint}; this run has {flag(key)} {b[key]}"
    return None


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8]


# ------------------------------------------------------------------ the lock
def _start_time(pid: int) -> str | None:
    """When `pid` started (clock ticks since boot, /proc), or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"


def gone(pid: int) -> bool:
    """No process `pid` runs on this host."""
    return _start_time(pid) is None


def job_id() -> str | None:
    """The launcher's job (torchrun's --rdzv-id, our launcher's own id): every node's agent of
    one elastic run shares it."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def joins_running_job(root: str) -> bool:
    """Whether `root`'s lock is held for a live run of this launcher job: a node that joins an
    elastic run (its workers' restart count is 0) continues that run."""
    lock, job = read_lock(root) or {}, job_id()
    return bool(job and lock.get("job") == job and lock.get("run") and not lock.get("finished"))


def lock_owner() -> int:
    """The process that holds the lock for this one: the elastic agent (our launcher or torchrun)
    for a worker, since it outlives the workers' restarts; else this process."""
    return os.getppid() if "TORCHELASTIC_RESTART_COUNT" in os.environ else os.getpid()


def read_lock(root: str) -> dict | None:
    try:
        with open(os.path.join(root, LOCK)) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: a stale or broken lock


def _stale_reason(lock: dict, path: str) -> str | None:
    """Why the lock no longer holds (its owner is gone), or None if its owner may be alive."""
    if lock.get("host") != socket.gethostname():
        try:
            age = time.time() - os.path.getmtime(path)
        except OSError:
            return "it vanished"
        return f"not refreshed for {age:.0f} s" if age > STALE_S else None
    pid = lock.get("pid")
    if not isinstance(pid, int):
        return "it names no owner"
    started = _start_time(pid)
    if started is None:
        return f"process {pid} is gone"
    if lock.get("start") not in (None, "?") and started not in ("?", lock.get("start")):
        return f"process {pid} is another process now"
    return None


def _write_lock(path: str, data: dict, exclusive: bool) -> bool:
    text = json.dumps(data)
    if not exclusive:
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return True


def acquire(root: str, owner: int | None = None, run_id: str | None = None) -> dict:
    """Hold `root` for `owner` (default `lock_owner()`): create the lock, or find it already
    ours, or take over a stale one (a warning on stderr). Raises LockHeld if a live run holds it.
    Returns the lock's content (its "run" once one was recorded)."""
    owner = lock_owner() if owner is None else owner
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK)
    mine = {"host": socket.gethostname(), "pid": owner, "start": _start_time(owner), "since": time.time(),
            **({"job": job_id()} if job_id() else {})}
    for _ in range(3):
        if _write_lock(path, {**mine, **({"run": run_id} if run_id else {})}, exclusive=True):
            return read_lock(root) or mine
        held = read_lock(root)
        if held is None:
            continue  # released meanwhile
        if held.get("host") == mine["host"] and held.get("pid") == owner:
            return held  # ours: taken by the launcher, or before a restart
        if mine.get("job") and held.get("job") == mine["job"] and not held.get("finished") \
                and _stale_reason(held, path) is None:
            return held  # another node's agent of this elastic job holds it for the same run
        reason = "its run has finished" if held.get("finished") else _stale_reason(held, path)
        if reason is None:
            since = time.strftime("%Y-%m-%d %H:%M", time.localtime(held.get("since", 0)))
            raise LockHeld(f"{root!r} is in use by another run (pid {held.get('pid')} on {held.get('host')}, "
                           f"since {since}); wait for it to end or give another --checkpoint-dir")
        if not held.get("finished"):
            print(f"paratrain: warning: took over the stale lock of {root!r} ({reason})", file=sys.stderr, flush=True)
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    raise LockHeld(f"{root!r}: could not take its lock {path!r}; another run keeps taking it")


def record_run(root: str, run_id: str, finished: bool = False) -> None:
    """Write the run id into the lock we hold (restarts read it back); `finished`: the run has
    trained its last step (a worker's restart after it still finds its run; a new run takes the
    lock over without a warning)."""
    held = {k: v for k, v in (read_lock(root) or {}).items() if k != "finished"}
    _write_lock(os.path.join(root, LOCK), {**held, "run": run_id, "since": held.get("since", time.time()),
                                           **({"finished": True} if finished else {})}, exclusive=False)


def refresh(root: str) -> None:
    """Mark the lock alive (for runs that look at it from another host)."""
    try:
        os.utime(os.path.join(root, LOCK))
    except OSError:
        pass


def release(root: str, owner: int | None = None) -> None:
    """Remove the lock if `owner` (default `lock_owner()`) holds it."""
    owner = lock_owner() if owner is None else owner
    held = read_lock(root)
    if held and held.get("pid") == owner and held.get("host") == socket.gethostname():
        try:
            os.remove(os.path.join(root, LOCK))
        except FileNotFoundError:
            pass
