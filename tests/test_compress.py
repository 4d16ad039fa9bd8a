"""Gradient compression: each compressor's sum, the bytes it sends, and error feedback; then
training `tiny` end to end with each `--compress` mode.

Unit rounds run on 2 gloo ranks that reduce known tensors (every rank can recompute every other
rank's inputs, so the exact sum is known). The end-to-end runs train through the Trainer's steps
in one pair of spawned ranks (the launcher costs ~15 s a run on 2 cores) and read each step's
metrics record.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from helpers import spawn
from paratrain.comm import CommStats
from paratrain.comm.compress import CastCompression, NoCompression, PowerSGD, TopK, parse_compress

WORLD = 2
SHAPES = [(32, 24), (24,), (16, 8, 3), (5,)]


def local_grads(rank: int, round_: int, shapes=SHAPES, signal: float = 0.0) -> list[torch.Tensor]:
    """Rank `rank`'s gradients in round `round_`: a fixed per-rank mean `signal` plus noise."""
    base = torch.Generator().manual_seed(1000 + rank)
    noise = torch.Generator().manual_seed(100 * rank + round_)
    return [signal * torch.randn(s, generator=base) + torch.randn(s, generator=noise) for s in shapes]


def true_sum(round_: int, shapes=SHAPES, signal: float = 0.0) -> list[torch.Tensor]:
    per_rank = [local_grads(r, round_, shapes, signal) for r in range(WORLD)]
    return [sum(ts) for ts in zip(*per_rank)]


def _rounds(make, rounds: int, shapes, signal: float):
    """In a spawned rank: reduce `rounds` rounds; return the outputs, bytes per round and the
    compressor's error feedback at the end (flattened per key, or None)."""
    rank, group = dist.get_rank(), dist.group.WORLD
    compressor = make()
    stats = CommStats()
    outs, sent = [], []
    for t in range(rounds):
        grads = local_grads(rank, t, shapes, signal)
        stats.reset()
        compressor.reduce("bucket", grads, group, stats)
        outs.append([g.clone() for g in grads])
        sent.append(stats.bytes)
    state = compressor.state.get("bucket")
    if isinstance(compressor, TopK):
        error = state
    elif isinstance(compressor, PowerSGD):
        error = {i: e for (kind, i), e in state.items() if kind == "error" and e is not None}
    else:
        error = None
    return outs, sent, error, compressor.sent_bytes([torch.Size(s) for s in shapes], WORLD)


CASES = {
    "none": (NoCompression, 1, SHAPES, 0.0),
    "fp16": (lambda: CastCompression(torch.float16), 1, SHAPES, 0.0),
    "bf16": (lambda: CastCompression(torch.bfloat16), 1, SHAPES, 0.0),
    "topk-1.0": (lambda: TopK(1.0), 3, SHAPES, 0.0),
    "topk-0.1": (lambda: TopK(0.1), 1, SHAPES, 0.0),
    "topk-feedback": (lambda: TopK(0.2), 60, SHAPES, 1.0),
    "powersgd-full-fallback": (lambda: PowerSGD(8), 2, [(6, 4), (3, 2, 4), (7,)], 0.0),
    "powersgd-full-factored": (lambda: PowerSGD(8, min_ratio=0.0), 3, [(6, 4), (3, 2, 4), (7,)], 0.0),
    "powersgd-2": (lambda: PowerSGD(2), 1, SHAPES, 0.0),
    "powersgd-feedback": (lambda: PowerSGD(2), 60, SHAPES, 1.0),
}


def _all_cases():
    return {name: _rounds(make, rounds, shapes, signal) for name, (make, rounds, shapes, signal) in CASES.items()}


@pytest.fixture(scope="module")
def unit():
    """Every case, run once on 2 ranks (one spawn: process start-up dominates)."""
    per_rank = spawn(_all_cases, WORLD)
    return per_rank


def expected(name: str, round_: int) -> list[torch.Tensor]:
    _, _, shapes, signal = CASES[name]
    return true_sum(round_, shapes, signal)


def numel(shapes) -> int:
    return sum(math.prod(s) for s in shapes)


def test_ranks_agree(unit):
    for name in CASES:
        for a, b in zip(unit[0][name][0], unit[1][name][0]):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_no_compression_is_exact_and_sends_one_all_reduce(unit):
    outs, sent, _, formula = unit[0]["none"]
    for got, want in zip(outs[0], expected("none", 0)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert sent == [4 * numel(SHAPES) * 2 * (WORLD - 1) // WORLD] == [formula]


@pytest.mark.parametrize("name,eps", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_cast_within_its_rounding_and_half_the_bytes(unit, name, eps):
    """Each input and the sum are rounded once: within 3 roundings of the largest input (~4)."""
    outs, sent, _, formula = unit[0][name]
    for got, want in zip(outs[0], expected(name, 0)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=2 * eps, atol=3 * eps * 5)
    assert sent == [unit[0]["none"][1][0] // 2] == [formula]


def test_topk_ratio_one_is_exact(unit):
    outs, _, error, _ = unit[0]["topk-1.0"]
    for t in range(3):
        for got, want in zip(outs[t], expected("topk-1.0", t)):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert error.abs().max() == 0


def test_topk_sends_k_values_and_indices(unit):
    outs, sent, _, formula = unit[0]["topk-0.1"]
    k = math.ceil(0.1 * numel(SHAPES))
    assert sent == [(WORLD - 1) * k * (4 + 4)] == [formula]  # fp32 values + int32 indices, all-gathered
    nonzero = sum(int((g != 0).sum()) for g in outs[0])
    assert k <= nonzero <= WORLD * k


def test_topk_error_feedback_cumulative_sum_converges(unit):
    """Error feedback: what was not sent yet is exactly the ranks' errors, which stay bounded, so
    the cumulative sum of sent values approaches the cumulative true sum."""
    name = "topk-feedback"
    outs = unit[0][name][0]
    cum_sent = torch.cat([g.flatten() for g in outs[0]]) * 0
    cum_true = cum_sent.clone()
    rel = []
    for t in range(len(outs)):
        cum_sent += torch.cat([g.flatten() for g in outs[t]])
        cum_true += torch.cat([g.flatten() for g in expected(name, t)])
        rel.append(float((cum_true - cum_sent).norm() / cum_true.norm()))
    errors = unit[0][name][2] + unit[1][name][2]
    torch.testing.assert_close(cum_true - cum_sent, errors, rtol=1e-4, atol=1e-4)
    assert rel[-1] < 0.05 and rel[-1] < rel[0] / 5, rel[::10]


@pytest.mark.parametrize("name", ["powersgd-full-fallback", "powersgd-full-factored"])
def test_powersgd_full_rank_is_exact(unit, name):
    """rank >= min(n, m): by default such matrices go uncompressed; forced through the factors
    (min_ratio=0) P spans the whole column space and P P^T M = M."""
    outs, sent, _, formula = unit[0][name]
    for t in range(len(outs)):
        for got, want in zip(outs[t], expected(name, t)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert sent == [formula] * len(outs)
    shapes = CASES[name][2]
    if name.endswith("fallback"):
        assert formula == 4 * numel(shapes)
    else:  # P (n x r) and Q (m x r) with r = min(n, m), plus the vector
        assert formula == 4 * (4 * (6 + 4) + 3 * (3 + 8) + 7)


def test_powersgd_low_rank_sends_the_formula_bytes(unit):
    """Rank 2: r(n + m) floats per matrix in two all-reduces (ring factor 1 at 2 ranks), vectors
    uncompressed; the result of each matrix has rank 2."""
    outs, sent, _, formula = unit[0]["powersgd-2"]
    floats = 2 * (32 + 24) + 2 * (16 + 24) + 24 + 5
    assert sent == [4 * floats * 2 * (WORLD - 1) // WORLD] == [formula]
    assert torch.linalg.matrix_rank(outs[0][0]) == 2 and torch.linalg.matrix_rank(outs[0][2].reshape(16, -1)) == 2
    want = expected("powersgd-2", 0)
    torch.testing.assert_close(outs[0][1], want[1], rtol=0, atol=1e-5)  # vectors are exact


def test_powersgd_error_feedback_cumulative_sum_converges(unit):
    """As for top-k: the not-yet-sent part is the sum of the ranks' errors, which stays bounded
    while the signal adds up (a full-rank signal that rank 2 cannot carry in one round)."""
    name = "powersgd-feedback"
    outs = unit[0][name][0]
    for i in (0, 2):  # the matrices
        cum_sent, cum_true, rel = torch.zeros(SHAPES[i]), torch.zeros(SHAPES[i]), []
        for t in range(len(outs)):
            cum_sent += outs[t][i]
            cum_true += expected(name, t)[i]
            rel.append(float((cum_true - cum_sent).norm() / cum_true.norm()))
        errors = (unit[0][name][2][i] + unit[1][name][2][i]).view(SHAPES[i])
        torch.testing.assert_close(cum_true - cum_sent, errors, rtol=1e-3, atol=1e-3)
        assert rel[-1] < 0.15 and rel[-1] < rel[19] / 2 < rel[0] / 2, rel[::10]


def test_parse_compress():
    assert parse_compress("none") is None
    assert isinstance(parse_compress("fp16"), CastCompression) and parse_compress("bf16").dtype == torch.bfloat16
    assert parse_compress("topk:0.01").ratio == 0.01 and parse_compress("powersgd:4").rank == 4
    for bad in ("zip", "topk:0", "topk:1.5", "topk:", "powersgd:x", "powersgd:0", "powersgd:1.5", "fp8"):
        with pytest.raises(ValueError, match="topk:RATIO"):
            parse_compress(bad)


# ---------------------------------------------------------------- end to end, through the Trainer
E2E = {  # name: (settings, compress)
    "none": (dict(), "none"),
    "fp16": (dict(), "fp16"),
    "topk": (dict(), "topk:0.1"),
    "powersgd": (dict(), "powersgd:2"),
    "powersgd-accum2": (dict(microbatches=2), "powersgd:2"),
    "zero1-none": (dict(zero=1), "none"),
    "zero1-fp16": (dict(zero=1), "fp16"),
    "zero2-powersgd": (dict(zero=2), "powersgd:2"),
    "zero3-topk": (dict(zero=3), "topk:0.1"),
    "topk-warmup": (dict(compress_warmup=5), "topk:0.1"),
    "powersgd-warmup": (dict(compress_warmup=5), "powersgd:2"),
}


def _train_all() -> dict:
    from paratrain.config import RunConfig, validate
    from paratrain.mesh import Mesh
    from paratrain.train import Trainer

    mesh = Mesh.build(dp=WORLD)
    out = {}
    for name, (settings, compress) in E2E.items():
        cfg = RunConfig()
        cfg.model.name = "tiny"
        cfg.layout.dp = WORLD
        tr = cfg.train
        tr.compress_warmup = 0  # compressed from the first step, but in the warm-up cases
        for k, v in settings.items():
            setattr(tr if hasattr(tr, k) else cfg.layout, k, v)
        tr.steps, tr.global_batch, tr.seq_len, tr.seed, tr.lr, tr.warmup_steps = 10, 16, 32, 5, 3e-3, 2
        tr.progress, tr.eval_batches, tr.compress = False, 1, compress
        validate(cfg)
        trainer = Trainer.from_config(cfg, mesh)  # the steps of fit(), without its evaluation and sample
        out[name] = [trainer.run_step(k).as_metrics() for k in range(1, tr.steps + 1)]  # the metrics-file records
    return out


@pytest.fixture(scope="module")
def e2e():
    steps = spawn(_train_all, WORLD)[0]
    losses = {name: [s["loss"] for s in records] for name, records in steps.items()}
    return losses, steps


def tiny_shapes() -> list[torch.Size]:
    from paratrain.models.gpt import build_model

    return [p.shape for p in build_model("tiny", 5).parameters()]


@pytest.mark.parametrize("name", list(E2E))
def test_training_learns(e2e, name):
    losses, _ = e2e
    assert len(losses[name]) == 10 and losses[name][-1] < losses[name][0] - 0.3, losses[name]
    # 10 steps stay near the uncompressed run (ZeRO's top-k selects per flat group, not over the
    # whole model as one bucket does, and lags most: 7% here)
    ref = losses["zero1-none" if name.startswith("zero") else "none"]
    assert abs(losses[name][-1] - ref[-1]) / ref[-1] < 0.1


@pytest.mark.parametrize("name,compressor", [("fp16", CastCompression(torch.float16)), ("topk", TopK(0.1)),
                                             ("powersgd", PowerSGD(2))], ids=["fp16", "topk", "powersgd"])
def test_comm_bytes_fall_by_the_expected_factor(e2e, name, compressor):
    """Data parallelism without ZeRO sends nothing but the gradients (one bucket for `tiny`), so
    the metrics' comm_bytes equal the formulas exactly, summed over the ranks."""
    _, steps = e2e
    shapes = tiny_shapes()
    dense = [s["comm_bytes"] for s in steps["none"]]
    got = [s["comm_bytes"] for s in steps[name]]
    assert dense == [WORLD * NoCompression().sent_bytes(shapes, WORLD)] * 10
    assert got == [WORLD * compressor.sent_bytes(shapes, WORLD)] * 10
    # by hand: fp16 halves; top-k sends k values + k indices from each rank; PowerSGD rank 2
    # sends 2(n + m) floats per n x m matrix (all of tiny's qualify) and the vectors whole
    powersgd_floats = sum(2 * (s[0] + math.prod(s[1:])) if len(s) >= 2 else s[0] for s in shapes)
    factor = {"fp16": 2.0, "topk": numel(shapes) / (WORLD * math.ceil(0.1 * numel(shapes))),
              "powersgd": numel(shapes) / powersgd_floats}[name]
    assert dense[0] / got[0] == pytest.approx(factor, rel=1e-6)


def test_warmup_ramps_compression_in(e2e):
    """--compress-warmup 5: top-k sends a density of 0.1^(t/5) at step t (all of it at first,
    geometrically less, then 0.1 from step 5); PowerSGD all-reduces uncompressed in steps 1-4."""
    _, steps = e2e
    shapes = tiny_shapes()
    n = numel(shapes)
    got = [s["comm_bytes"] for s in steps["topk-warmup"]]
    dense = WORLD * NoCompression().sent_bytes(shapes, WORLD)
    topk = [WORLD * 2 * (WORLD - 1) * 4 * math.ceil(0.1 ** (min(t, 5) / 5) * n) for t in range(1, 11)]
    assert got == topk  # each rank's k values and k int32 indices reach the other rank
    assert got[0] > got[1] > got[2] > got[3] > got[4] == got[9] == steps["topk"][0]["comm_bytes"]
    psgd = [s["comm_bytes"] for s in steps["powersgd-warmup"]]
    assert psgd[:4] == [dense] * 4 and psgd[4:] == [s["comm_bytes"] for s in steps["powersgd"]][4:]


def test_warmup_schedule():
    t = TopK(0.01, warmup=10)
    assert t.density() == 0.01  # never told the step: compressed from the first call
    t.begin_step(1)
    assert t.density() == pytest.approx(0.01 ** 0.1)
    t.begin_step()
    assert t.step == 2 and t.density() == pytest.approx(0.01 ** 0.2)
    t.begin_step(10)
    assert t.density() == 0.01 and not t.warming_up()
    p = PowerSGD(4, warmup=3)
    assert [(p.begin_step(s), p.warming_up())[1] for s in (1, 2, 3, 4)] == [True, True, False, False]
    assert parse_compress("topk:0.1", warmup=7).warmup == 7


def test_compressed_accumulation_sends_once_per_step(e2e):
    """Under gradient accumulation (no_sync) the compressor runs once, after the last micro-batch,
    on the accumulated gradient: the same bytes and nearly the same losses as one micro-batch."""
    losses, steps = e2e
    assert [s["comm_bytes"] for s in steps["powersgd-accum2"]] == [s["comm_bytes"] for s in steps["powersgd"]]
    torch.testing.assert_close(torch.tensor(losses["powersgd-accum2"]), torch.tensor(losses["powersgd"]),
                               rtol=1e-3, atol=0)


def test_zero_compression_sends_less(e2e):
    """ZeRO-1 with fp16: the gradient reduce-scatter is half as large; the parameter all-gather
    and the norm's all-reduce are unchanged."""
    _, steps = e2e
    shapes = tiny_shapes()
    grads_rs = WORLD * 4 * numel(shapes) * (WORLD - 1) / WORLD  # fp32 reduce-scatter, padding aside
    none = steps["zero1-none"][0]["comm_bytes"]
    fp16 = steps["zero1-fp16"][0]["comm_bytes"]
    assert none - fp16 == pytest.approx(grads_rs / 2, rel=1e-3)
    # ZeRO-2 sends what ZeRO-1 does (one micro-batch); PowerSGD replaces the reduce-scatter
    assert steps["zero2-powersgd"][0]["comm_bytes"] < none - grads_rs / 2


# ---------------------------------------------------------------- tensor parallel replicas
def _tp_replicas() -> dict:
    """dp=2 x tp=2: train a few steps per mode; return this rank's replicated parameters."""
    from paratrain.config import RunConfig, validate
    from paratrain.mesh import Mesh
    from paratrain.parallel.roles import role_of
    from paratrain.train import Trainer

    mesh = Mesh.build(dp=2, tp=2)
    out = {"dp": mesh.coord("dp"), "tp": mesh.coord("tp")}
    for zero, compress in ((0, "topk:0.05"), (0, "powersgd:2"), (1, "topk:0.05")):
        cfg = RunConfig()
        cfg.model.name = "tiny"
        cfg.layout.dp, cfg.layout.tp, cfg.layout.zero = 2, 2, zero
        tr = cfg.train
        tr.steps, tr.global_batch, tr.seq_len, tr.seed, tr.progress, tr.eval_batches = 2, 8, 32, 5, False, 1
        tr.compress, tr.compress_warmup = compress, 0
        validate(cfg)
        trainer = Trainer.from_config(cfg, mesh)
        for step in range(1, tr.steps + 1):
            trainer.run_step(step)
        out[(zero, compress)] = {n: p.detach().clone() for n, p in trainer.model.module.named_parameters()
                                 if not role_of(p).tp_sharded}
    return out


def test_replicated_parameters_stay_identical_across_tp_ranks():
    """Under tp each tp rank compresses its own dp group's gradients; a replicated parameter
    (norms, position embedding) must still take the same step on every tp rank."""
    ranks = spawn(_tp_replicas, 4)
    for mode in [k for k in ranks[0] if isinstance(k, tuple)]:
        for dp in (0, 1):
            a, b = [r[mode] for r in ranks if r["dp"] == dp]
            assert a.keys() == b.keys() and len(a) > 0
            for name in a:
                torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{mode} {name}")
