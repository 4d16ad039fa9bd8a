"""Load balancing (paratrain/balance.py): with `--balance dynamic` and one rank slowed 2x
(`--simulate-slowdown`, proportional to its work), the shares of the global batch move to the
fast replicas while the losses stay those of one process, under plain dp (2 and 4 ranks), ZeRO-3,
dp x pp, and a CNN with BatchNorm of the user's through the Python API; shares survive a resume.
The controller alone: it converges on the speed ratio, holds still under noise and with equal
speeds, moves a bounded amount per step, keeps each replica's least, and predicts through a
fixed cost per pass."""

from __future__ import annotations

import json
import random

import pytest

from helpers import refused, run_tiny, spawn
from paratrain.balance import Balancer, parse_slowdown, slowed
from paratrain.layout import LayoutConfig

STEPS = 8


def _records(path) -> list[dict]:
    return [r for r in map(json.loads, open(path)) if "shares" in r]


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return run_tiny(steps=STEPS, global_batch=16)["losses"]


CASES = {
    "dp2": dict(dp=2, microbatches=4),
    "dp2-zero3": dict(dp=2, zero=3, microbatches=2),
    "dp2-pp2": dict(dp=2, pp=2, microbatches=4),
}


SLOW_CASES = {
    "dp4": dict(dp=4, microbatches=2),
    "dp2-zero1": dict(dp=2, zero=1, microbatches=4),
    "dp2-zero2": dict(dp=2, zero=2, microbatches=2),
    "dp2-tp2": dict(dp=2, tp=2, microbatches=4),
    "dp2-pp2-interleaved": dict(dp=2, pp=2, schedule="interleaved", microbatches=4),
}
CASES.update(SLOW_CASES)


@pytest.mark.parametrize("case", [c if c not in SLOW_CASES else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_dynamic_shares_move_to_fast_ranks_with_the_losses_of_one_process(tmp_path, reference, case):
    metrics = tmp_path / "m.jsonl"
    result = run_tiny(steps=STEPS, global_batch=16, balance="dynamic", simulate_slowdown="1:2",
                      metrics=str(metrics), **CASES[case])
    assert result["losses"] == pytest.approx(reference, rel=1e-5)
    records = _records(metrics)
    dp = CASES[case]["dp"]
    assert records[0]["shares"] == [16 // dp] * dp  # even until it measured
    final = records[-1]["shares"]
    assert sum(final) == 16 and final != records[0]["shares"]
    assert 1 in result["balance"]["slow_ranks"]  # the slowed rank is named (4 ranks on 2 cores: maybe others too)
    # rank 1 is in replica 1 under plain dp and ZeRO, in replica 0 under tp (ranks 0, 1 hold one replica)
    replica = 0 if "tp2" in case or ("pp2" in case and final[0] < final[1]) else 1
    assert final[replica] < 16 // dp
    assert result["balance"]["mode"] == "dynamic" and result["balance"]["moves"] >= 1


def test_even_is_the_default_and_measures_without_moving(tmp_path):
    metrics = tmp_path / "m.jsonl"
    result = run_tiny(steps=6, global_batch=16, dp=2, microbatches=4, simulate_slowdown="1:3", metrics=str(metrics))
    assert {tuple(r["shares"]) for r in _records(metrics)} == {(8, 8)}
    rep = result["balance"]
    assert rep["mode"] == "even" and rep["moves"] == 0 and rep["slow_ranks"] == [1]
    assert rep["seq_per_s"][1] < rep["seq_per_s"][0]


def test_shares_survive_a_restart_from_the_checkpoint(tmp_path, reference):
    metrics = tmp_path / "m.jsonl"
    result = run_tiny(steps=STEPS, global_batch=16, dp=2, microbatches=4, balance="dynamic", simulate_slowdown="1:2",
                      metrics=str(metrics), simulate_failure="0:7", max_restarts=1,
                      checkpoint={"dir": str(tmp_path / "ck"), "every": 5})
    records = _records(metrics)  # the restart's steps 6.. replace the first attempt's
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert any(r.get("event") == "restart" for r in map(json.loads, open(metrics)))
    assert result["losses"] == pytest.approx(reference[5:], rel=1e-5)
    saved, again = records[4]["shares"], records[5]["shares"]
    assert saved != [8, 8] and again in (saved, [saved[0] + 2, saved[1] - 2])  # from where it was, not even


# ---------------------------------------------------------------- a user's CNN with BatchNorm
def _cnn(slowdown: str | None) -> list[float]:
    import functools
    import sys

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "examples"))
    import digits_cnn

    import paratrain

    mesh = paratrain.init()
    train, _ = digits_cnn.digits()
    data = paratrain.data.DatasetLoader(train, 32, seed=0)
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    kw = dict(balance="dynamic", simulate_slowdown=slowdown, microbatches=4) if slowdown else dict(microbatches=8)
    trainer = paratrain.Trainer(digits_cnn.build(), mesh, F.cross_entropy, data=data, optimizer=sgd, grad_clip=0.0,
                                steps=6, progress=False, **kw)
    out = trainer.fit()
    return out["losses"], out.get("balance", {}).get("shares")


def test_a_batchnorm_cnn_keeps_its_micro_batches_and_the_losses_of_one_process():
    pytest.importorskip("sklearn")
    (one, _), = spawn(_cnn, 1, None)
    for losses, shares in spawn(_cnn, 2, "1:3"):
        assert losses == pytest.approx(one, rel=1e-5)  # BatchNorm sees the same micro-batches of 4
        assert shares[1] < shares[0] and sum(shares) == 32


# ---------------------------------------------------------------- the controller
def _balancer(dp=2, batch=24, mb=6, **kw) -> Balancer:
    return Balancer(dp, batch, LayoutConfig(dp=dp, microbatches=mb, **kw))


def _drive(b: Balancer, per_unit: list[float], steps: int, noise: float = 0.0, fixed: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    history = []
    for _ in range(steps):
        seconds = [fixed + n * t * (1 + rng.uniform(-noise, noise)) for n, t in zip(b.shares, per_unit)]
        b.observe(seconds)
        history.append(list(b.shares))
    return history


def test_controller_converges_on_the_speed_ratio_in_bounded_moves():
    b = _balancer(dp=2, batch=24, mb=6)  # 12 units of 2 rows, at most 1 moved per step
    history = _drive(b, [1.0, 2.0], 12, noise=0.02)
    assert history[-1] == [8, 4]  # 2:1
    assert all(abs(x[0] - y[0]) <= 1 for x, y in zip([[6, 6]] + history, history))
    b4 = _balancer(dp=4, batch=32, mb=4)
    assert _drive(b4, [1.0, 1.0, 1.0, 3.0], 20)[-1] == [5, 5, 5, 1]  # times 5, 5, 5 and 3


def test_controller_holds_still_with_equal_speeds_under_noise():
    for seed in range(5):
        b = _balancer(dp=4, batch=64, mb=4, zero=2)  # finest grain: one sequence
        history = _drive(b, [1.0] * 4, 60, noise=0.05, seed=seed)
        assert history[-1] == [16] * 4 and b.moves == 0


def test_controller_keeps_the_least_and_fixed_passes():
    b = _balancer(dp=2, batch=16, mb=4, zero=3)  # ZeRO-3: 4 passes each, a unit is a sequence
    _drive(b, [1.0, 50.0], 30)
    assert b.shares == [12, 4] and b.pass_sizes(1) == [1, 1, 1, 1] and b.pass_sizes(0) == [3, 3, 3, 3]
    pipe = _balancer(dp=2, batch=32, mb=4, pp=2, schedule="interleaved")  # multiples of pp, at least pp
    _drive(pipe, [1.0, 50.0], 30)
    assert pipe.shares == [6, 2] and pipe.rows(1) == (24, 8)


def test_controller_predicts_through_a_fixed_cost_per_pass():
    b = _balancer(dp=2, batch=24, mb=6)
    _drive(b, [1.0, 1.0], 3, fixed=4.0)  # equal speeds, a large fixed cost: nothing to gain
    assert b.shares == [6, 6]
    b = _balancer(dp=2, batch=24, mb=6)
    _drive(b, [1.0, 2.0], 30, fixed=3.0)  # times 3 + n and 3 + 2n: best at 8 / 4 (11 and 11)
    assert b.shares == [8, 4]


def test_state_round_trip_and_a_new_world_starts_even():
    b = _balancer()
    _drive(b, [1.0, 2.0], 10)
    c = _balancer()
    c.load_state_dict(b.state_dict())
    assert c.shares == b.shares and c.seconds == b.seconds
    wider = _balancer(dp=3)
    wider.load_state_dict(b.state_dict())
    assert wider.shares == [8, 8, 8]  # 24 units of one row: even


def test_slowdown_sleeps_its_factor_of_the_work_less_the_waits(monkeypatch):
    import paratrain.balance as balance

    clock, slept = iter([10.0, 13.0]), []
    monkeypatch.setattr(balance.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(balance.time, "sleep", slept.append)

    class Flight:
        blocked_s = 5.0

    flight = Flight()
    with slowed(2.5, flight):
        flight.blocked_s += 1.0  # one of the three seconds was a wait in a collective
    assert slept == [pytest.approx(1.5 * 2.0)]
    assert parse_slowdown("3:2") == (3, 2.0) and parse_slowdown(None) is None


@pytest.mark.parametrize("args,message", [
    (["--balance", "fast"], "--balance: must be even or dynamic, got 'fast'"),
    (["--dp", "2", "--balance", "dynamic"], "--balance dynamic: each replica holds 1 micro-batch"),
    (["--dp", "2", "--sync", "ps", "--servers", "1", "--balance", "dynamic", "--microbatches", "2"],
     "--balance dynamic: parameter-server workers do not wait for each other"),
    (["--dp", "2", "--pp", "2", "--zero", "2", "--microbatches", "4", "--balance", "dynamic"],
     "--balance dynamic: ZeRO-2/3 inside a pipeline"),
    (["--dp", "2", "--simulate-slowdown", "2:2"], "--simulate-slowdown: rank 2 is not a worker of 2"),
    (["--dp", "2", "--simulate-slowdown", "1:0.5"], "--simulate-slowdown: expected RANK:FACTOR"),
])
def test_bad_balance_flags_are_one_line_and_exit_2(capsys, args, message):
    code, err = refused(capsys, "train", "--model", "tiny", "--device", "cpu", "--global-batch", "16", *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
