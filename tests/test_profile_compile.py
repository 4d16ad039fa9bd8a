"""The GPU-efficiency paths, checked on the CPU: `--compile` (compiled blocks and loss) trains as
eager does in every kind of layout, bf16 runs without waiting on the device for overflow checks, and `--profile` writes a
trace, a table and an ops summary per rank for the last steps."""

import json

import pytest
import torch

from test_cli import TINY, paratrain, read_metrics


def steps_of(path):
    return [m for m in read_metrics(path) if "step" in m and "loss" in m]


def _eager_then_compiled(layout: dict, folder: str) -> None:
    """In spawned ranks: the run `paratrain train` makes of these flags (defaults but 3 steps of
    8 x 32 tokens), through Trainer.fit, eager and then with --compile, each writing its metrics."""
    from paratrain.config import RunConfig, validate
    from paratrain.mesh import Mesh
    from paratrain.train import Trainer

    mesh = None
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = RunConfig()
        cfg.model.name = "tiny"
        for k, v in layout.items():
            setattr(cfg.train if k == "activation_checkpointing" else cfg.layout, k, v)
        tr = cfg.train
        tr.steps, tr.global_batch, tr.seq_len, tr.device, tr.progress, tr.eval_every = 3, 8, 32, "cpu", False, 0
        tr.compile, tr.metrics = compile_, f"{folder}/{name}.jsonl"
        validate(cfg)
        mesh = mesh or Mesh.build(cfg.layout.dp, cfg.layout.tp, cfg.layout.pp)
        Trainer.from_config(cfg, mesh).fit()


@pytest.mark.parametrize("layout", [
    dict(dp=2, zero=3, activation_checkpointing=True),  # gathers and recomputation around the graphs
    pytest.param(dict(dp=1), marks=pytest.mark.slow),
    pytest.param(dict(tp=2), marks=pytest.mark.slow),  # graphs broken at each collective
    pytest.param(dict(pp=2, microbatches=2), marks=pytest.mark.slow),
], ids=["dp2-zero3-ac", "dp1", "tp2", "pp2"])
def test_compile_trains_like_eager(tmp_path, layout):
    from helpers import spawn

    # both runs in one spawn of the layout's ranks: a launch each would cost more than the steps
    spawn(_eager_then_compiled, layout.get("dp", 1) * layout.get("tp", 1) * layout.get("pp", 1), layout,
          str(tmp_path), timeout=400)
    runs = {name: steps_of(tmp_path / f"{name}.jsonl") for name in ("eager", "compiled")}
    assert len(runs["eager"]) == len(runs["compiled"]) == 3
    for key in ("loss", "grad_norm"):
        eager, compiled = [s[key] for s in runs["eager"]], [s[key] for s in runs["compiled"]]
        assert compiled == pytest.approx(eager, rel=1e-5), key


def test_profile_writes_trace_table_and_ops_per_rank(tmp_path):
    out = tmp_path / "prof"
    r = paratrain("train", *TINY, "--steps", "5", "--dp", "2", "--precision", "bf16", "--no-progress",
                  "--profile", str(out), "--profile-steps", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        trace = json.load(open(out / f"trace_rank{rank}.json"))
        steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("paratrain step")}
        assert steps == {"paratrain step 4", "paratrain step 5"}  # the last two steps only
        ops = json.load(open(out / f"ops_rank{rank}.json"))
        assert ops["device"] == "cpu" and ops["steps"] == 2 and ops["wall_s"] > 0
        names = {o["name"] for o in ops["ops"]}
        assert {"aten::addmm", "aten::mm", "c10d::allreduce_"} <= names  # forward, backward, dp=2 gradients
        busy = sum(o["self_cpu_s"] for o in ops["ops"] if o["name"].startswith("aten::"))
        assert 0 < busy < ops["wall_s"]
        assert "aten::mm" in (out / f"ops_rank{rank}.txt").read_text()


def test_profile_steps_must_be_positive(capsys):
    from paratrain.cli import main  # in this process: refused before any worker starts

    with pytest.raises(SystemExit) as exit_:
        main(["train", *TINY, "--profile", "x", "--profile-steps", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == ["paratrain: error: --profile-steps: must be at least 1, got 0"]


def test_bf16_unscale_does_not_check_overflow(tmp_path):
    """bf16 has fp32's range: no finiteness check (a host-device wait), no skipped step."""
    import torch.distributed as dist

    from paratrain.mesh import Mesh
    from paratrain.models.gpt import build_model
    from paratrain.parallel.zero import ZeroDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        engine = ZeroDataParallel(build_model("tiny", 1), Mesh.build(), 0, torch.bfloat16)
        engine(torch.randint(0, 256, (2, 16))).float().sum().backward()
        engine.finish_grad_sync()
        engine.groups[0].grad_shard[0] = float("inf")
        assert engine.unscale_grads(1.0) is False
        assert torch.isinf(engine.groups[0].master.grad).any()  # it reaches the update, as in plain torch
    finally:
        dist.destroy_process_group()


def test_collectives_do_not_make_compiled_code_recompile(tmp_path):
    """A compiled function that calls a collective (tensor parallelism's blocks do) breaks its
    graph around it instead of tracing the bookkeeping: no recompilation at every call."""
    import torch.distributed as dist

    from paratrain.comm import CommStats, all_reduce

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        stats = CommStats()

        @torch.compile(backend="eager")
        def block(x):
            y = x * 2
            all_reduce(y, None, stats)
            return y + 1

        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(4):
                assert torch.equal(block(torch.ones(3)), torch.full((3,), 3.0))
        assert stats.flight.seq == 4  # every call was recorded, eagerly
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
