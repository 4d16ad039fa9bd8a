"""Adasum (Maleki et al., MLSys 2021, "Adasum: Adaptive Summation of Gradients for Deep Learning").

Two gradients combine as

    adasum(a, b) = (1 - a.b / (2 |a|^2)) a + (1 - a.b / (2 |b|^2)) b

(orthogonal gradients add, parallel ones average), and n = 2^k ranks combine over a binary tree
of neighbours: (0, 1), (2, 3), ... first, then those pairs, as Horovod's vector-halving
distance-doubling algorithm pairs them. Here each level is one exchange of the whole vector with
the rank at distance 2^level (recursive doubling: log2(n) exchanges of the full tensor, where
Horovod sends about twice the tensor in all); both ranks of a pair compute the same combination
from the same two vectors, so every rank ends with the same result. Dot products and norms are
taken in float64, per tensor; a norm below 1e-8 keeps the other coefficient at 1, as Horovod.
"""

from __future__ import annotations

import torch

from paratrain.comm import CommStats, isend, recv

NORM_FLOOR = 1e-8


def combine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """adasum(a, b) in a's dtype."""
    a64, b64 = a.double(), b.double()
    dot, na, nb = float((a64 * b64).sum()), float((a64 * a64).sum()), float((b64 * b64).sum())
    ca = 1.0 - dot / (2 * na) if na >= NORM_FLOOR else 1.0
    cb = 1.0 - dot / (2 * nb) if nb >= NORM_FLOOR else 1.0
    return (ca * a64 + cb * b64).to(a.dtype)


def tree(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The reference: adasum over a binary tree of consecutive halves (a power-of-two count)."""
    if len(tensors) == 1:
        return tensors[0]
    half = len(tensors) // 2
    return combine(tree(tensors[:half]), tree(tensors[half:]))


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def allreduce(x: torch.Tensor, rank: int, size: int, stats: CommStats) -> torch.Tensor:
    """Adasum of every rank's `x` (the world's ranks; `size` a power of two), as a new tensor."""
    distance = 1
    while distance < size:
        partner = rank ^ distance
        other = torch.empty_like(x)
        work = isend(x, partner, None, stats)
        recv(other, partner, None, stats=stats)
        work.wait()
        x = combine(x, other) if rank < partner else combine(other, x)
        distance *= 2
    return x
