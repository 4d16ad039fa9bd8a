"""Horovod's exceptions, which elastic training tells apart: a failed collective
(`HorovodInternalError`: restore the last committed state and go on) and a change of hosts
(`HostsUpdatedInterrupt`: re-form the world, then go on)."""

from __future__ import annotations


class HorovodInternalError(RuntimeError):
    """Internal error raised when a Horovod collective operation (e.g., allreduce) fails.
    This is handled in elastic mode as a recoverable error, and will result in a reset event."""


class HostsUpdatedInterrupt(RuntimeError):
    """Internal interrupt event indicating that the set of hosts in the job has changed.
    In elastic mode, this will result in a reset event without a restore to committed state."""

    def __init__(self, skip_sync: bool):
        super().__init__()
        self.skip_sync = skip_sync
