"""CPU bandwidth for the harness's nodes: one cgroup per node under the CFS bandwidth controller
(cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`, or v2 `cpu.max`), so that one node of
`paratrain.cluster` is a slower machine: a quota of 0.5 lets the node's processes together run
for half of one CPU in every period (Turner et al., "CPU bandwidth control for CFS", 2010).

A node's command starts through `wrap(...)`: a small interpreter that writes its own pid to the
group's `cgroup.procs` (and pins itself to CPUs when asked), then execs the command, so the
torchrun agent and every worker it forks later run inside the group from their first instruction.
The wrapper runs before `ip netns exec`, which mounts a sysfs of its own without the cgroup mounts.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import time
from dataclasses import dataclass

PERIOD_US = 100_000  # the CFS period: a quota of q CPUs is q * 100 ms of run time per 100 ms
MIN_QUOTA = 0.01  # v1 refuses a quota under 1 ms
_WRAP = (
    "import os, sys\n"
    "procs, cpus, argv = sys.argv[1], sys.argv[2], sys.argv[3:]\n"
    "if procs:\n"
    "    with open(procs, 'w') as f:\n"
    "        f.write(str(os.getpid()))\n"
    "if cpus:\n"
    "    os.sched_setaffinity(0, [int(c) for c in cpus.split(',')])\n"
    "os.execvp(argv[0], argv)\n"
)


class CgroupError(RuntimeError):
    """No writable cgroup cpu controller here (one line saying why)."""


def _mounts() -> list[tuple[str, str, set[str]]]:
    """(mount point, file system type, options) of every cgroup mount."""
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            _, point, fstype, opts = line.split()[:4]
            if fstype in ("cgroup", "cgroup2"):
                out.append((point.replace("\\040", " "), fstype, set(opts.split(","))))
    return out


def _own_path(v1: bool) -> str:
    """This process's cgroup path under the v1 cpu hierarchy (v1) or the unified one."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if (v1 and "cpu" in controllers.split(",")) or (not v1 and controllers == ""):
                return path
    return "/"


def cpu_root() -> tuple[str, int]:
    """The directory new groups go under and the cgroup version: v1's cpu hierarchy at this
    process's own group (so an enclosing limit still holds), else the v2 mount with `cpu` among its
    controllers (at its root: v2 lets no group with processes hand controllers to its children)."""
    mounts = _mounts()
    for point, fstype, opts in mounts:
        if fstype == "cgroup" and "cpu" in opts:
            own = os.path.join(point, _own_path(True).lstrip("/"))
            return (own if os.path.isdir(own) else point), 1
    for point, fstype, _ in mounts:
        try:
            with open(os.path.join(point, "cgroup.controllers")) as f:
                if fstype == "cgroup2" and "cpu" in f.read().split():
                    return point, 2
        except OSError:
            continue
    raise CgroupError(
        "a CPU quota needs the cgroup cpu controller (v1 cpu.cfs_quota_us or v2 cpu.max), "
        "and neither is mounted with it here"
    )


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


@dataclass
class CpuGroup:
    """One cgroup with a CPU quota (`cpus` CPUs per period); `path` is its directory."""

    path: str
    version: int
    cpus: float

    @classmethod
    def create(cls, name: str, cpus: float) -> CpuGroup:
        """Make the group `name` with a quota of `cpus` CPUs; CgroupError (one line) if it cannot."""
        root, version = cpu_root()
        path = os.path.join(root, name)
        quota = round(cpus * PERIOD_US)
        try:
            if version == 2:
                control = os.path.join(root, "cgroup.subtree_control")
                with open(control) as f:
                    if "cpu" not in f.read().split():
                        _write(control, "+cpu")
            os.mkdir(path)
            if version == 1:
                _write(os.path.join(path, "cpu.cfs_period_us"), str(PERIOD_US))
                _write(os.path.join(path, "cpu.cfs_quota_us"), str(quota))
            else:
                _write(os.path.join(path, "cpu.max"), f"{quota} {PERIOD_US}")
        except OSError as e:
            if os.path.isdir(path):
                _rmdir(path)
            raise CgroupError(
                f"cannot make a cgroup v{version} with a CPU quota at {path}: " f"{e.strerror or e}"
            ) from None
        return cls(path, version, cpus)

    @property
    def procs_file(self) -> str:
        return os.path.join(self.path, "cgroup.procs")

    def pids(self) -> list[int]:
        """The processes in the group now (none once it is gone)."""
        try:
            with open(self.procs_file) as f:
                return [int(p) for p in f.read().split()]
        except FileNotFoundError:
            return []

    def stat(self) -> dict[str, int]:
        """`cpu.stat`: nr_periods, nr_throttled and the time throttled (v1 throttled_time in ns,
        v2 throttled_usec), among others."""
        with open(os.path.join(self.path, "cpu.stat")) as f:
            return {key: int(value) for key, value in (line.split() for line in f if line.strip())}

    def remove(self) -> None:
        """Delete the group (its processes must be gone; an exiting one is waited for a little)."""
        _rmdir(self.path)


def _rmdir(path: str, rounds: int = 100) -> None:
    for _ in range(rounds):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.02)  # a killed task leaves its group only once it has exited
    os.rmdir(path)


def wrap(argv: list[str], group: CpuGroup | None = None, pin: list[int] | None = None) -> list[str]:
    """`argv` started in `group` and pinned to the CPUs `pin` (either may be None): the wrapper joins
    them itself, then execs `argv` under the same pid."""
    procs = group.procs_file if group else ""
    cpus = ",".join(str(c) for c in pin) if pin else ""
    return [sys.executable, "-I", "-S", "-c", _WRAP, procs, cpus, *argv]


def stale_groups(pattern: re.Pattern, alive) -> list[CpuGroup]:
    """The groups under the cpu root whose name matches `pattern` and whose owner pid (the pattern's
    last group) `alive(pid)` says is gone; none when there is no cpu controller here."""
    try:
        root, version = cpu_root()
        names = os.listdir(root)
    except (CgroupError, OSError):
        return []
    out = []
    for name in sorted(names):
        match = pattern.match(name)
        if match and os.path.isdir(os.path.join(root, name)) and not alive(int(match.groups()[-1])):
            out.append(CpuGroup(os.path.join(root, name), version, 0.0))
    return out
