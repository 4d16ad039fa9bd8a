"""BatchNorm under data parallelism: the same math as torch, on CPU over gloo.

- `SyncBatchNorm` at dp=2 (halves, and unequal parts, of a batch) equals nn.BatchNorm on the
  whole batch in one process: outputs, input / weight / bias gradients, running statistics;
  eval mode does not communicate.
- A small CNN with BatchNorm trained under paratrain's `DataParallel` and `ZeroDataParallel`
  keeps the losses, parameters and every buffer of torch's `DistributedDataParallel` on every
  rank (buffers broadcast from dp rank 0 before each forward, DDP's rule, through gradient
  accumulation and an eval forward); with `broadcast_buffers=False` the buffers drift apart.
- `convert_sync_batchnorm` inside `DataParallel` trains as one process with plain BatchNorm on
  the whole batch.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import spawn
from paratrain.mesh import Mesh
from paratrain.parallel.batchnorm import SyncBatchNorm, convert_sync_batchnorm

# (input shape of the whole batch, momentum, rows of each rank)
BN_CASES = {
    "2d-halves": ((8, 3, 5, 5), 0.1, (4, 4)),
    "2d-unequal": ((8, 3, 5, 5), 0.1, (3, 5)),
    "1d-cumulative": ((10, 4), None, (6, 4)),
    "1d-sequence": ((6, 4, 7), 0.3, (2, 4)),
    "3d": ((4, 2, 3, 3, 3), 0.1, (2, 2)),
}
BN_STEPS = 3
REFERENCE_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def bn_data(case: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of a step and the gradient flowing into the layer's output."""
    shape = BN_CASES[case][0]
    g = torch.Generator().manual_seed(1000 * step + len(case))
    return torch.randn(shape, generator=g) * 2 + 0.5, torch.randn(shape, generator=g)


def init_affine(bn: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=g))


def bn_steps(bn: nn.Module, case: str, lo: int, hi: int, comm=None) -> dict:
    """BN_STEPS training steps on rows [lo, hi) of each batch, then one eval forward."""
    outs, grads = [], []
    for step in range(BN_STEPS):
        x_all, dy_all = bn_data(case, step)
        x = x_all[lo:hi].clone().requires_grad_()
        y = bn(x)
        (y * dy_all[lo:hi]).sum().backward()
        outs.append(y.detach())
        grads.append((x.grad, bn.weight.grad.clone(), bn.bias.grad.clone()))
        bn.weight.grad = bn.bias.grad = None
    calls = sum(comm.calls.values()) if comm is not None else 0
    bn.eval()
    with torch.no_grad():
        eval_out = bn(bn_data(case, BN_STEPS)[0][lo:hi])
    bn.train()
    return {"outs": outs, "grads": grads, "eval": eval_out, "buffers": {k: v.clone() for k, v in bn.named_buffers()},
            "train_calls": calls, "eval_calls": (sum(comm.calls.values()) - calls) if comm is not None else 0}


def _sync_bn_ranks() -> dict:
    mesh = Mesh.build(dp=2)
    r = mesh.coord("dp")
    results = {}
    for case, (shape, momentum, rows) in BN_CASES.items():
        bn = SyncBatchNorm(shape[1], mesh, momentum=momentum)
        init_affine(bn)
        mesh.comm.reset()
        results[case] = bn_steps(bn, case, sum(rows[:r]), sum(rows[: r + 1]), mesh.comm)
    return results


@pytest.fixture(scope="module")
def sync_bn_ranks():
    return spawn(_sync_bn_ranks, 2)


@pytest.mark.parametrize("case", list(BN_CASES))
def test_sync_batchnorm_equals_batchnorm_on_the_whole_batch(sync_bn_ranks, case):
    """Outputs and input gradients are the whole batch's, cut by rows; weight and bias
    gradients are per-rank partial sums over the rank's rows, so their sum over ranks is the
    whole batch's (DDP sums them; averaging instead matches a loss averaged per rank)."""
    shape, momentum, _ = BN_CASES[case]
    ref_bn = REFERENCE_BN[len(shape)](shape[1], momentum=momentum)
    init_affine(ref_bn)
    ref = bn_steps(ref_bn, case, 0, shape[0])
    close = dict(rtol=1e-5, atol=1e-6)
    for step in range(BN_STEPS):
        torch.testing.assert_close(torch.cat([rk[case]["outs"][step] for rk in sync_bn_ranks]), ref["outs"][step],
                                   **close)
        torch.testing.assert_close(torch.cat([rk[case]["grads"][step][0] for rk in sync_bn_ranks]),
                                   ref["grads"][step][0], **close)
        for i in (1, 2):  # weight, bias
            torch.testing.assert_close(sum(rk[case]["grads"][step][i] for rk in sync_bn_ranks), ref["grads"][step][i],
                                       **close)
    torch.testing.assert_close(torch.cat([rk[case]["eval"] for rk in sync_bn_ranks]), ref["eval"], **close)
    for rk in sync_bn_ranks:
        assert rk[case]["buffers"]["num_batches_tracked"].item() == BN_STEPS
        for name in ("running_mean", "running_var"):
            torch.testing.assert_close(rk[case]["buffers"][name], ref["buffers"][name], rtol=1e-5, atol=1e-7)
        assert rk[case]["train_calls"] == 2 * BN_STEPS  # one all-reduce forward, one backward
        assert rk[case]["eval_calls"] == 0


# ---------------------------------------------------------------- a CNN against torch's DDP
BATCH, STEPS_MICRO = 4, (1, 1, 2, 1)  # micro-batches per step: step 3 accumulates under no_sync


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10),
    )


def digits(step: int, rank: int, micro: int, rows: int = BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """8x8 single-channel images, different per rank (in scale and offset too, so that running
    statistics kept per rank would differ), and labels."""
    g = torch.Generator().manual_seed(100 * step + 10 * micro + rank)
    return torch.randn(rows, 1, 8, 8, generator=g) * (1 + rank) + rank, torch.randint(0, 10, (rows,), generator=g)


def _engine(kind: str, model: nn.Module, mesh: Mesh):
    from torch.nn.parallel import DistributedDataParallel

    from paratrain.api import optimizer_params
    from paratrain.parallel.data import DataParallel
    from paratrain.parallel.zero import ZeroDataParallel

    if kind == "ddp":
        wrapped = DistributedDataParallel(model)
        return wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    if kind.startswith("zero"):
        wrapped = ZeroDataParallel(model, mesh, stage=int(kind[-1]))
        return wrapped, torch.optim.SGD(optimizer_params(wrapped, 0.0), lr=0.1, momentum=0.9)
    wrapped = DataParallel(model, mesh, average=True, broadcast_buffers=kind != "dp-no-broadcast")
    return wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)


def train_cnn(kind: str, mesh: Mesh) -> dict:
    """len(STEPS_MICRO) SGD steps on this rank's batches, then one eval forward under no_grad."""
    model = small_cnn()
    wrapped, opt = _engine(kind, model, mesh)
    r, dp, zero = mesh.coord("dp"), mesh.size("dp"), kind.startswith("zero")
    losses, broadcasts = [], []
    for step, micro in enumerate(STEPS_MICRO):
        opt.zero_grad() if kind == "ddp" else wrapped.zero_grad()
        total = 0.0
        for m in range(micro):
            x, y = digits(step, r, m)
            with wrapped.no_sync() if m < micro - 1 else nullcontext():
                before = mesh.comm.calls["broadcast"]
                loss = F.cross_entropy(wrapped(x), y) / micro
                broadcasts.append(mesh.comm.calls["broadcast"] - before)
                (loss / dp if zero else loss).backward()  # ZeRO sums over dp; DDP averages
            total += loss.item()
        losses.append(total)
        if kind != "ddp":
            wrapped.finish_grad_sync()
        if zero:
            wrapped.unscale_grads(1.0)
        opt.step()
        if zero:
            wrapped.publish()
    trained = {k: v.clone() for k, v in model.named_buffers()}
    wrapped.eval()
    with torch.no_grad():
        eval_out = wrapped(digits(99, r, 0)[0])
    return {"losses": losses, "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "trained": trained, "evaluated": {k: v.clone() for k, v in model.named_buffers()},
            "eval_out": eval_out, "broadcasts": broadcasts}


def _cnn_ranks(kinds: list[str]) -> dict:
    mesh = Mesh.build(dp=2)
    return {kind: train_cnn(kind, mesh) for kind in kinds}


KINDS = ["ddp", "dp", "dp-no-broadcast", "zero1", "zero3"]


@pytest.fixture(scope="module")
def cnn_ranks():
    return spawn(_cnn_ranks, 2, KINDS)


def assert_same_buffers(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, t in want.items():
        if t.is_floating_point():
            torch.testing.assert_close(got[name], t, rtol=1e-5, atol=1e-7, msg=name)
        else:
            assert torch.equal(got[name], t), name


@pytest.mark.parametrize("kind", ["dp", "zero1", "zero3"])
def test_cnn_matches_ddp_losses_parameters_and_buffers(cnn_ranks, kind):
    for rank in cnn_ranks:
        ours, ddp = rank[kind], rank["ddp"]
        torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(ddp["losses"]), rtol=1e-5, atol=0)
        if kind != "zero3":  # ZeRO-3 keeps only shards: its parameters are not in the module
            for name, p in ddp["params"].items():
                torch.testing.assert_close(ours["params"][name], p, rtol=1e-5, atol=1e-7, msg=name)
        assert_same_buffers(ours["trained"], ddp["trained"])
        assert_same_buffers(ours["evaluated"], ddp["evaluated"])
        torch.testing.assert_close(ours["eval_out"], ddp["eval_out"], rtol=1e-5, atol=1e-6)
    # DDP's rule: a sync before every forward but one after a forward under no_sync(); one
    # broadcast per buffer dtype (fp32 running stats, int64 counters)
    assert [rank[kind]["broadcasts"] for rank in cnn_ranks] == [[2, 2, 2, 0, 2]] * 2


def test_without_broadcast_buffers_replicas_keep_their_own_statistics(cnn_ranks):
    """Same losses and parameters (training-mode BatchNorm normalises with batch statistics),
    but rank 1's running statistics are its own, not DDP's, and so is its eval output."""
    rank0, rank1 = cnn_ranks
    torch.testing.assert_close(torch.tensor(rank1["dp-no-broadcast"]["losses"]), torch.tensor(rank1["ddp"]["losses"]),
                               rtol=1e-5, atol=0)
    assert_same_buffers(rank0["dp-no-broadcast"]["trained"], rank0["ddp"]["trained"])
    mine, ddp = rank1["dp-no-broadcast"]["evaluated"], rank1["ddp"]["evaluated"]
    assert not torch.allclose(mine["1.running_mean"], ddp["1.running_mean"], rtol=1e-3)
    assert not torch.allclose(rank1["dp-no-broadcast"]["eval_out"], rank1["ddp"]["eval_out"], rtol=1e-3)
    assert rank1["dp-no-broadcast"]["broadcasts"] == [0] * 5


# ---------------------------------------------------------------- SyncBatchNorm in training
SYNC_STEPS = 4


def train_whole_batch(model: nn.Module, rank: int | None, dp: int, wrapped: nn.Module | None = None) -> dict:
    """SGD on the global batch of each step (all ranks' `digits`), or on rank `rank`'s part of it."""
    wrapped = wrapped or model
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for step in range(SYNC_STEPS):
        parts = [digits(step, q, 0, rows=3) for q in range(dp)]
        x, y = parts[rank] if rank is not None else (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
        wrapped.zero_grad()
        loss = F.cross_entropy(wrapped(x), y)
        loss.backward()
        if hasattr(wrapped, "finish_grad_sync"):
            wrapped.finish_grad_sync()
        opt.step()
        losses.append(loss.item())
    wrapped.eval()
    with torch.no_grad():
        eval_out = wrapped(digits(99, 0, 0)[0])
    return {"losses": losses, "buffers": {k: v.clone() for k, v in model.named_buffers()}, "eval_out": eval_out,
            "params": {k: v.detach().clone() for k, v in model.named_parameters()},
            "types": sorted({type(m).__name__ for m in model.modules()})}


def _sync_bn_training() -> dict:
    from paratrain.parallel.data import DataParallel

    mesh = Mesh.build(dp=2)
    model = convert_sync_batchnorm(small_cnn(), mesh)
    return train_whole_batch(model, mesh.coord("dp"), 2, DataParallel(model, mesh, average=True))


def test_convert_sync_batchnorm_in_data_parallel_equals_one_process():
    """Equal parts per rank, so the mean of the ranks' mean losses is the whole batch's."""
    ref = train_whole_batch(small_cnn(), None, 2)
    ranks = spawn(_sync_bn_training, 2)
    torch.testing.assert_close(torch.tensor([sum(v) / 2 for v in zip(*(rk["losses"] for rk in ranks))]),
                               torch.tensor(ref["losses"]), rtol=1e-5, atol=0)
    for rk in ranks:
        assert "SyncBatchNorm" in rk["types"] and "BatchNorm2d" not in rk["types"]
        assert_same_buffers(rk["buffers"], ref["buffers"])
        for name, p in ref["params"].items():
            torch.testing.assert_close(rk["params"][name], p, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(rk["eval_out"], ref["eval_out"], rtol=1e-5, atol=1e-6)


def test_convert_sync_batchnorm_keeps_parameters_buffers_and_mode():
    """Without processes: the same Parameter objects (so requires_grad), buffers and mode."""
    model = small_cnn()
    model[1].weight.requires_grad_(False)
    model[4].eval()
    old = [model[1].weight, model[1].running_mean, model[4].num_batches_tracked]
    fake = Mesh({"pp": 1, "dp": 1, "tp": 1}, 0, None, "cpu")
    out = convert_sync_batchnorm(model, fake)
    assert isinstance(out[1], SyncBatchNorm) and isinstance(out[4], SyncBatchNorm)
    assert all(a is b for a, b in zip([out[1].weight, out[1].running_mean, out[4].num_batches_tracked], old))
    assert not out[1].weight.requires_grad and not out[4].training and out[1].training
    x = torch.randn(5, 1, 8, 8)  # dp=1: plain BatchNorm
    torch.testing.assert_close(out(x), convert_back(small_cnn(), model)(x))


def convert_back(fresh: nn.Sequential, converted: nn.Sequential) -> nn.Sequential:
    """`fresh` carrying `converted`'s state (plain BatchNorm layers)."""
    fresh.load_state_dict(converted.state_dict())
    for a, b in zip(fresh, converted):
        a.train(b.training)
    return fresh
