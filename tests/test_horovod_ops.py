"""`paratrain.horovod` against Horovod 0.28's documented behaviour, on gloo ranks.

One spawned function per world size runs every check (2 and 4 ranks; 3 for the errors of a
non-power-of-two world): basics, allreduce in every op, dtype and form (in place, async with
poll, grouped, prescale / postscale, fp16 compression, the fp32 route for 16-bit floats, its
gradient), integer Average truncating toward zero, uneven allgather, broadcast from every root,
alltoall with and without splits, reducescatter with a first dimension not divisible by the size,
objects, barrier, process sets ([0, 2] and [1, 3] on 4 ranks), Adasum against its formula,
join (zeros from the joined rank, on a process set too), and the error cases (one clear
exception on every rank, never a hang). Then DistributedOptimizer on 2 ranks against one
process averaging the two ranks' gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn as nn

from helpers import spawn

DTYPES = (torch.float32, torch.float64, torch.float16, torch.int16, torch.int32, torch.int64, torch.uint8)


def _raises(kind, fn, *words):
    """fn() raises `kind`, with each of `words` in its message."""
    try:
        fn()
    except kind as e:
        assert all(w in str(e) for w in words), f"{kind.__name__} without {words}: {e}"
        return
    raise AssertionError(f"no {kind.__name__} from {fn}")


def _allreduce_checks(hvd, r, n):
    for dtype in DTYPES:
        x = (torch.arange(6).reshape(2, 3) + 10 * r).to(dtype)
        parts = [(torch.arange(6).reshape(2, 3) + 10 * k).to(torch.float64) for k in range(n)]
        total = sum(parts)
        out = hvd.allreduce(x, op=hvd.Sum)
        assert out.dtype == dtype and out.shape == x.shape and torch.equal(out.double(), total), (dtype, out)
        mean = hvd.allreduce(x)  # Average, the default
        want = total / n if dtype.is_floating_point else torch.div(total, n, rounding_mode="trunc")
        assert mean.dtype == dtype and torch.allclose(mean.double(), want, atol=0.05), (dtype, mean)
        assert torch.equal(hvd.allreduce(x, op=hvd.Min).double(), parts[0])
        assert torch.equal(hvd.allreduce(x, op=hvd.Max).double(), parts[-1])
        small = (x % 3 + 1).to(dtype)
        prod = torch.stack([((p % 3) + 1) for p in parts]).prod(0)
        assert torch.equal(hvd.allreduce(small, op=hvd.Product).double(), prod)
        assert torch.equal(x, (torch.arange(6).reshape(2, 3) + 10 * r).to(dtype))  # input untouched
    # integer Average: sum, then times 1/size, truncated toward zero (Horovod's ScaleBuffer)
    signed = torch.tensor([5, -5, 7], dtype=torch.int32) if r == 0 else torch.zeros(3, dtype=torch.int32)
    assert hvd.allreduce(signed).tolist() == [int(5 / n), int(-5 / n), int(7 / n)]
    # prescale / postscale, floats and integers
    x = torch.full((4,), float(r + 1))
    assert torch.allclose(hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.25),
                          torch.full((4,), n * (n + 1) / 4))
    assert torch.allclose(hvd.allreduce(x, postscale_factor=3.0), torch.full((4,), 3 * (n + 1) / 2))
    assert hvd.allreduce(torch.tensor([3]), op=hvd.Sum, prescale_factor=0.5).item() == n  # trunc(1.5) each
    # the deprecated average=
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(hvd.allreduce(x, average=False), hvd.allreduce(x, op=hvd.Sum))
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    _raises(ValueError, lambda: hvd.allreduce(x, average=True, op=hvd.Sum), "supersedes")
    _raises(ValueError, lambda: hvd.allreduce(x, op=17), "unknown reduction op")


def _allreduce_forms(hvd, r, n):
    from paratrain.horovod import engine

    base = torch.arange(6.0).reshape(2, 3) + r
    want = torch.arange(6.0).reshape(2, 3) * n + n * (n - 1) / 2
    y = base.clone()
    assert hvd.allreduce_(y, op=hvd.Sum) is y and torch.equal(y, want)
    t = base.clone().t()  # not contiguous
    hvd.allreduce_(t, op=hvd.Sum)
    assert torch.equal(t, want.t())
    h = hvd.allreduce_async(base, op=hvd.Sum)
    assert isinstance(h, int) and isinstance(hvd.poll(h), bool)
    assert torch.equal(hvd.synchronize(h), want) and hvd.synchronize(h) is None
    _raises(ValueError, lambda: hvd.poll(h), "unknown handle")
    y = base.clone()
    h = hvd.allreduce_async_(y, op=hvd.Sum)
    while not hvd.poll(h):
        pass
    assert hvd.synchronize(h) is y and torch.equal(y, want)
    ints = torch.full((5,), r, dtype=torch.int64)
    group = [base, ints, base * 2]
    outs = hvd.grouped_allreduce(group, op=hvd.Sum)
    assert torch.equal(outs[0], want) and outs[1].tolist() == [n * (n - 1) // 2] * 5 and torch.equal(outs[2], 2 * want)
    outs = hvd.synchronize(hvd.grouped_allreduce_async(group, op=hvd.Sum))
    assert torch.equal(outs[2], 2 * want) and torch.equal(group[0], base)
    copies = [g.clone() for g in group]
    assert hvd.grouped_allreduce_(copies, op=hvd.Sum)[0] is copies[0] and torch.equal(copies[0], want)
    fp16 = hvd.allreduce(base / 7, compression=hvd.Compression.fp16)
    assert fp16.dtype == torch.float32 and torch.allclose(fp16, hvd.allreduce(base / 7), atol=1e-3)
    engine._NATIVE[torch.float16] = False  # the route for a backend that cannot reduce fp16: fp32 and back
    half = hvd.allreduce(base.half(), op=hvd.Sum)
    assert half.dtype == torch.float16 and torch.equal(half.float(), want)
    del engine._NATIVE[torch.float16]
    from paratrain.horovod.basics import world

    before = world().comm.bytes
    hvd.allreduce(base, name="metric.loss")
    header = world().comm.flight.recent[-2]  # the negotiation, then the all-reduce itself
    assert header.op == "hvd.allreduce metric.loss" and header.site.startswith("test_horovod_ops.py:"), header
    assert world().comm.bytes > before
    leaf = base.clone().requires_grad_()
    hvd.allreduce(leaf, op=hvd.Sum).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(base, n))  # Horovod: d(sum of sums)/dx = size


def _gather_broadcast(hvd, r, n):
    for dtype in (torch.float32, torch.int64, torch.uint8, torch.float16, torch.int16):
        x = torch.full((r + 1, 2), r, dtype=dtype)
        out = hvd.allgather(x)
        want = torch.cat([torch.full((k + 1, 2), k, dtype=dtype) for k in range(n)])
        assert out.dtype == dtype and torch.equal(out, want)
    assert hvd.allgather(torch.tensor(r)).tolist() == list(range(n))
    h = hvd.allgather_async(torch.ones(2, 3) * r)
    hvd.poll(h)
    assert torch.equal(hvd.synchronize(h), torch.cat([torch.ones(2, 3) * k for k in range(n)]))
    a, b = hvd.grouped_allgather([torch.tensor([r]), torch.zeros(r, 1)])
    assert a.tolist() == list(range(n)) and b.shape == (n * (n - 1) // 2, 1)
    leaf = torch.ones(r + 1, 2, requires_grad=True)
    hvd.allgather(leaf).backward(torch.cat([torch.full((k + 1, 2), float(k)) for k in range(n)]))
    assert torch.equal(leaf.grad, torch.full((r + 1, 2), float(r)))  # Horovod's test: the average
    for root in range(n):
        for dtype in (torch.float32, torch.int32, torch.uint8, torch.float16, torch.int16):
            x = torch.full((2, 3), r, dtype=dtype)
            got = hvd.broadcast(x, root)
            assert got.dtype == dtype and torch.equal(got, torch.full((2, 3), root, dtype=dtype))
            assert torch.equal(x, torch.full((2, 3), r, dtype=dtype))
        y = torch.full((3,), float(r))
        assert hvd.broadcast_(y, root) is y and y.tolist() == [root] * 3
        assert hvd.synchronize(hvd.broadcast_async(torch.tensor([r]), root)).item() == root
    leaf = torch.ones(3, requires_grad=True)
    hvd.broadcast(leaf, 1).sum().backward()
    assert leaf.grad.tolist() == ([1.0] * 3 if r == 1 else [0.0] * 3)


def _alltoall_reducescatter(hvd, r, n):
    x = (torch.arange(2 * n) + 100 * r).reshape(2 * n, 1)
    out = hvd.alltoall(x)  # no splits: the tensor alone
    assert torch.is_tensor(out) and out.view(-1).tolist() == [100 * k + 2 * r + i for k in range(n) for i in (0, 1)]
    splits = [(r + j) % 3 for j in range(n)]  # rank r sends (r + j) % 3 rows to j, some none
    rows = torch.tensor([[1000 * r + 10 * j + i] for j in range(n) for i in range(splits[j])], dtype=torch.float64)
    rows = rows.reshape(-1, 1)
    got, received = hvd.alltoall(rows, splits=splits)
    assert received.dtype == torch.int32 and received.tolist() == [(k + r) % 3 for k in range(n)]
    assert got.view(-1).tolist() == [1000 * k + 10 * r + i for k in range(n) for i in range((k + r) % 3)]
    small, _ = hvd.alltoall(rows.to(torch.int16), splits=splits)  # int16: gloo has none, sent as int32
    assert small.dtype == torch.int16 and torch.equal(small.double(), got)
    got2, received2 = hvd.synchronize(hvd.alltoall_async(rows, torch.tensor(splits)))
    assert torch.equal(got2, got) and torch.equal(received2, received)
    leaf = rows.clone().requires_grad_()
    hvd.alltoall(leaf, splits=splits)[0].sum().backward()
    assert torch.equal(leaf.grad, torch.ones_like(rows))
    rows_n = 2 * n + 1  # not divisible: the first (rows mod n) = 1 rank gets one more row
    counts = [rows_n // n + (1 if k < rows_n % n else 0) for k in range(n)]
    start = sum(counts[:r])
    base = torch.arange(rows_n * 2, dtype=torch.float64).reshape(rows_n, 2)
    mine = slice(start, start + counts[r])
    for dtype in (torch.float32, torch.float64, torch.int64, torch.float16, torch.int16):
        x = (base + r).to(dtype)
        total = base * n + n * (n - 1) / 2
        got = hvd.reducescatter(x, op=hvd.Sum)
        assert got.dtype == dtype and got.shape == (counts[r], 2) and torch.equal(got.double(), total[mine]), dtype
        avg = hvd.reducescatter(x)
        want = total[mine] / n if dtype.is_floating_point else torch.div(total[mine], n, rounding_mode="trunc")
        assert torch.allclose(avg.double(), want, atol=0.05), dtype
    x = base.float()
    scaled = hvd.reducescatter(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    assert torch.equal(scaled.double(), base[mine] * n)
    a, b = hvd.grouped_reducescatter([x, x * 2], op=hvd.Sum)
    assert torch.equal(b, 2 * a) and torch.equal(hvd.synchronize(hvd.reducescatter_async(x, op=hvd.Sum)), a)
    assert len(hvd.synchronize(hvd.grouped_reducescatter_async([x, x]))) == 2
    leaf = x.clone().requires_grad_()
    hvd.reducescatter(leaf, op=hvd.Sum).sum().backward()
    assert torch.equal(leaf.grad, torch.full_like(x, n))  # Horovod: times the size for Sum


def _objects_adasum(hvd, r, n):
    from paratrain.horovod import adasum

    assert hvd.allgather_object({"rank": r, "list": [r] * r}) == [{"rank": k, "list": [k] * k} for k in range(n)]
    assert hvd.broadcast_object({"from": r} if r == 1 else None, root_rank=1) == {"from": 1}
    hvd.barrier()
    for dtype, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
        xs = [torch.randn(7, 3, generator=torch.Generator().manual_seed(k), dtype=dtype) for k in range(n)]
        got = hvd.allreduce(xs[r], op=hvd.Adasum)
        assert torch.allclose(got, adasum.tree(xs), atol=tol, rtol=tol)
        a, b = xs[0].reshape(-1).double(), xs[1].reshape(-1).double()
        dot = a @ b
        two = (1 - dot / (2 * a @ a)) * a + (1 - dot / (2 * b @ b)) * b  # Maleki et al.'s formula
        assert torch.allclose(adasum.combine(xs[0], xs[1]).reshape(-1).double(), two, atol=tol)
        assert all(torch.equal(g, got) for g in hvd.allgather_object(got))  # the same on every rank
    orthogonal = torch.zeros(n, dtype=torch.float64)
    orthogonal[r] = 1.0
    assert torch.allclose(hvd.allreduce(orthogonal, op=hvd.Adasum), torch.ones(n, dtype=torch.float64))  # adds
    assert torch.allclose(hvd.allreduce(torch.ones(4), op=hvd.Adasum), torch.ones(4))  # parallel: averages
    _raises(ValueError, lambda: hvd.allreduce(torch.ones(2, dtype=torch.int32), op=hvd.Adasum), "floating")


def _errors(hvd, r, n):
    from paratrain.horovod import HorovodInternalError

    _raises(HorovodInternalError, lambda: hvd.allreduce(torch.zeros(3 if r == 0 else 4)), "number of elements")
    _raises(HorovodInternalError, lambda: hvd.allreduce(torch.zeros(3, dtype=torch.float64 if r else torch.float32)),
            "dtype")
    _raises(HorovodInternalError, lambda: hvd.allreduce(torch.zeros(3)) if r == 0 else hvd.broadcast(torch.zeros(3), 0),
            "disagree on the collective", "allreduce", "broadcast")
    _raises(HorovodInternalError, lambda: hvd.broadcast(torch.zeros(3), r), "root rank")
    _raises(HorovodInternalError, lambda: hvd.allgather(torch.zeros(2, 3 if r else 4)), "shape")
    bad = [1] * n if r != 1 else [2] * n  # rank 1's splits do not sum to its rows
    _raises(ValueError, lambda: hvd.alltoall(torch.zeros(n, 1), splits=bad), "splits" if r == 1 else "rank(s) [1]")
    _raises(ValueError, lambda: hvd.alltoall(torch.zeros(n + 1, 1)), "not divisible")
    _raises(ValueError, lambda: hvd.alltoall(torch.zeros(n, 1), splits=[n]), "splits")
    _raises(ValueError, lambda: hvd.reducescatter(torch.zeros(n), op=hvd.Max), "Average or hvd.Sum")
    _raises(ValueError, lambda: hvd.reducescatter(torch.zeros(n), op=hvd.Max if r == 1 else hvd.Sum),
            "Average or hvd.Sum" if r == 1 else "refused by rank(s) [1]")  # a rank-local refusal reaches all
    _raises(ValueError, lambda: hvd.broadcast(torch.zeros(1), n + 5), "not in process set")
    assert hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist() == [n, n]  # still in step


def _join_checks(hvd, r, n):
    from paratrain.horovod import HorovodInternalError

    a, b = torch.arange(5.0) + 1, torch.full((3, 2), 7, dtype=torch.int64)
    if r == 0:
        last = hvd.join()
    else:
        assert torch.equal(hvd.allreduce(a), a * (n - 1) / n)  # the joined rank adds zeros; / full size
        assert torch.equal(hvd.synchronize(hvd.allreduce_async(b)), torch.div(b * (n - 1), n, rounding_mode="trunc"))
        assert torch.equal(hvd.allreduce(a * r, op=hvd.Min), a)  # min over the active ranks
        outs = hvd.grouped_allreduce([a, b], op=hvd.Sum)
        assert torch.equal(outs[0], a * (n - 1)) and torch.equal(outs[1], b * (n - 1))
        hvd.barrier()
        _raises(HorovodInternalError, lambda: hvd.broadcast(a, 1), "rank(s) [0] have called hvd.join()")
        last = hvd.join()
    assert last == n - 1 and hvd.allgather_object(last) == [n - 1] * n
    assert hvd.allreduce(torch.ones(1), op=hvd.Sum).item() == n  # everyone back


def _process_sets(hvd, r, n):
    evens, odds = hvd.add_process_set([0, 2]), hvd.add_process_set(hvd.ProcessSet([3, 1]))
    mine, other = (evens, odds) if r % 2 == 0 else (odds, evens)
    assert mine.size() == 2 and mine.rank() == r // 2 and mine.included() and other.rank() == -1
    assert odds.ranks == [1, 3] and not other.included()
    assert hvd.allreduce(torch.tensor([float(r)]), op=hvd.Sum, process_set=mine).item() == sum(mine.ranks)
    assert hvd.allgather(torch.tensor([r]), process_set=mine).tolist() == mine.ranks
    assert hvd.broadcast(torch.tensor([r]), mine.ranks[1], process_set=mine).item() == mine.ranks[1]
    assert hvd.allgather_object(r, process_set=mine) == mine.ranks
    got = hvd.reducescatter(torch.arange(4.0) + r, op=hvd.Sum, process_set=mine)
    assert torch.equal(got, (torch.arange(4.0) * 2 + sum(mine.ranks))[2 * mine.rank() : 2 * mine.rank() + 2])
    _raises(ValueError, lambda: hvd.allreduce(torch.ones(1), process_set=other), f"rank {r} is not in process set")
    _raises(ValueError, lambda: hvd.add_process_set([0, 2]), "already exists")
    _raises(NotImplementedError, lambda: hvd.allreduce(torch.ones(1), op=hvd.Adasum, process_set=mine), "process sets")
    if r == 2:  # joined on both the world and [0, 2]: stands in for rank 0's allreduce on the set
        last = hvd.join()
    else:
        assert hvd.allreduce(torch.ones(2), op=hvd.Sum).tolist() == [3.0, 3.0]
        if r == 0:
            assert hvd.allreduce(torch.ones(2), op=hvd.Sum, process_set=evens).tolist() == [1.0, 1.0]
        else:
            assert hvd.allreduce(torch.ones(2), op=hvd.Sum, process_set=odds).tolist() == [2.0, 2.0]
        last = hvd.join()
    assert last == 3
    assert hvd.remove_process_set(evens) and not hvd.remove_process_set(evens) and evens.size() is None
    assert hvd.remove_process_set(odds)


def _every_check() -> str:
    import paratrain.horovod as hvd

    hvd.init()
    r, n = hvd.rank(), hvd.size()
    assert (hvd.local_rank(), hvd.local_size(), hvd.cross_rank(), hvd.cross_size()) == (r, n, 0, 1)
    assert hvd.is_initialized() and hvd.is_homogeneous() and hvd.gloo_built() and hvd.gloo_enabled()
    assert not (hvd.mpi_built() or hvd.mpi_enabled() or hvd.ddl_built() or hvd.ccl_built())
    assert hvd.global_process_set.ranks == list(range(n)) and hvd.global_process_set.rank() == r
    _raises(ValueError, hvd.mpi_threads_supported, "MPI is not enabled")
    _allreduce_checks(hvd, r, n)
    _allreduce_forms(hvd, r, n)
    _gather_broadcast(hvd, r, n)
    _alltoall_reducescatter(hvd, r, n)
    _objects_adasum(hvd, r, n)
    _errors(hvd, r, n)
    _join_checks(hvd, r, n)
    if n == 4:
        _process_sets(hvd, r, n)
    mismatch = [0] if r == 0 else [1]  # ranks adding different sets: one error on every rank
    _raises(hvd.HorovodInternalError, lambda: hvd.add_process_set(mismatch), "shape")
    hvd.shutdown()
    assert not hvd.is_initialized()
    _raises(ValueError, hvd.size, "not been initialized")
    return "ok"


@pytest.mark.parametrize("world", [2, 4])
def test_horovod_collectives(world):
    assert spawn(_every_check, world) == ["ok"] * world


def _three_ranks() -> str:
    import paratrain.horovod as hvd

    hvd.init()
    r = hvd.rank()
    _raises(NotImplementedError, lambda: hvd.allreduce(torch.ones(2), op=hvd.Adasum), "power of 2")
    _raises(NotImplementedError if r == 0 else ValueError,
            lambda: hvd.allreduce(torch.ones(2), op=hvd.Adasum if r == 0 else hvd.Average),
            "power of 2" if r == 0 else "refused by rank(s) [0]")
    got = hvd.reducescatter(torch.arange(7.0).reshape(7, 1) * (r + 1), op=hvd.Sum)  # rows 3, 2, 2
    assert got.view(-1).tolist() == [[0.0, 6.0, 12.0], [18.0, 24.0], [30.0, 36.0]][r]
    assert hvd.allreduce(torch.tensor([7], dtype=torch.int64)).item() == 7  # 21 / 3
    hvd.shutdown()
    return "ok"


def test_three_ranks_refuse_adasum_and_split_unevenly():
    assert spawn(_three_ranks, 3) == ["ok"] * 3


def test_a_plain_process_is_a_world_of_one():
    code = ("import torch, paratrain.horovod as hvd; hvd.init(); "
            "assert (hvd.size(), hvd.rank(), hvd.local_size(), hvd.cross_size()) == (1, 0, 1, 1); "
            "x = torch.arange(3.0); assert torch.equal(hvd.allreduce(x), x) and torch.equal(hvd.allgather(x), x); "
            "assert hvd.alltoall(x, splits=[3])[1].tolist() == [3] and hvd.join() == 0; "
            "assert hvd.broadcast_object('a') == 'a'; hvd.shutdown(); print('ok')")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# DistributedOptimizer (optimizer.py) on 2 ranks against one process that combines the two ranks' gradients.
STEPS, LR = 3, 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


def _batch(step: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    return x[4 * r : 4 * r + 4], y[4 * r : 4 * r + 4]


def _local_grads(model: nn.Module, step: int, r: int, passes: int) -> list[torch.Tensor]:
    """Rank r's gradients of a step: the sum over `passes` micro-batches of their mean losses."""
    model.zero_grad()
    x, y = _batch(step, r)
    for xs, ys in zip(x.chunk(passes), y.chunk(passes)):
        nn.functional.mse_loss(model(xs), ys).backward()
    return [p.grad.clone() for p in model.parameters()]


def _reference(combine, passes: int = 1, clip: float | None = None) -> list[torch.Tensor]:
    model = _model()
    for step in range(STEPS):
        per_rank = [_local_grads(model, step, r, passes) for r in (0, 1)]
        with torch.no_grad():
            for p, g0, g1 in zip(model.parameters(), *per_rank):
                p.grad = combine(g0, g1)
            if clip is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            for p in model.parameters():
                p -= LR * p.grad
    return [p.detach() for p in model.parameters()]


def _distributed(hvd, r: int, passes: int = 1, clip: float | None = None, **options) -> list[torch.Tensor]:
    model = _model()
    if r == 1:  # apart until broadcast_parameters
        with torch.no_grad():
            for p in model.parameters():
                p += 1
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), named_parameters=model.named_parameters(),
                                   backward_passes_per_step=passes, **options)
    for step in range(STEPS):
        opt.zero_grad()
        x, y = _batch(step, r)
        for xs, ys in zip(x.chunk(passes), y.chunk(passes)):
            nn.functional.mse_loss(model(xs), ys).backward()
        if clip is None:
            opt.step()
        else:
            opt.synchronize()
            nn.utils.clip_grad_norm_(model.parameters(), clip)
            with opt.skip_synchronize():
                opt.step()
    return [p.detach() for p in model.parameters()]


def _optimizer_checks() -> str:
    import paratrain.horovod as hvd
    from paratrain.horovod import adasum

    hvd.init()
    r = hvd.rank()
    cases = [({}, lambda a, b: (a + b) / 2, 1e-6), ({"op": hvd.Sum}, lambda a, b: a + b, 1e-6),
             ({"passes": 2}, lambda a, b: (a + b) / 2, 1e-6),
             ({"compression": hvd.Compression.fp16}, lambda a, b: (a + b) / 2, 2e-3),
             ({"gradient_predivide_factor": 2.0}, lambda a, b: (a + b) / 2, 1e-6),
             ({"clip": 0.05}, lambda a, b: (a + b) / 2, 1e-6),
             ({"op": hvd.Adasum}, adasum.combine, 1e-6)]
    for options, combine, tol in cases:
        passes, clip = options.pop("passes", 1), options.get("clip")
        got = _distributed(hvd, r, passes=passes, **options)
        want = _reference(combine, passes, clip)
        assert all(torch.allclose(g, w, atol=tol) for g, w in zip(got, want)), (options, got[0][0], want[0][0])
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), named_parameters=model.named_parameters())
    nn.functional.mse_loss(model(_batch(0, r)[0]), _batch(0, r)[1]).backward()
    _raises(AssertionError, opt.zero_grad, "before optimizer.step()")
    opt.step()
    _raises(ValueError, lambda: hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), op=hvd.Min),
            "op must be")
    model = _model()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    if r == 0:  # root has state; rank 1's is empty (before its first step)
        nn.functional.mse_loss(model(_batch(0, 0)[0]), _batch(0, 0)[1]).backward()
        adam.step()
        adam.param_groups[0]["lr"] = 0.02
    hvd.broadcast_optimizer_state(adam, root_rank=0)
    state = adam.state_dict()
    root = hvd.broadcast_object(state, root_rank=0)
    assert state["param_groups"][0]["lr"] == 0.02 and len(state["state"]) == 4
    assert all(torch.equal(state["state"][i]["exp_avg"], root["state"][i]["exp_avg"]) for i in range(4))
    hvd.shutdown()
    return "ok"


def test_distributed_optimizer_matches_one_process_averaging_two_ranks():
    assert spawn(_optimizer_checks, 2) == ["ok"] * 2


HOROVOD_SCRIPT = """\
# A Horovod PyTorch script as Horovod's examples write it; only the import line differs.

import torch
import torch.nn as nn
import torch.nn.functional as F

import paratrain.horovod as hvd

hvd.init()
torch.manual_seed(42)
if torch.cuda.is_available():
    torch.cuda.set_device(hvd.local_rank())
torch.set_num_threads(1)

x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
y = (x.sum(1) > 0).long()
shard = slice(hvd.rank(), None, hvd.size())
data = list(zip(x[shard].split(8), y[shard].split(8)))

model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
optimizer = torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size(), momentum=0.9)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)
optimizer = hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters(),
                                     compression=hvd.Compression.none, op=hvd.Average)


def metric_average(val, name):
    tensor = torch.tensor(val)
    avg_tensor = hvd.allreduce(tensor, name=name)
    return avg_tensor.item()


for epoch in range(3):
    model.train()
    for batch_idx, (data_b, target) in enumerate(data):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(data_b), target)
        loss.backward()
        optimizer.step()
    loss_avg = metric_average(loss.item(), "avg_loss")
    if hvd.rank() == 0:
        print(f"epoch {epoch} loss {loss_avg:.4f}", flush=True)
last = hvd.join()
params = hvd.allgather_object([p.detach().clone() for p in model.parameters()])
assert all(torch.equal(a, b) for a, b in zip(params[0], params[-1]))
if hvd.rank() == 0:
    print("ok", hvd.size(), hvd.local_size(), hvd.cross_size(), last, flush=True)
"""


def test_a_horovod_script_runs_unchanged_under_torchrun(tmp_path):
    """Horovod's example shape (init, broadcast, DistributedOptimizer, metric_average, join),
    only the import changed, joined from torchrun's environment: the replicas stay equal."""
    path = tmp_path / "train_hvd.py"
    path.write_text(HOROVOD_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(path)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "ok 2 2 1 1", out.stderr[-3000:]


def _uneven_steps_with_join(options: dict) -> list[torch.Tensor]:
    """Rank 0 runs out of data after 2 steps and joins; rank 1 takes 2 more (Horovod's join)."""
    import paratrain.horovod as hvd

    hvd.init()
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), named_parameters=model.named_parameters(),
                                   **options)
    for step in range(2 if hvd.rank() == 0 else 4):
        opt.zero_grad()
        x, y = _batch(step, hvd.rank())
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    last = hvd.join()
    params = hvd.broadcast_object([p.detach() for p in model.parameters()], root_rank=1)
    return [last, [p.detach() for p in model.parameters()], params]


def _uneven_reference(scale: float) -> list[torch.Tensor]:
    """Steps 0-1: both ranks' gradients combined; steps 2-3: rank 1's with the joined rank's zeros."""
    model = _model()
    for step in range(4):
        grads = [_local_grads(model, step, r, 1) if step < 2 or r == 1 else None for r in (0, 1)]
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p -= LR * scale * sum(g[i] for g in grads if g is not None)
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("options,scale", [({}, 0.5), ({"op": "Sum", "compression": "fp16"}, 1.0)])
def test_uneven_steps_with_join_reduce_with_zeros_from_the_joined_rank(options, scale):
    """The joined rank stands in for the optimizer's gradients: the others keep stepping, an
    average divides by the whole world (Horovod's join), and join returns the last rank to join."""
    import paratrain.horovod as hvd

    resolved = {"op": getattr(hvd, options["op"])} if "op" in options else {}
    if "compression" in options:
        resolved["compression"] = hvd.Compression.fp16
    out = spawn(_uneven_steps_with_join, 2, resolved, timeout=120)
    want = _uneven_reference(scale)
    tol = 2e-3 if "compression" in options else 1e-6
    assert [o[0] for o in out] == [1, 1]
    for got in (out[1][1], out[0][2]):  # rank 1's weights, as rank 1 has them and as broadcast to rank 0
        assert all(torch.allclose(g, w, atol=tol) for g, w in zip(got, want)), (got[0][0], want[0][0])


def _sparse_checks() -> list:
    """An embedding with sparse gradients, with and without sparse_as_dense, over two steps (the
    second after zero_grad(set_to_none=True), when the gradient arrives sparse)."""
    import paratrain.horovod as hvd

    hvd.init()
    out = []
    for sparse_as_dense in (True, False):
        torch.manual_seed(0)
        model = nn.EmbeddingBag(10, 3, mode="sum", sparse=True)
        opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), sparse_as_dense=sparse_as_dense,
                                       named_parameters=model.named_parameters())
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            model(torch.tensor([[hvd.rank(), 3 + hvd.rank()]])).sum().backward()
            opt.step()
        out.append(model.weight.detach().clone())
    return out


def test_sparse_gradients_are_averaged_as_dense_ones():
    out = spawn(_sparse_checks, 2)
    torch.manual_seed(0)
    want = nn.EmbeddingBag(10, 3, mode="sum").weight.detach().clone()
    want[[0, 1, 3, 4]] -= 2 * LR * 0.5  # each rank's two rows get 1 a step, averaged over the two ranks
    assert all(torch.allclose(w, want) for o in out for w in o), out


def _timeline_checks(path: str) -> str:
    import paratrain.horovod as hvd

    hvd.init()
    hvd.start_timeline(path)
    hvd.allreduce(torch.ones(3), name="loss")
    h = hvd.allgather_async(torch.ones(hvd.rank() + 1), name="rows")
    assert hvd.synchronize(h).shape == (3,)
    model = _model()
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=LR), named_parameters=model.named_parameters())
    nn.functional.mse_loss(model(_batch(0, 0)[0]), _batch(0, 0)[1]).backward()
    opt.step()
    hvd.shutdown()  # stops the timeline: rank 0 writes it
    return "ok"


def test_timeline_is_a_chrome_trace_of_horovods_phases(tmp_path):
    import json

    path = tmp_path / "timeline.json"
    assert spawn(_timeline_checks, 2, str(path)) == ["ok"] * 2
    trace = json.loads(path.read_text())["traceEvents"]
    rows = {e["pid"]: e["args"]["name"] for e in trace if e["ph"] == "M"}
    spans = {(rows[e["pid"]], e["name"]) for e in trace if e["ph"] == "X"}
    assert {("loss", "NEGOTIATE_ALLREDUCE"), ("loss", "ALLREDUCE"), ("rows", "NEGOTIATE_ALLGATHER"),
            ("rows", "ALLGATHER"), ("DistributedOptimizer.synchronize", "ALLREDUCE")} <= spans, spans
    assert all(e["dur"] >= 0 and e["ts"] >= 0 and e["tid"] == 0 for e in trace if e["ph"] == "X")
