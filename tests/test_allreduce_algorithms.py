"""Our all-reduce algorithms (comm/algorithms.py): each equals dist.all_reduce on gloo ranks for
sizes down to fewer elements than ranks, leaves every replica bit-identical, counts the bytes of
the ring model; the trees have the shapes of NCCL's; `choose` follows the alpha-beta model.

One spawn per world size runs every algorithm on every size and returns, per case, how far the
result lies outside the tolerance of the backend's sum (the summation orders differ), a digest of
the result (replicas must agree exactly) and what CommStats counted.
"""

from __future__ import annotations

import hashlib
import math
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from helpers import spawn
from paratrain.comm import CommStats
from paratrain.comm.algorithms import (
    Hierarchy, all_reduce_with, binary_tree, children_of, choose, depth, double_binary_tree, group_node_size,
    hierarchical_all_reduce, predicted_times, ring_all_reduce, tree_all_reduce,
)
from paratrain.comm.collectives import RING_FACTOR

SIZES = [1, 2, 7, 840, 1000, 10**5 + 3]  # 840: divisible by 2, 3, 4 and 8, for exact per-rank bytes
NODE_SIZES = {2: [2, 1], 3: [2], 4: [2, 3], 8: [2, 4, 3]}  # 1, 3 on 4 and 8, 2 on 2 and 3: one level
RTOL, ATOL = 1e-6, 1e-5


def _variants(node_sizes: list[int]) -> dict:
    out = {
        "backend": lambda t, g, s: all_reduce_with(t, g, s, "backend"),
        "ring": ring_all_reduce,
        "tree": tree_all_reduce,
        "tree-double": lambda t, g, s: tree_all_reduce(t, g, s, double=True),
        "tree-chunked": lambda t, g, s: tree_all_reduce(t, g, s, chunk_bytes=4096),
        "tree-single": lambda t, g, s: tree_all_reduce(t, g, s, double=False, chunk_bytes=4096),
    }
    for ns in node_sizes:
        out[f"hierarchical-{ns}"] = lambda t, g, s, ns=ns: hierarchical_all_reduce(t, g, s, ns)
    return out


def _check(y: torch.Tensor, ref: torch.Tensor) -> tuple[float, str]:
    """How far `y` lies outside the tolerance around `ref` (<= 0: inside), and a digest of `y`."""
    excess = ((y - ref).abs() - (ATOL + RTOL * ref.abs())).max().item()
    return excess, hashlib.sha1(y.contiguous().numpy().tobytes()).hexdigest()


def _in_thread(fn, *args):
    """Run `fn(*args)` on another thread, as a communication thread would."""
    errors = []
    thread = threading.Thread(target=lambda: _catch(errors, fn, *args))
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as e:  # re-raised on the calling thread
        errors.append(e)


def _cases(group, sizes, node_sizes, seed: int = 0) -> dict:
    """Every variant on every size over `group`: {(variant, size): (excess, digest, bytes, calls, labels)}."""
    rank = dist.get_rank()
    out = {}
    for size in sizes:
        x = torch.randn(size, generator=torch.Generator().manual_seed(seed + 7919 * rank + size))
        ref = x.clone()
        dist.all_reduce(ref, group=group)
        for name, fn in _variants(node_sizes).items():
            y, stats = x.clone(), CommStats()
            fn(y, group, stats)
            out[(name, size)] = (*_check(y, ref), stats.bytes, dict(stats.calls),
                                 {f.op for f in stats.flight.recent})
    return out


def _extras(node_sizes) -> dict:
    """A non-contiguous input, each algorithm from a non-main thread, and the refusals."""
    out = {}
    x = torch.randn(5, 7, generator=torch.Generator().manual_seed(dist.get_rank())).T  # not contiguous
    ref = x.contiguous()
    dist.all_reduce(ref)
    for name, fn in _variants(node_sizes).items():
        y = x.clone()  # the same strides as x
        assert not y.is_contiguous()
        fn(y, None, CommStats())
        out[("transposed", name)] = _check(y, ref)
        z = x.contiguous()
        _in_thread(fn, z, None, CommStats())
        out[("thread", name)] = _check(z, ref)
    if dist.get_world_size() == 4:
        part = dist.new_group([0, 1, 2])  # every rank creates every group
        unbuilt = dist.new_group([0, 1, 2, 3])
        if dist.get_rank() < 3:
            out["part"] = _refusal(lambda: Hierarchy.build(part, 2))
        out["unbuilt"] = _refusal(lambda: hierarchical_all_reduce(torch.ones(4), unbuilt, CommStats(), 2))
    return out


def _refusal(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"


def _world_run() -> dict:
    n = dist.get_world_size()
    for ns in NODE_SIZES[n]:
        Hierarchy.build(None, ns)  # on every rank, before any hierarchical all-reduce
    out = {"cases": _cases(None, SIZES, NODE_SIZES[n]), "extras": _extras(NODE_SIZES[n])}
    if n == 8:  # a family of groups: every dp group of dp=4, tp=2, nodes of two dp ranks
        family = [[0, 2, 4, 6], [1, 3, 5, 7]]
        groups = [dist.new_group(g) for g in family]
        mine = groups[dist.get_rank() % 2]
        Hierarchy.build(mine, 2, groups=family)
        out["family"] = _cases(mine, [7, 1000], [2], seed=1)
    return out


@pytest.fixture(scope="module", params=[2, 3, 4, pytest.param(8, marks=pytest.mark.slow)])
def world(request):
    return request.param, spawn(_world_run, request.param)


def _assert_sums(results: list[dict], key: str = "cases", groups: int = 1):
    """Each rank's sums within tolerance, and bit-identical to its group's first rank's (ranks
    r and r % groups share a group)."""
    for name, size in results[0][key]:
        for r, res in enumerate(results):
            excess, digest = res[key][(name, size)][:2]
            assert excess <= 0, f"{name}, {size} elements, rank {r}: off by {excess}"
            if name != "backend":
                assert digest == results[r % groups][key][(name, size)][1], \
                    f"{name}, {size} elements: rank {r}'s replica differs from rank {r % groups}'s"


def test_each_algorithm_equals_the_backend_and_replicas_agree(world):
    n, results = world
    _assert_sums(results)
    checked = [key for key in results[0]["extras"] if isinstance(key, tuple)]  # transposed, thread
    assert len(checked) == 2 * (6 + len(NODE_SIZES[n]))
    for key in checked:
        assert all(res["extras"][key][0] <= 0 for res in results), key
    if n == 8:
        _assert_sums(results, "family", groups=2)


def test_ring_and_tree_send_the_ring_models_bytes(world):
    n, results = world
    for size in SIZES:
        payload = 4 * size
        for name in ("ring", "tree", "tree-double", "tree-chunked", "tree-single"):
            sent = [res["cases"][(name, size)][2] for res in results]
            assert sum(sent) == 2 * (n - 1) * payload, (name, size, sent)  # each byte crosses 2(n-1) links
        if size % n == 0:  # the ring's per-rank bytes are collectives.py's figure for the same payload
            assert all(s == round(payload * RING_FACTOR["all_reduce"](n))
                       for s in (res["cases"][("ring", size)][2] for res in results))
    _bytes, calls, labels = results[1]["cases"][("ring", 840)][2:]
    assert calls == {"send": 2 * (n - 1)}
    assert {f"send to {2 % n}", f"recv from 0"} <= labels  # rank 1's neighbours, for the hang reports


def test_hierarchical_runs_the_rings_steps_in_the_node_and_one_all_reduce_across_or_falls_back(world):
    n, results = world
    for ns in NODE_SIZES[n]:
        _excess, _digest, sent, calls, _labels = results[0]["cases"][(f"hierarchical-{ns}", 840)]
        assert sent == round(4 * 840 * RING_FACTOR["all_reduce"](n))
        if 1 < ns < n and n % ns == 0:
            assert calls == {"send": 2 * (ns - 1), "all_reduce": 1}
        else:  # one level: the backend's all-reduce
            assert calls == {"all_reduce": 1}
    if n == 4:
        assert "needs `groups`" in results[0]["extras"]["part"]
        assert "call Hierarchy.build" in results[0]["extras"]["unbuilt"]


def _large_run() -> dict:
    Hierarchy.build(None, 2)
    variants = {k: v for k, v in _variants([2]).items() if k in ("ring", "tree", "hierarchical-2")}
    x = torch.randn(10**7, generator=torch.Generator().manual_seed(dist.get_rank()))
    ref = x.clone()
    dist.all_reduce(ref)
    out = {}
    for name, fn in variants.items():
        y = x.clone()
        fn(y, None, CommStats())
        out[name] = _check(y, ref)
    return out


@pytest.mark.slow
def test_ten_million_elements():
    results = spawn(_large_run, 4)
    for name in results[0]:
        assert all(res[name][0] <= 0 for res in results), name
        assert len({res[name][1] for res in results}) == 1, name


# ---------------------------------------------------------------- trees and topology (no processes)
def _is_tree(parents: list[int]) -> bool:
    roots = [r for r, p in enumerate(parents) if p < 0]
    for r in range(len(parents)):
        seen, x = set(), r
        while parents[x] >= 0:
            if x in seen:
                return False
            seen.add(x)
            x = parents[x]
    return len(roots) == 1


@pytest.mark.parametrize("n", range(1, 18))
def test_binary_and_double_binary_trees(n):
    trees = (binary_tree(n), *double_binary_tree(n))
    for parents in trees:
        assert _is_tree(parents)
        assert all(len(children_of(parents, r)) <= 2 for r in range(n))
        assert depth(parents) == (math.ceil(math.log2(n)) if n > 1 else 0)
    first, second = trees[1:]
    assert first == trees[0]
    if n % 2 == 0:  # each rank interior in at most one tree: both halves' traffic spread over all ranks
        interior = [{r for r in range(n) if children_of(t, r)} for t in (first, second)]
        assert not interior[0] & interior[1]


def test_btree_matches_nccl_layout():
    assert binary_tree(8) == [-1, 2, 4, 2, 0, 6, 4, 6]  # 0 -> 4 -> {2, 6} -> {1, 3}, {5, 7}
    assert double_binary_tree(4) == ([-1, 2, 0, 2], [3, -1, 3, 1])  # second: the first shifted by one
    assert double_binary_tree(3) == ([-1, 2, 0], [2, 0, -1])  # second: the first mirrored


def test_group_node_size():
    assert group_node_size([0, 1, 2, 3], 2) == 2
    assert group_node_size([0, 2, 4, 6], 4) == 2  # a dp group under tp=2, four ranks a node
    assert group_node_size([0, 4], 4) == 1
    assert group_node_size([0, 1, 2], 2) is None  # a node with fewer ranks
    assert group_node_size([0, 2, 1, 3], 2) is None  # a node's ranks not consecutive in group order


# ---------------------------------------------------------------- choose
ONE_NODE = {"intra": (1e-5, 1e9)}


def test_predicted_times_by_hand():
    t = predicted_times(1e6, 4, None, ONE_NODE)
    assert t["ring"] == pytest.approx(6 * (1e-5 + 2.5e5 / 1e9))  # 2(n-1) steps of S/n
    assert t["tree"] == pytest.approx(2 * 2 * (1e-5 + 2e6 / 1e9))  # depth 2, one tree: S from each child
    assert "hierarchical" not in t
    links = {"intra": (5e-6, 1e10), "inter": SimpleNamespace(alpha=1e-4, beta=1e9)}  # a planner Link works too
    t = predicted_times(2**26, 8, 4, links)
    assert t["ring"] == pytest.approx(14 * (1e-4 + 2**23 / 1e9))
    assert t["hierarchical"] == pytest.approx(6 * (5e-6 + 2**24 / 1e10) + 2 * (1e-4 + 2**25 / 1e9))
    assert t["tree"] == pytest.approx(2 * (3 + 31) * (1e-4 + 2**26 / 32 / 1e9))


def test_choose_follows_the_model():
    # one node, n=4: tree 4 alpha + 8 S/beta against ring 6 alpha + 1.5 S/beta, equal at S = alpha beta / 3.25
    assert choose("auto", 2_900, 4, None, ONE_NODE) == "tree"
    assert choose("auto", 3_300, 4, None, ONE_NODE) == "ring"
    assert choose("auto", 2**24, 4, None, ONE_NODE) == "ring"
    links = {"intra": (5e-6, 1e10), "inter": (1e-4, 1e9)}
    assert choose("auto", 1024, 8, None, links) == "tree"  # one node: 6 steps against the ring's 14
    assert choose("auto", 1024, 8, 4, links) == "hierarchical"  # 2 steps across nodes against the tree's 6
    assert choose("auto", 1024, 64, 8, links) == "tree"  # 12 steps across nodes against 14
    assert choose("auto", 2**26, 8, 4, links) == "hierarchical"  # fewer bytes and steps across nodes
    assert choose("auto", 2**26, 8, 3, links) == "ring"  # nodes of 3 do not divide 8: no hierarchy
    assert choose("auto", 2**26, 1, None, ONE_NODE) == "backend"
    assert choose("ring", 1, 4) == "ring"


def test_choose_refuses_bad_input():
    with pytest.raises(ValueError, match="one of backend, ring, tree, hierarchical"):
        choose("butterfly", 1024, 4)
    with pytest.raises(ValueError, match="'inter'"):
        choose("auto", 1024, 8, 4, ONE_NODE)
    with pytest.raises(ValueError, match="needs `links`"):
        choose("auto", 1024, 8)
    with pytest.raises(ValueError, match="resolve it with choose"):
        all_reduce_with(torch.ones(1), None, CommStats(), "auto")
