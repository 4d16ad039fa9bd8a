"""All-reduce algorithms of our own, over torch.distributed's point-to-point calls and group collectives.

- ring (Patarasuk & Yuan 2009; Baidu's ring all-reduce): a reduce-scatter then an all-gather around
  the ring of group ranks, n-1 steps each; at every step each rank sends one of n chunks of ~S/n to
  the next rank and receives one from the previous. 2(n-1)/n S bytes per rank: bandwidth-optimal.
- tree: reduce up a binary tree, then broadcast down the same tree, in pipelined chunks; by default
  the double binary tree of Sanders, Speck & Traeff (2009) as NCCL builds it (two trees, each rank
  interior in at most one when n is even, each tree carrying half the tensor). 2 log2(n) steps:
  latency-optimal for small messages.
- hierarchical (Horovod's): reduce-scatter inside each node, all-reduce across nodes between the
  ranks of the same local index, all-gather inside the node. Fewer steps, and fewer bytes, on the
  slow links between nodes.
- `choose` picks among them by the alpha-beta model (Thakur, Rabenseifner & Gropp 2005).

Every send is counted by `CommStats.record("send", ...)` and fingerprinted as `send to R`, every
receive as `recv from R`, so comm_bytes and the hang reports see them; the ring's bytes are exactly
`RING_FACTOR["all_reduce"]` of the payload when n divides it (and summed over ranks, always
2(n-1) S, for the tree too). The hierarchical one takes the ring's steps inside the node and the
backend's counted all-reduce across nodes.
All functions reduce `t` in place (sum), are synchronous, and create no process group: they may
run on a communication thread. One thread at a time per group: two threads must not interleave
their collectives on the same group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paratrain.comm.collectives import CommStats, all_reduce, opaque

ALGORITHMS = ("backend", "ring", "tree", "hierarchical")
TREE_CHUNK_BYTES = 1 << 20  # pipeline chunk of the tree algorithm
HIER_CHUNK_BYTES = 4 << 20  # pipeline piece of the hierarchical algorithm


# ------------------------------------------------------------------ point-to-point steps
def _members(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup, list[int], int]:
    """The group, the global rank of each of its ranks, and this rank's group rank."""
    group = group if group is not None else dist.group.WORLD
    return group, dist.get_process_group_ranks(group), dist.get_rank(group)


class _P2P:
    """The point-to-point traffic of one all-reduce over a group (peers by group rank). Each step
    posts its sends and receives together, as one batch (NCCL groups them, so a ring of
    send-then-receive cannot deadlock), then waits for its receives only: the sends are waited
    for by `flush`, before their buffers change, so a step blocks once. Empty chunks travel not
    at all: both ends know their sizes."""

    def __init__(self, stats: CommStats, group: dist.ProcessGroup, ranks: list[int]):
        self.stats, self.group, self.ranks = stats, group, ranks
        self.sending: list = []  # (works, fingerprint) of the sends not yet waited for

    def step(self, sends=(), recvs=()) -> None:
        ops, sent, fp = [], None, None
        for buf, peer in sends:
            if buf.numel():
                sent = self.stats.record("send", buf, self.group, f"send to {self.ranks[peer]}", self.ranks[peer])
                ops.append(dist.P2POp(dist.isend, buf, self.ranks[peer], self.group))
        k = len(ops)
        for buf, peer in recvs:
            if buf.numel():  # a receive sends nothing: only its fingerprint
                fp = self.stats.flight.record(f"recv from {self.ranks[peer]}", buf, self.group)
                ops.append(dist.P2POp(dist.irecv, buf, self.ranks[peer], self.group))
        if not ops:
            return
        works = dist.batch_isend_irecv(ops)
        if len(works) != len(ops):  # coalesced into one work (NCCL): wait for it now
            k = 0
        self.sending.append((works[:k], sent))
        self._wait(works[k:], fp)

    def flush(self) -> None:
        for works, fp in self.sending:
            self._wait(works, fp)
        self.sending.clear()

    def _wait(self, works: list, fp) -> None:
        """Wait for `works`, in flight under `fp` meanwhile (a hang report names the peer)."""
        if not works:
            return
        self.stats.flight.begin(fp)
        try:
            for w in works:
                w.wait()
        finally:
            self.stats.flight.end()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A flat view of `t`, or a flat copy when `t` is not contiguous (copied back by `_unflat`)."""
    return t.view(-1) if t.is_contiguous() else t.contiguous().view(-1)


def _unflat(t: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    if flat.data_ptr() != t.data_ptr() or not t.is_contiguous():
        t.copy_(flat.view(t.shape))
    return t


def _bounds(total: int, parts: int) -> list[int]:
    """Offsets of `parts` chunks of `total` elements, the first `total % parts` one longer."""
    size, extra = divmod(total, parts)
    out = [0]
    for i in range(parts):
        out.append(out[-1] + size + (i < extra))
    return out


# ------------------------------------------------------------------ ring
@opaque
def ring_all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats) -> torch.Tensor:
    """Sum `t` over `group` in place: reduce-scatter then all-gather around the ring (Patarasuk &
    Yuan 2009). Chunk i is the i-th of n near-equal parts (empty ones when t has fewer than n
    elements); after the reduce-scatter rank r holds the full sum of chunk r+1."""
    group, ranks, me = _members(group)
    if len(ranks) == 1 or t.numel() == 0:
        return t
    flat = _flat(t)
    ring_phases(flat, group, stats, reduce=True, gather=True)
    return _unflat(t, flat)


def ring_phases(flat: torch.Tensor, group: dist.ProcessGroup, stats: CommStats, reduce: bool, gather: bool,
          shift: int = 0) -> None:
    """The ring's reduce-scatter (`reduce`: rank r ends with the sum of chunk r+1+shift of the n
    chunks of `flat`) and/or its all-gather (`gather`: chunk r+1+shift of each rank r reaches every
    rank). shift=-1 gives rank r chunk r, the shard ZeRO's reduce-scatter owes it."""
    group, ranks, me = _members(group)
    n = len(ranks)
    bounds = _bounds(flat.numel(), n)

    def chunk(i: int) -> torch.Tensor:
        i = (i + shift) % n
        return flat[bounds[i]:bounds[i + 1]]

    nxt, prv = (me + 1) % n, (me - 1) % n
    p2p = _P2P(stats, group, ranks)
    if reduce:
        scratch = torch.empty(bounds[1], dtype=flat.dtype, device=flat.device)  # no chunk is longer than the first
        for s in range(n - 1):  # chunk me-s-1 gains the partial sum of s+1 ranks before us
            incoming = chunk(me - s - 1)
            buf = scratch[:incoming.numel()]
            p2p.step([(chunk(me - s), nxt)], [(buf, prv)])
            incoming.add_(buf)
        p2p.flush()  # the all-gather receives into the chunks sent so far
    if gather:
        for s in range(n - 1):  # pass the finished chunks on
            p2p.step([(chunk(me + 1 - s), nxt)], [(chunk(me - s), prv)])
        p2p.flush()


# ------------------------------------------------------------------ trees
def btree(n: int, rank: int) -> tuple[int, list[int]]:
    """Parent (-1 at the root) and children of `rank` in NCCL's binary tree over ranks 0..n-1
    (ncclGetBtree): rank r with lowest set bit b hangs under (r ^ b) | 2b; the odd ranks are the
    leaves, the root 0 has one child, and the depth is ceil(log2 n)."""
    bit = 1
    while bit < n and not bit & rank:
        bit <<= 1
    if rank == 0:
        return -1, ([bit >> 1] if n > 1 else [])
    parent = (rank ^ bit) | (bit << 1)
    if parent >= n:
        parent = rank ^ bit
    low = bit >> 1
    children = [rank - low] if low else []
    down = rank + low
    while low and down >= n:
        low >>= 1
        down = rank + low
    if low:
        children.append(down)
    return parent, children


def binary_tree(n: int) -> list[int]:
    """The parent of every rank (-1 at the root) in `btree`'s tree."""
    return [btree(n, r)[0] for r in range(n)]


def double_binary_tree(n: int) -> tuple[list[int], list[int]]:
    """Two binary trees over n ranks (Sanders et al. 2009, as ncclGetDtree builds them): the second
    is the first shifted by one rank when n is even (its leaves, the odd ranks, are the second's
    interior) and mirrored (r -> n-1-r) when n is odd."""
    first = binary_tree(n)
    if n % 2:
        second = [-1 if first[n - 1 - r] < 0 else n - 1 - first[n - 1 - r] for r in range(n)]
    else:
        second = [-1 if first[(r - 1) % n] < 0 else (first[(r - 1) % n] + 1) % n for r in range(n)]
    return first, second


def children_of(parents: list[int], rank: int) -> list[int]:
    return [r for r, p in enumerate(parents) if p == rank]


def depth(parents: list[int]) -> int:
    """Edges on the longest path from a leaf to the root."""
    def up(r: int) -> int:
        return 0 if parents[r] < 0 else 1 + up(parents[r])
    return max(up(r) for r in range(len(parents)))


@dataclass
class _TreePart:
    """This rank's place in one tree and the chunks of the part of the tensor that tree carries."""
    parent: int
    children: list[int]
    chunks: list[torch.Tensor]


def _tree_parts(flat: torch.Tensor, trees, me: int, chunk_bytes: int) -> list[_TreePart]:
    halves = _bounds(flat.numel(), len(trees))
    parts = []
    for parents, lo, hi in zip(trees, halves, halves[1:]):
        k = max(1, math.ceil((hi - lo) * flat.element_size() / chunk_bytes))
        cuts = _bounds(hi - lo, k)
        chunks = [flat[lo + a:lo + b] for a, b in zip(cuts, cuts[1:])]
        parts.append(_TreePart(parents[me], children_of(parents, me), chunks))
    return parts


@opaque
def tree_all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats,
                    double: bool | None = None, chunk_bytes: int = TREE_CHUNK_BYTES) -> torch.Tensor:
    """Sum `t` over `group` in place: reduce to the root along a binary tree, then broadcast down
    the same tree, chunk by chunk (pipelined: a rank sends chunk c up while its children already
    send c+1). `double`: the double binary tree, each tree carrying half of `t`, which spreads the
    bandwidth over every rank's links; else one tree, half the messages for the same steps. By
    default the double tree once `t` spans more than one chunk, one tree below (latency-bound).

    Every rank takes the steps (chunk c, tree j) in the same order, receiving before it sends, so
    each wait is for a peer deeper in the tree at the same step or for an earlier step: no
    deadlock, also where sends complete in posting order (NCCL's streams; tested on gloo)."""
    group, ranks, me = _members(group)
    n = len(ranks)
    if n == 1 or t.numel() == 0:
        return t
    flat = _flat(t)
    if double is None:
        double = flat.numel() * flat.element_size() > chunk_bytes
    parts = _tree_parts(flat, double_binary_tree(n) if double else (binary_tree(n),), me, chunk_bytes)
    steps = max(len(p.chunks) for p in parts)
    widest = max(p.chunks[0].numel() for p in parts)  # the first chunk of a part is its longest
    scratch = torch.empty((2, widest), dtype=flat.dtype, device=flat.device)
    p2p = _P2P(stats, group, ranks)
    for c in range(steps):  # reduce: children's partial sums into ours, ours to the parent
        for p in (p for p in parts if c < len(p.chunks)):
            mine = p.chunks[c]
            bufs = [scratch[i, :mine.numel()] for i in range(len(p.children))]
            p2p.step(recvs=zip(bufs, p.children))
            for buf in bufs:
                mine.add_(buf)
            if p.parent >= 0:
                p2p.step(sends=[(mine, p.parent)])
    p2p.flush()  # before the broadcast overwrites what they send
    for c in range(steps):  # broadcast: the root's sum down the same tree
        for p in (p for p in parts if c < len(p.chunks)):
            mine = p.chunks[c]
            if p.parent >= 0:
                p2p.step(recvs=[(mine, p.parent)])
            p2p.step(sends=[(mine, child) for child in p.children])
    p2p.flush()
    return _unflat(t, flat)


# ------------------------------------------------------------------ hierarchical
def two_levels(n: int, node_size: int | None) -> bool:
    """Does a group of n ranks split into nodes of `node_size` (several nodes of several ranks)?"""
    return node_size is not None and 1 < node_size < n and n % node_size == 0


# (id(group), node_size) -> its Hierarchy: a registry of process groups, as torch keeps its own
_BUILT: dict[tuple[int, int], "Hierarchy"] = {}


@dataclass
class Hierarchy:
    """The two levels of one group for Horovod's hierarchical all-reduce: `intra`, this rank's node
    (group ranks g*L .. g*L+L-1 for L = node_size), and `inter`, the ranks of the same local index
    i on every node (group ranks i, L+i, 2L+i, ...).

    Build it with `Hierarchy.build` once per (group, node_size), before the first hierarchical
    all-reduce and outside any communication thread: `dist.new_group` is collective over the whole
    world, so every rank of the world calls `build` at the same point of its sequence of group
    creations (e.g. in DataParallel's constructor, after the mesh), with the same node_size and the
    same `groups`, ranks outside the group included."""

    group: dist.ProcessGroup
    node_size: int
    intra: dist.ProcessGroup
    inter: dist.ProcessGroup

    @classmethod
    def build(cls, group: dist.ProcessGroup | None, node_size: int,
              groups: list[list[int]] | None = None) -> "Hierarchy | None":
        """Create the sub-groups of every group in `groups` (the global ranks of each group of the
        family `group` belongs to, e.g. every dp group of the mesh; default: `group` alone, which
        must then span the world) and register this rank's. None, creating nothing, where the
        group has one level (node_size 1, the group's size, or not dividing it: the hierarchical
        all-reduce then runs the backend's flat one) or where this rank is in none of `groups`."""
        world, me = dist.get_world_size(), dist.get_rank()
        group = group if group is not None else dist.group.WORLD
        if groups is None:
            groups = [dist.get_process_group_ranks(group)]
            if len(groups[0]) != world:
                raise ValueError(f"Hierarchy.build: a group of {len(groups[0])} of {world} ranks needs `groups`, "
                                 "the ranks of every group of its family (new_group is collective over the world)")
        mine = next((g for g in groups if me in g), None)
        if mine is not None and dist.get_process_group_ranks(group) != list(mine):
            raise ValueError(f"Hierarchy.build: this rank's group {dist.get_process_group_ranks(group)} "
                             f"is not its entry of `groups` {list(mine)}")
        found = None
        for ranks in groups:  # the same new_group calls, in the same order, on every rank
            if not two_levels(len(ranks), node_size):
                continue
            nodes = [dist.new_group(ranks[g:g + node_size]) for g in range(0, len(ranks), node_size)]
            across = [dist.new_group(ranks[i::node_size]) for i in range(node_size)]
            if ranks is mine:
                i = ranks.index(me)
                found = cls(group, node_size, nodes[i // node_size], across[i % node_size])
                _BUILT[(id(group), node_size)] = found  # holds `group`: its id stays its own
        return found

    @staticmethod
    def of(group: dist.ProcessGroup | None, node_size: int) -> "Hierarchy":
        group = group if group is not None else dist.group.WORLD
        h = _BUILT.get((id(group), node_size))
        if h is None or h.group is not group:
            raise ValueError(f"hierarchical all-reduce with node_size {node_size}: call Hierarchy.build(group, "
                             f"{node_size}) on every rank first (it creates process groups)")
        return h


def group_node_size(ranks: list[int], ranks_per_node: int) -> int | None:
    """The node_size of a group whose global `ranks` live on nodes of `ranks_per_node` consecutive
    global ranks (torchrun's LOCAL_WORLD_SIZE): its ranks per node when every node holds the same
    number of them, consecutive in group order; else None (one level)."""
    nodes = [r // ranks_per_node for r in ranks]
    size = nodes.count(nodes[0])
    blocks = [nodes[i:i + size] for i in range(0, len(nodes), size)]
    if len(ranks) % size or any(len(set(b)) != 1 for b in blocks) or len({b[0] for b in blocks}) != len(blocks):
        return None
    return size


@opaque
def hierarchical_all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats,
                            node_size: int | None, chunk_bytes: int = HIER_CHUNK_BYTES) -> torch.Tensor:
    """Sum `t` over `group` in place, Horovod's way: the ring's reduce-scatter inside the node, all-reduce
    of this rank's 1/node_size shard across nodes, all-gather inside the node (the tensor padded
    to a multiple of node_size). A group of one level (see `Hierarchy.build`) takes the backend's
    all-reduce instead. The same bytes as a ring over the group: (L-1)/L + 2(N-1)/(N L) + (L-1)/L
    of the (padded) tensor is 2(n-1)/n of it."""
    group = group if group is not None else dist.group.WORLD
    n = dist.get_world_size(group)
    if n == 1 or t.numel() == 0:
        return t
    if not two_levels(n, node_size):
        all_reduce(t, group, stats)
        return t
    h = Hierarchy.of(group, node_size)
    flat = _flat(t)
    pad = -flat.numel() % node_size
    buf = flat if not pad else torch.cat([flat, flat.new_zeros(pad)])
    # Pipelined in pieces of about `chunk_bytes`: piece p crosses the nodes (the backend's
    # all-reduce, asynchronous) while the node reduces piece p+1 and gathers piece p-1, with the
    # ring's point-to-point steps (gloo's reduce_scatter and all_gather collectives take several
    # times as long for the same bytes over loopback).
    units = buf.numel() // node_size
    cuts = _bounds(units, max(1, min(units, math.ceil(buf.numel() * buf.element_size() / chunk_bytes))))
    pieces = [buf[a * node_size:b * node_size] for a, b in zip(cuts, cuts[1:])]
    held = (dist.get_rank(h.intra) + 1) % node_size  # the chunk of a piece this rank holds summed over its node
    crossing = []
    for piece in pieces:
        ring_phases(piece, h.intra, stats, reduce=True, gather=False)
        size = piece.numel() // node_size
        crossing.append(all_reduce(piece[held * size:(held + 1) * size], h.inter, stats, async_op=True))
    for piece, work in zip(pieces, crossing):
        work.wait()
        ring_phases(piece, h.intra, stats, reduce=False, gather=True)
    if pad:
        flat.copy_(buf[:flat.numel()])
    return _unflat(t, flat)


# ------------------------------------------------------------------ dispatch and choice
def all_reduce_with(t: torch.Tensor, group: dist.ProcessGroup | None, stats: CommStats, algorithm: str,
                    node_size: int | None = None) -> torch.Tensor:
    """Sum `t` over `group` in place with `algorithm` (one of ALGORITHMS; resolve "auto" with
    `choose` first), synchronously."""
    if algorithm == "backend":
        all_reduce(t, group if group is not None else dist.group.WORLD, stats)
        return t
    if algorithm == "ring":
        return ring_all_reduce(t, group, stats)
    if algorithm == "tree":
        return tree_all_reduce(t, group, stats)
    if algorithm == "hierarchical":
        return hierarchical_all_reduce(t, group, stats, node_size)
    raise ValueError(f"all-reduce algorithm must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}"
                     + (" (resolve it with choose())" if algorithm == "auto" else ""))


def _link(links: dict, key: str) -> tuple[float, float]:
    if key not in links:
        raise ValueError(f"all-reduce model: links need {key!r}: (alpha seconds, beta bytes/s)")
    v = links[key]
    return (float(v[0]), float(v[1])) if isinstance(v, (tuple, list)) else (float(v.alpha), float(v.beta))


def predicted_times(nbytes: float, n: int, node_size: int | None, links: dict,
                    chunk_bytes: int = TREE_CHUNK_BYTES) -> dict[str, float]:
    """Seconds of each algorithm for an all-reduce of `nbytes` over n ranks, by the alpha-beta
    model: a step over a link costs alpha + the bytes it carries / beta, and a step waits for its
    slowest link. `links`: {"intra": (alpha, beta)} and, when the group spans nodes of `node_size`
    ranks, "inter": one node's link to the others (its ranks share it).
      ring:  2(n-1) steps of S/n, on "inter" when the group spans nodes;
      tree:  as `tree_all_reduce` runs it, over trees of depth D: above one chunk the double tree,
             2(D + k - 1) steps of S/k (each half in k chunks, a rank taking in two chunks of
             S/(2k) per step); below, one tree, 2D steps of 2S (an interior rank's two children);
      hierarchical (several nodes of several ranks): 2(L-1) steps of S/L inside the node, then
             2(N-1) steps of S/N through the node's link (its L ranks each send S/(LN))."""
    single = node_size is None or node_size >= n
    a, b = _link(links, "intra" if single else "inter")
    out = {"ring": 2 * (n - 1) * (a + nbytes / n / b)}
    d = depth(binary_tree(n))  # the double tree's two are as deep
    if nbytes > chunk_bytes:  # the double tree, each half in k chunks
        k = math.ceil(nbytes / 2 / chunk_bytes)
        out["tree"] = 2 * (d + k - 1) * (a + nbytes / k / b)
    else:  # one tree, one chunk
        out["tree"] = 2 * d * (a + 2 * nbytes / b)
    if two_levels(n, node_size):
        ai, bi = _link(links, "intra")
        nodes = n // node_size
        out["hierarchical"] = (2 * (node_size - 1) * (ai + nbytes / node_size / bi)
                               + 2 * (nodes - 1) * (a + nbytes / nodes / b))
    return out


def choose(algorithm: str, nbytes: float, n: int, node_size: int | None = None, links: dict | None = None) -> str:
    """`algorithm` itself, or for "auto" the one `predicted_times` finds fastest (ties: ring, tree,
    hierarchical in that order). A group of one rank sends nothing: "backend"."""
    if algorithm != "auto":
        if algorithm not in ALGORITHMS:
            raise ValueError(f"all-reduce algorithm must be auto or one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
        return algorithm
    if n <= 1:
        return "backend"
    if links is None:
        raise ValueError("choose('auto', ...) needs `links`: {'intra': (alpha, beta), 'inter': (alpha, beta)}")
    times = predicted_times(nbytes, n, node_size, links)
    return min(times, key=times.get)
