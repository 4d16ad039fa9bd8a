"""Communication: collectives that count what they send (later: compression, fingerprints)."""

from paratrain.comm.collectives import (
    CommStats, all_gather, all_gather_flat, all_reduce, broadcast, isend, recv, reduce_scatter, reduce_scatter_flat,
)

__all__ = ["CommStats", "all_gather", "all_gather_flat", "all_reduce", "broadcast", "isend", "recv",
           "reduce_scatter", "reduce_scatter_flat"]
