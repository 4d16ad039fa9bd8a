"""Communication: collectives that count what they send, gradient compression, and (flight.py)
the fingerprints of every call behind the hang reports."""

from paratrain.comm.collectives import (
    CommStats, all_gather, all_gather_flat, all_reduce, broadcast, isend, recv, reduce_scatter, reduce_scatter_flat,
    send,
)
from paratrain.comm.compress import Compressor, parse_compress

__all__ = ["CommStats", "Compressor", "all_gather", "all_gather_flat", "all_reduce", "broadcast", "isend",
           "parse_compress", "recv", "reduce_scatter", "reduce_scatter_flat", "send"]
