"""ZeRO's reduce-scatter and all-gather with our algorithms (comm/sharded.py) equal the backend's on
gloo ranks, shard sizes from one element up, on groups of one and two levels; they send the ring's
bytes, and the hierarchical ones send a node's share across nodes once; `auto` (comm/tuning.py)
agrees on one algorithm on every rank and remembers it."""

from __future__ import annotations

import torch
import torch.distributed as dist

import pytest
from helpers import spawn
from paratrain.comm import CommStats
from paratrain.comm.algorithms import Hierarchy
from paratrain.comm.collectives import RING_FACTOR, all_gather_flat, reduce_scatter_flat
from paratrain.comm.sharded import all_gather_with, reduce_scatter_with
from paratrain.comm.tuning import Tuner, candidates

SHARDS = [1, 3, 250, 10**5 + 1]  # elements per rank
NODE_SIZES = {2: [], 3: [], 4: [2], 6: [2, 3], 8: [2, 4]}


def _variants(n: int) -> dict[str, tuple[str, int | None]]:
    out = {"ring": ("ring", None)}
    for ns in NODE_SIZES[n]:
        out[f"hierarchical-{ns}"] = ("hierarchical", ns)
    out["hierarchical-one-level"] = ("hierarchical", None)  # falls back to the ring
    return out


def _run() -> dict:
    n, rank = dist.get_world_size(), dist.get_rank()
    for ns in NODE_SIZES[n]:
        Hierarchy.build(None, ns)
    out = {}
    for shard in SHARDS:
        x = torch.randn(n * shard, generator=torch.Generator().manual_seed(31 * rank + shard))
        ref_rs = torch.empty(shard)
        reduce_scatter_flat(ref_rs, x.clone(), dist.group.WORLD, CommStats())
        mine = torch.randn(shard, generator=torch.Generator().manual_seed(7 * rank + shard))
        ref_ag = torch.empty(n * shard)
        all_gather_flat(ref_ag, mine, dist.group.WORLD, CommStats())
        for name, (algo, ns) in _variants(n).items():
            counted = ns or (2 if n % 2 == 0 and n > 2 else None)  # nodes of 2 ranks where they divide n, for the ring too
            rs, stats = torch.empty(shard), CommStats(node_size=counted)
            reduce_scatter_with(rs, x.clone(), None, stats, algo, ns)
            ag, gstats = torch.full((n * shard,), float("nan")), CommStats(node_size=counted)
            all_gather_with(ag, mine, None, gstats, algo, ns)
            out[(name, shard)] = {"rs_error": (rs - ref_rs).abs().max().item(),
                                  "rs_scale": ref_rs.abs().max().item(), "ag_equal": torch.equal(ag, ref_ag),
                                  "bytes": (stats.bytes, gstats.bytes), "inter": (stats.inter_bytes, gstats.inter_bytes)}
    if n == 4:
        tuner = Tuner(dist.group.WORLD, 2, CommStats())
        like = torch.zeros(4096)
        out["picked"] = [tuner.pick(op, like) for op in ("all_reduce", "reduce_scatter", "all_gather")]
        out["again"] = tuner.pick("all_reduce", like)
        out["timings"] = {k[0]: v for k, v in tuner.timings.items()}
    return out


@pytest.fixture(scope="module", params=[2, pytest.param(3, marks=pytest.mark.slow), 4, pytest.param(6, marks=pytest.mark.slow),
                                        pytest.param(8, marks=pytest.mark.slow)])
def world(request):
    return request.param, spawn(_run, request.param)


def test_each_algorithm_equals_the_backend(world):
    n, results = world
    for key in (k for k in results[0] if isinstance(k, tuple)):
        for r, res in enumerate(results):
            got = res[key]
            assert got["rs_error"] <= 1e-5 * max(1.0, got["rs_scale"]), (key, r, got)
            assert got["ag_equal"], (key, r)


def test_they_send_the_rings_bytes_and_the_hierarchy_crosses_nodes_once(world):
    n, results = world
    for shard in SHARDS:
        payload = 4 * n * shard
        for name in _variants(n):
            rs = [res[(name, shard)]["bytes"][0] for res in results]
            ag = [res[(name, shard)]["bytes"][1] for res in results]
            assert all(b == round(payload * RING_FACTOR["reduce_scatter"](n)) for b in rs), (name, rs)
            assert all(b == round(4 * shard * RING_FACTOR["all_gather"](n)) for b in ag), (name, ag)
        for ns in NODE_SIZES[n]:  # a node sends (N-1)/N of the buffer across; a flat ring N(n-1)/n of it
            nodes = n // ns
            hier = sum(res[(f"hierarchical-{ns}", shard)]["inter"][0] for res in results)
            assert hier == round(payload * (nodes - 1))
        if n % 2 == 0 and n > 2:  # the flat ring over nodes of 2: the last rank of each node sends every step across
            ring = sum(res[("ring", shard)]["inter"][0] for res in results)
            assert ring == round(n // 2 * payload * RING_FACTOR["reduce_scatter"](n))


def test_auto_agrees_on_every_rank_and_remembers(world):
    n, results = world
    if n != 4:
        pytest.skip("one world suffices")
    picked = [res["picked"] for res in results]
    assert all(p == picked[0] for p in picked)
    assert results[0]["again"] == picked[0][0]
    for op, choice in zip(("all_reduce", "reduce_scatter", "all_gather"), picked[0]):
        timings = results[0]["timings"][op]
        assert set(timings) == set(candidates(op, 4, 2))
        assert choice == min(timings, key=timings.get)
    assert "tree" not in results[0]["timings"]["reduce_scatter"]


def test_candidates():
    assert candidates("all_reduce", 4, 2) == ["backend", "ring", "tree", "hierarchical"]
    assert candidates("reduce_scatter", 4, None) == ["backend", "ring"]
    assert candidates("all_gather", 4, 4) == ["backend", "ring"]
