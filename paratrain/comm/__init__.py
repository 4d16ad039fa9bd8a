"""Communication: collectives that count what they send (later: compression, fingerprints)."""

from paratrain.comm.collectives import CommStats, all_reduce, broadcast

__all__ = ["CommStats", "all_reduce", "broadcast"]
