"""Communication: collectives that count what they send (later: compression, fingerprints)."""

from paratrain.comm.collectives import CommStats, all_gather, all_reduce, broadcast, isend, recv, reduce_scatter

__all__ = ["CommStats", "all_gather", "all_reduce", "broadcast", "isend", "recv", "reduce_scatter"]
