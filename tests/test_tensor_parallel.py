"""Tensor parallelism is the same math as one process, with the collectives Megatron promises.

Each parallel layer equals its nn.Linear / nn.Embedding / cross-entropy reference in forward and
backward for tp=2 and tp=4; tp=2, tp=4 and dp=2,tp=2 give the per-step losses of dp=1 for 10
steps of `tiny`, with and without sequence parallelism; a block costs 2 all-reduces forward and
2 backward (without SP); the tp random state differs across ranks only where it must.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from helpers import spawn
from paratrain.config import RunConfig, validate
from paratrain.launch import launch
from paratrain.mesh import Mesh
from paratrain.parallel.roles import set_role
from paratrain.models.gpt import GPT, GPTConfig
from paratrain.parallel.tensor import (
    GPT_PLAN,
    ColumnParallelLinear,
    RowParallelLinear,
    TensorParallelRNG,
    TPGroup,
    VocabParallelEmbedding,
    parallelize_tensor,
    sync_sequence_parallel_grads,
    vocab_parallel_cross_entropy,
)


def _layers_match_references():
    """In a spawned rank (tp = world): compare every parallel layer with its reference."""
    mesh = Mesh.build(tp=dist.get_world_size())
    tp = TPGroup.from_mesh(mesh)
    torch.manual_seed(0)  # identical references and inputs on every rank
    x = torch.randn(2, 8, 16, requires_grad=True)
    report = {}

    def check(name, ref_out, par_out, pairs):
        ok = torch.allclose(ref_out, par_out, atol=1e-5)
        for ref_grad, par_grad in pairs:
            ok = ok and torch.allclose(ref_grad, par_grad, atol=1e-5)
        report[name] = ok

    # column parallel, gathered output
    lin = nn.Linear(16, 24)
    col = ColumnParallelLinear(lin, tp, gather_output=True)
    xr, xp = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref, par = lin(xr), col(xp)
    g = torch.randn_like(ref)
    ref.backward(g), par.backward(g)
    shard = slice(tp.rank * 24 // tp.size, (tp.rank + 1) * 24 // tp.size)
    check("column", ref, par, [(xr.grad, xp.grad), (lin.weight.grad[shard], col.weight.grad),
                               (lin.bias.grad[shard], col.bias.grad)])

    # column then row: the Megatron MLP pair
    fc, proj = nn.Linear(16, 32), nn.Linear(32, 16)
    pfc, pproj = ColumnParallelLinear(fc, tp), RowParallelLinear(proj, tp)
    xr, xp = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ref, par = proj(F.gelu(fc(xr))), pproj(F.gelu(pfc(xp)))
    g = torch.randn_like(ref)
    ref.backward(g), par.backward(g)
    cols = slice(tp.rank * 32 // tp.size, (tp.rank + 1) * 32 // tp.size)
    check("column+row", ref, par, [(xr.grad, xp.grad), (fc.weight.grad[cols], pfc.weight.grad),
                                   (proj.weight.grad[:, cols], pproj.weight.grad), (proj.bias.grad, pproj.bias.grad)])

    # vocabulary-parallel embedding
    emb = nn.Embedding(64, 16)
    pemb = VocabParallelEmbedding(emb, tp)
    ids = torch.randint(0, 64, (2, 8))
    ref, par = emb(ids), pemb(ids)
    g = torch.randn_like(ref)
    ref.backward(g), par.backward(g)
    rows = slice(tp.rank * 64 // tp.size, (tp.rank + 1) * 64 // tp.size)
    check("vocab embedding", ref, par, [(emb.weight.grad[rows], pemb.weight.grad)])

    # vocabulary-parallel cross-entropy: never sees the full logits
    logits = torch.randn(2, 8, 64, requires_grad=True)
    targets = torch.randint(0, 64, (2, 8))
    ref = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 8)
    local = logits.detach()[..., rows].clone().requires_grad_()
    par = vocab_parallel_cross_entropy(local, targets, tp)
    g = torch.rand(2, 8)
    ref.backward(g), par.backward(g)
    check("cross-entropy", ref, par, [(logits.grad[..., rows], local.grad)])
    return report


@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_layers_equal_their_references(tp):
    for report in spawn(_layers_match_references, tp):
        assert report == {k: True for k in report} and len(report) == 4, report


def tiny_run(dp=1, tp=1, sp=False, dropout=0.0, steps=10):
    cfg = RunConfig()
    cfg.model.name, cfg.model.dropout = "tiny", dropout
    cfg.layout.dp, cfg.layout.tp, cfg.layout.sequence_parallel = dp, tp, sp
    cfg.train.steps, cfg.train.global_batch, cfg.train.seq_len = steps, 8, 32
    cfg.train.seed, cfg.train.progress, cfg.train.lr, cfg.train.warmup_steps = 5, False, 3e-3, 2
    validate(cfg)
    return launch(cfg)


@pytest.fixture(scope="module")
def reference():
    return tiny_run()


@pytest.mark.parametrize(
    "dp,tp,sp", [(1, 2, False), pytest.param(1, 4, False, marks=pytest.mark.slow),
                 pytest.param(2, 2, False, marks=pytest.mark.slow), pytest.param(1, 2, True, marks=pytest.mark.slow),
                 pytest.param(1, 4, True, marks=pytest.mark.slow), (2, 2, True)],
    ids=["tp2", "tp4", "dp2-tp2", "tp2-sp", "tp4-sp", "dp2-tp2-sp"],
)
def test_losses_match_single_process(reference, dp, tp, sp):
    result = tiny_run(dp, tp, sp)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    # the block weights are split: each rank holds well under the full model's bytes
    full = reference["param_bytes_per_rank"][0]
    assert all(b < full * (1 / tp + 0.2) for b in result["param_bytes_per_rank"])


def _count_collectives(n_layer, sp):
    """In a spawned rank: collectives of one forward and one backward of a tp GPT."""
    mesh = Mesh.build(tp=dist.get_world_size())
    torch.manual_seed(0)
    model = parallelize_tensor(GPT(GPTConfig(n_layer=n_layer, n_head=4, d_model=32, max_seq_len=16)),
                               mesh, GPT_PLAN, sequence_parallel=sp)
    ids = torch.randint(0, 256, (2, 16))
    mesh.comm.reset()
    logits = model(ids)
    loss = vocab_parallel_cross_entropy(logits, ids, TPGroup.from_mesh(mesh)).sum()
    forward, forward_bytes = dict(mesh.comm.calls), mesh.comm.bytes
    mesh.comm.reset()
    loss.backward()
    return forward, dict(mesh.comm.calls), forward_bytes + mesh.comm.bytes


def _count_all():
    """In a spawned rank: `_count_collectives` for 2 and 3 blocks, without and with SP."""
    return {(n, sp): _count_collectives(n, sp) for sp in (False, True) for n in (2, 3)}


@pytest.fixture(scope="module")
def collectives():
    """Rank 0's counts of every case, from one spawn (process start-up dominates)."""
    return spawn(_count_all, 2)[0]


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_collectives_per_block(collectives, sp):
    f2, b2, _ = collectives[2, sp]  # 2 blocks
    f3, b3, _ = collectives[3, sp]  # 3 blocks: the difference is one block

    def per_block(a, b):
        return {op: b.get(op, 0) - a.get(op, 0) for op in set(a) | set(b) if b.get(op, 0) != a.get(op, 0)}

    if sp:  # each all-reduce becomes a reduce-scatter plus an all-gather
        assert per_block(f2, f3) == {"all_gather": 2, "reduce_scatter": 2}
        assert per_block(b2, b3) == {"all_gather": 2, "reduce_scatter": 2}
    else:  # Megatron: attention and MLP each one all-reduce forward and one backward
        assert per_block(f2, f3) == {"all_reduce": 2}
        assert per_block(b2, b3) == {"all_reduce": 2}


def test_sequence_parallel_sends_the_same_bytes_per_block(collectives):
    per_block = {sp: collectives[3, sp][2] - collectives[2, sp][2] for sp in (False, True)}
    # one block: 4 all-reduces of (2, 16, 32) fp32 = 4 x 2(n-1)/n x 4 KiB, or the same bytes as
    # 4 reduce-scatters plus 4 all-gathers
    assert per_block[False] == per_block[True] == 4 * 4096


def _rng_streams():
    mesh = Mesh.build(tp=dist.get_world_size())
    torch.manual_seed(3)
    rng = TensorParallelRNG(seed=3, tp_rank=mesh.coord("tp"), device=torch.device("cpu"))
    with rng.fork():
        sharded = torch.rand(4)
    replicated = torch.rand(4)
    with rng.fork():
        sharded_again = torch.rand(4)
    return sharded, replicated, sharded_again


def test_tp_random_state_differs_only_in_sharded_regions():
    (s0, r0, a0), (s1, r1, a1) = spawn(_rng_streams, 2)
    assert torch.equal(r0, r1)  # replicated activations: the same dropout mask on every tp rank
    assert not torch.equal(s0, s1) and not torch.equal(a0, a1)  # head / sequence shards: different
    assert not torch.equal(s0, a0)  # the forked stream advances


def _train_twice_with_dropout():
    """In a spawned rank (tp = world): the same 3-step dropout run, twice, through the Trainer."""
    from paratrain.train import Trainer

    mesh = Mesh.build(tp=dist.get_world_size())
    runs = []
    for _ in range(2):
        cfg = RunConfig()
        cfg.model.name, cfg.model.dropout = "tiny", 0.1
        cfg.layout.tp = mesh.size("tp")
        tr = cfg.train
        tr.steps, tr.global_batch, tr.seq_len, tr.seed, tr.progress, tr.lr, tr.warmup_steps = 3, 8, 32, 5, False, 3e-3, 2
        validate(cfg)
        trainer = Trainer.from_config(cfg, mesh)  # the steps of fit(), without its evaluation and sample
        runs.append([trainer.run_step(k).loss for k in range(1, tr.steps + 1)])
    return runs


def test_dropout_with_tp_trains():
    a, b = spawn(_train_twice_with_dropout, 2)[0]  # two runs of one spawn: no launch each
    assert len(a) == 3 and a == b  # deterministic given the seed
    assert all(x == x for x in a)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _user_model_with_own_plan():
    mesh = Mesh.build(tp=dist.get_world_size())
    torch.manual_seed(1)
    ref = TwoLayer()
    torch.manual_seed(1)
    par = parallelize_tensor(TwoLayer(), mesh, {"up": "colwise", "down": "rowwise"})
    x = torch.randn(4, 8)
    bad = None
    try:
        parallelize_tensor(TwoLayer(), mesh, {"up": "colwise", "nothing.here": "rowwise"})
    except ValueError as e:
        bad = str(e)
    return torch.allclose(ref(x), par(x), atol=1e-6), bad


def test_user_model_with_its_own_plan():
    for same, error in spawn(_user_model_with_own_plan, 2):
        assert same
        assert "no module matches ['nothing.here']" in error


def _sequence_parallel_grad_sync():
    mesh = Mesh.build(tp=dist.get_world_size())
    holder = nn.Module()
    holder.p = nn.Parameter(torch.zeros(3))
    set_role(holder.p, sequence_parallel=True)
    holder.p.grad = torch.full((3,), float(mesh.coord("tp") + 1))
    sync_sequence_parallel_grads(holder, mesh)
    return holder.p.grad


def test_sequence_parallel_grads_are_summed_over_tp():
    for g in spawn(_sequence_parallel_grad_sync, 2):
        assert torch.equal(g, torch.full((3,), 3.0))


def _replicated_stream_with_dropout():
    mesh = Mesh.build(tp=dist.get_world_size())
    torch.manual_seed(0)  # the trainer seeds the default generator alike on every rank
    model = parallelize_tensor(GPT(GPTConfig(n_layer=2, n_head=4, d_model=32, max_seq_len=16, dropout=0.5)),
                               mesh, GPT_PLAN, seed=0)
    seen = []
    model.blocks[-1].register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    model(torch.randint(0, 256, (2, 16)))
    return seen[0]


def test_dropout_masks_agree_on_replicated_activations():
    # Residual and embedding dropout act on activations every tp rank holds in full: their masks
    # must agree, or the ranks' copies of the residual stream would drift apart.
    a, b = spawn(_replicated_stream_with_dropout, 2)
    assert torch.equal(a, b)
