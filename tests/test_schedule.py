"""Pipeline schedules as data: counts, dependencies, bubble, memory, timeline writers (no processes)."""

import json

import pytest

from paratrain.parallel.pipeline.schedule import (
    Action, bubble_fraction, build_schedule, check_schedule, gpipe, interleaved_1f1b, one_f_one_b,
    peak_in_flight, simulate, stage_of,
)
from paratrain.parallel.pipeline.timeline import chrome_trace, events_from_simulation, plot_timeline

PS = (1, 2, 4)
MS = range(1, 9)
VS = (2, 3)

# (name, p, m, v) for every valid combination
CASES = (
    [(name, p, m, 1) for name in ("gpipe", "1f1b") for p in PS for m in MS if m >= p]
    + [("interleaved", p, m, v) for p in PS for m in MS for v in VS if m >= p and m % p == 0]
)
IDS = [f"{n}-p{p}-m{m}-v{v}" for n, p, m, v in CASES]


@pytest.mark.parametrize("name,p,m,v", CASES, ids=IDS)
def test_counts_each_action_once(name, p, m, v):
    table = build_schedule(name, p, m, v)
    assert len(table) == p
    for actions in table:
        for kind in "FB":
            keys = [(a.mb, a.chunk) for a in actions if a.kind == kind]
            assert len(keys) == m * v
            assert set(keys) == {(mb, c) for mb in range(m) for c in range(v)}
    check_schedule(table, p, m, v)


@pytest.mark.parametrize("name,p,m,v", CASES, ids=IDS)
def test_forward_before_backward_on_every_stage(name, p, m, v):
    for actions in build_schedule(name, p, m, v):
        pos = {(a.kind, a.mb, a.chunk): i for i, a in enumerate(actions)}
        for mb in range(m):
            for c in range(v):
                assert pos[("F", mb, c)] < pos[("B", mb, c)]


@pytest.mark.parametrize("name,p,m,v", CASES, ids=IDS)
def test_simulation_respects_stage_order(name, p, m, v):
    sim = simulate(build_schedule(name, p, m, v), p)
    done = {(a.kind, a.mb, stage_of(a, r, p)): (s, e) for r, steps in enumerate(sim) for a, s, e in steps}
    n_stages = p * v
    assert len(done) == 2 * m * n_stages
    for mb in range(m):
        for s in range(1, n_stages):                   # activations flow forward
            assert done[("F", mb, s)][0] >= done[("F", mb, s - 1)][1]
        assert done[("B", mb, n_stages - 1)][0] >= done[("F", mb, n_stages - 1)][1]
        for s in range(n_stages - 1):                  # gradients flow back from the last stage
            assert done[("B", mb, s)][0] >= done[("B", mb, s + 1)][1]
    for steps in sim:                                  # a rank does one thing at a time, in order
        for (_, _, e0), (_, s1, _) in zip(steps, steps[1:]):
            assert s1 >= e0


@pytest.mark.parametrize("t_b", [1.0, 2.0])
@pytest.mark.parametrize("name,p,m,v", CASES, ids=IDS)
def test_bubble_fraction(name, p, m, v, t_b):
    # Interleaved: each action takes t_f (or t_b) here rather than t_f / v, but the fraction is
    # scale-free. With zero transfer cost, (p-1)/(v*m + p-1) came out exact for every valid
    # (p, m, v) (m % p == 0), also checked by hand for p <= 8, m <= 32, v <= 4 and t_b in
    # {0.5, 1, 2, 3}, so every valid case is tested here; m % p != 0 is rejected, not inexact.
    expected = (p - 1) / (v * m + p - 1)
    assert bubble_fraction(build_schedule(name, p, m, v), p, 1.0, t_b) == pytest.approx(expected)


@pytest.mark.parametrize("p,m", [(p, m) for p in PS if p > 1 for m in MS if m >= p and m % p == 0])
def test_interleaved_bubble_shrinks_by_v(p, m):
    base = bubble_fraction(one_f_one_b(p, m), p)
    for v in VS:
        inter = bubble_fraction(interleaved_1f1b(p, m, v), p)
        assert inter < base
        # bubble time over compute time drops exactly by v
        assert inter / (1 - inter) == pytest.approx(base / (1 - base) / v)


@pytest.mark.parametrize("p,m", [(p, m) for p in PS for m in MS])
def test_peak_in_flight(p, m):
    for rank, (f1b, gp) in enumerate(zip(one_f_one_b(p, m), gpipe(p, m))):
        assert peak_in_flight(f1b) == min(p - rank, m) <= p
        assert peak_in_flight(gp) == m


def test_interleaved_with_one_chunk_is_1f1b():
    for p in PS:
        for m in range(p, 9, p):
            assert interleaved_1f1b(p, m, 1) == one_f_one_b(p, m)


def test_interleaved_order_matches_megatron():
    # p=2, m=4, v=2, rank 0: (p-1)*2 + (v-1)*p = 4 warm-up forwards, then 1F1B, then 4 backwards
    got = [str(a) for a in interleaved_1f1b(2, 4, 2)[0]]
    assert got == ["F0", "F1", "F0.1", "F1.1", "F2", "B0.1", "F3", "B1.1", "F2.1", "B0",
                   "F3.1", "B1", "B2.1", "B3.1", "B2", "B3"]


def test_action_str_and_stage():
    assert str(Action("F", 3, 0)) == "F3"
    assert str(Action("B", 3, 1)) == "B3.1"
    assert stage_of(Action("F", 0, 2), rank=1, p=4) == 9


@pytest.mark.parametrize("args", [("gpipe", 4, 3), ("1f1b", 2, 1), ("zero-bubble", 2, 4),
                                  ("interleaved", 4, 6, 2), ("interleaved", 2, 3, 3)])
def test_build_schedule_rejects(args):
    with pytest.raises(ValueError):
        build_schedule(*args)


def test_unknown_name_message():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'nope'"):
        build_schedule("nope", 2, 4)


def test_check_schedule_catches_broken_tables():
    table = one_f_one_b(2, 4)
    check_schedule(table, 2, 4, 1)
    with pytest.raises(ValueError, match="before its forward"):
        check_schedule([table[0], [Action("B", 0, 0)] + [a for a in table[1] if a != Action("B", 0, 0)]], 2, 4, 1)
    with pytest.raises(ValueError):
        check_schedule([table[0], table[1][:-1]], 2, 4, 1)            # missing backward
    with pytest.raises(ValueError):
        check_schedule([table[0], table[1] + [Action("F", 0, 0)]], 2, 4, 1)   # duplicate
    # rank 0 wants B0 before rank 1 does it, rank 1 waits for F1 first: cross-rank deadlock
    deadlock = [[Action("F", 0, 0), Action("B", 0, 0), Action("F", 1, 0), Action("B", 1, 0)],
                [Action("F", 1, 0), Action("B", 1, 0), Action("F", 0, 0), Action("B", 0, 0)]]
    with pytest.raises(ValueError, match="deadlock"):
        simulate(deadlock, 2)
    with pytest.raises(ValueError, match="deadlock"):
        check_schedule(deadlock, 2, 2, 1)


def test_chrome_trace(tmp_path):
    events = events_from_simulation(simulate(interleaved_1f1b(2, 4, 2), 2))
    events.append({"rank": 1, "name": "recv act 3", "kind": "recv", "start": 0.5, "end": 1.0})
    path = tmp_path / "trace.json"
    chrome_trace(events, str(path))
    trace = json.loads(path.read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == len(events) == 2 * 2 * 4 * 2 + 1
    for e in xs:
        assert {"name", "ph", "ts", "dur", "pid", "tid"} <= e.keys()
        assert e["pid"] == 0 and e["tid"] in (0, 1) and e["dur"] >= 0
    first = next(e for e in xs if e["tid"] == 0 and e["name"] == "F1")
    assert first["ts"] == pytest.approx(1e6) and first["dur"] == pytest.approx(1e6)   # 1 s = 1e6 us
    names = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {0: "rank 0", 1: "rank 1"}


def test_plot_timeline(tmp_path):
    events = events_from_simulation(simulate(one_f_one_b(4, 8), 4))
    events.append({"rank": 2, "name": "send act 1", "kind": "send", "start": 3.0, "end": 3.2})
    path = tmp_path / "timeline.png"
    plot_timeline(events, str(path), title="1F1B p=4 m=8")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
