"""Pipeline parallelism is the same math as one process, for every schedule and with dp and tp.

pp=2 and pp=4 with GPipe, 1F1B and interleaved 1F1B, and dp=2,pp=2 and tp=2,pp=2, give the
per-step losses of dp=1 for 10 steps of `tiny` (8 layers, tied embedding across the first and
last stage). The stage split is balanced by cost and keeps the full model's parameter names.
"""

import pytest
import torch

from paratrain.config import RunConfig, validate
from paratrain.launch import launch
from paratrain.models.gpt import PRESETS, GPTConfig, build_model
from paratrain.parallel.pipeline.partition import balanced_split, build_stages, split_gpt


def run(dp=1, tp=1, pp=1, schedule="1f1b", microbatches=4, steps=10, **train):
    cfg = RunConfig()
    cfg.model.name = "tiny"
    cfg.layout.dp, cfg.layout.tp, cfg.layout.pp = dp, tp, pp
    cfg.layout.schedule, cfg.layout.microbatches = schedule, microbatches
    cfg.train.steps, cfg.train.global_batch, cfg.train.seq_len = steps, 16, 32
    cfg.train.seed, cfg.train.progress, cfg.train.lr, cfg.train.warmup_steps = 9, False, 3e-3, 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    validate(cfg)
    return launch(cfg)


@pytest.fixture(scope="module")
def reference():
    return run()


CASES = [(1, 1, 2, s) for s in ("gpipe", "1f1b", "interleaved")] + \
        [(1, 1, 4, s) for s in ("gpipe", "1f1b", "interleaved")] + \
        [(2, 1, 2, "1f1b"), (1, 2, 2, "1f1b")]


SLOW = {(1, 1, 2, "1f1b"), (1, 1, 4, "gpipe"), (1, 1, 4, "1f1b"), (1, 1, 4, "interleaved")}  # run with -m slow


@pytest.mark.parametrize("dp,tp,pp,schedule", [pytest.param(*c, marks=pytest.mark.slow) if c in SLOW else c
                                               for c in CASES], ids=[f"dp{a}-tp{b}-pp{c}-{s}" for a, b, c, s in CASES])
def test_losses_match_single_process(reference, dp, tp, pp, schedule):
    result = run(dp, tp, pp, schedule, microbatches=4 if dp == 1 else 2)
    # tp x pp sums the tied embedding's gradient in a third order (vocab shards, then stages):
    # steps 1-9 agree to 1e-5, step 10 drifts to 5e-5, so that case gets 1e-4.
    rtol = 1e-4 if tp > 1 else 1e-5
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=rtol)


def test_split_is_balanced_by_cost_with_the_head_counted():
    # gpt2's head (2 d V FLOPs per token) weighs about five blocks: the last stage gets fewer blocks
    stages = split_gpt(PRESETS["gpt2"], 1024, 4)
    assert [len(r) for r in stages][-1] < [len(r) for r in stages][0]
    assert sum(len(r) for r in stages) == 12 and stages[0].start == 0 and stages[-1].stop == 12
    # equal costs: an even split
    assert balanced_split(8, 4, 1.0, 0.0, 0.0) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # a heavy last stage pushes blocks forward
    assert balanced_split(6, 2, 1.0, 0.0, 2.0) == [range(0, 4), range(4, 6)]
    with pytest.raises(ValueError):
        balanced_split(2, 3, 1.0, 0.0, 0.0)


def test_stages_keep_global_names_and_compose_to_the_model():
    model = build_model("tiny", seed=0)
    splits = split_gpt(PRESETS["tiny"], 32, 4)
    stages = [s for rank in range(2) for s in build_stages(model, splits, rank, 2)]  # interleaved, v=2
    names = {n for s in stages for n, _ in s.named_parameters()}
    assert names == {n for n, _ in model.named_parameters()} | {"head.weight"}
    ordered = sorted(stages, key=lambda s: min(int(k) for k in s.blocks.keys()))
    x = torch.randint(0, 256, (2, 32))
    y = x
    for s in ordered:
        y = s(y)
    torch.testing.assert_close(y, model(x))


def test_layouts_are_validated_before_start():
    from paratrain.config import ConfigError

    cfg = RunConfig()
    cfg.model.name, cfg.layout.pp, cfg.layout.microbatches = "tiny", 4, 2
    with pytest.raises(ConfigError, match="--microbatches"):
        validate(cfg)
    cfg.layout.pp, cfg.layout.microbatches, cfg.layout.schedule = 16, 16, "1f1b"
    with pytest.raises(ConfigError, match="fewer than the 16 stages"):
        validate(cfg)
    cfg.layout.pp, cfg.layout.microbatches, cfg.layout.schedule = 2, 3, "interleaved"
    with pytest.raises(ConfigError, match="multiple of pp=2"):
        validate(cfg)
    assert GPTConfig(n_layer=1, n_head=1, d_model=8)  # unrelated configs still build


def test_timeline_and_idle_fraction_from_a_real_run(tmp_path):
    """--timeline writes the last step's schedule as a Chrome trace and a PNG; the end record
    carries each stage's measured idle fraction beside the schedule's theoretical bubble."""
    import json

    result = run(pp=2, schedule="interleaved", microbatches=4, steps=2, timeline=str(tmp_path))
    trace = json.load(open(tmp_path / "timeline.json"))["traceEvents"]
    boxes = [e for e in trace if e["ph"] == "X"]
    for stage in (0, 1):  # 4 micro-batches x 2 chunks, forward and backward, on each stage
        assert sorted(e["cat"] for e in boxes if e["tid"] == stage and e["cat"] in "FB") == ["B"] * 8 + ["F"] * 8
        assert any(e["cat"] == "recv" for e in boxes if e["tid"] == stage)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in boxes)
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    idle = result["pipeline_idle_per_stage"]
    assert len(idle) == 2 and all(0 <= f < 1 for f in idle)
    assert result["pipeline_bubble_theory"] == pytest.approx(1 / 9)  # (p-1)/(v m + p-1), v=2
