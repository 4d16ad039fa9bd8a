"""Fault aids (`--simulate-failure RANK:STEP[:HOW]`): the ways a worker fails on purpose, to test recovery.

HOW (FAULTS) is empty (raise an error at the step: the launcher restarts the workers), `kill`
(SIGKILL the worker), `permanent` (its node is lost for good, as a machine that dies: its torchrun agent
and every worker of that agent are SIGKILLed, so only an elastic run, `torchrun --nnodes MIN:MAX`, goes
on, at a smaller world), or one of these in the checkpoint save of that step: `save-kill`,
`save-permanent`, `save-freeze` (the worker stops forever, as a hung disk, for the watchdog to find).
"""

from __future__ import annotations

import os
import signal
import time

# --simulate-failure RANK:STEP[:HOW]: raise at the step; kill: SIGKILL there; permanent: lose its node for
# good (torchrun only); save-kill, save-permanent, save-freeze: the same, or a freeze, in that step's save
FAULTS = ("", "kill", "permanent", "save-kill", "save-permanent", "save-freeze")
NODE_LOSS = ("permanent", "save-permanent")


def parse_fault(text: str | None) -> tuple[int, int, str] | None:
    """(rank, step, how) of a --simulate-failure value config.validate accepted; None for none."""
    if not text:
        return None
    rank, step, how = (text + "::").split(":")[:3]
    return int(rank), int(step), how


def fault_problem(text: str, ranks: int, world_size: int | None) -> str | None:
    """What is wrong with --simulate-failure `text` (one line), or None: RANK:STEP[:HOW] with a rank
    of the run and a HOW of FAULTS; a node lost for good only under torchrun (`world_size`
    given), whose other agents go on (paratrain's own launcher is one node: the run would end)."""
    rank, _, step = text.partition(":")
    step, _, how = step.partition(":")
    later = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"  # past the fault: the world may be smaller
    if not (rank.isdigit() and step.isdigit()) or (int(rank) >= ranks and not later) or how not in FAULTS:
        return (f"--simulate-failure: expected RANK:STEP[:HOW] with RANK < {ranks} and HOW one of "
                f"{', '.join(h for h in FAULTS if h)}, got {text!r}")
    if how in NODE_LOSS and world_size is None:
        return (f"--simulate-failure {text}: {how} loses the node of rank {rank} for good, which only an elastic "
                f"torchrun run survives; start it under torchrun --nnodes MIN:MAX, or use "
                f"{how.replace('permanent', 'kill')}")
    return None


def strike(how: str) -> None:
    """Fail as `how` says (see the module docstring); returns only for the plain failure (HOW empty),
    which the caller raises where it stands."""
    if how in NODE_LOSS:
        lose_node()
    if how in ("kill", "save-kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "save-freeze":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # frozen, but the launcher can still stop it
        while True:
            time.sleep(3600)


def lose_node() -> None:
    """This worker's node lost for good: SIGKILL every other process its torchrun agent started (the
    sibling workers, in sessions of their own, and their children), the agent, then this worker.
    The agent is stopped first so that it cannot see a worker die and start a new one. Outside
    torchrun (config.validate refuses it there) a RuntimeError, so no other parent is ever killed."""
    agent, me = os.getppid(), os.getpid()
    if not is_torchrun_agent(agent):
        raise RuntimeError("--simulate-failure ...:permanent: this worker's parent is not a torchrun agent")
    _signal(agent, signal.SIGSTOP)
    for pid in descendants(agent):
        if pid != me:
            _signal(pid, signal.SIGKILL)
    _signal(agent, signal.SIGKILL)
    os.kill(me, signal.SIGKILL)


def is_torchrun_agent(pid: int) -> bool:
    """Whether process `pid` runs torchrun (`torchrun ...` or `python -m torch.distributed.run ...`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(a == b"torch.distributed.run" or os.path.basename(a) == b"torchrun" for a in argv)


def descendants(root: int) -> list[int]:
    """The pids below `root` in the process tree (children first), from /proc."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])  # after the command, which may hold spaces
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
