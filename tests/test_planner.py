"""The planner: hand-worked formulas, the search on 1,024 GPUs, the CLI contract, --layout auto."""

import json
import time

import pytest
import torch

from paratrain.cli import build_parser, config_from_args, main
from paratrain.config import validate
from paratrain.models.gpt import PRESETS, GPTConfig, build_model, count_params
from paratrain.parallel.pipeline.schedule import build_schedule, peak_in_flight
from paratrain.planner.cost import (
    TABLE_LIMIT,
    Candidate,
    activation_bytes_per_layer,
    all_reduce_time,
    crosses_node,
    estimate,
    flops_per_token,
    model_state_bytes,
    param_count,
    rank_params,
    ring_time,
    schedule_info,
    tree_all_reduce_time,
)
from paratrain.planner.hardware import Link, cpu_local, get_hardware
from paratrain.planner.search import plan

GPT3 = GPTConfig(n_layer=96, n_head=96, d_model=12288, vocab_size=50304, max_seq_len=2048)


@pytest.fixture(autouse=True)
def no_calibration(tmp_path, monkeypatch):
    """cpu-local from conservative defaults, whatever this machine's cache holds."""
    monkeypatch.setenv("PARATRAIN_CACHE", str(tmp_path / "cache"))


def test_gpt2_parameter_count_matches_the_model():
    # 12 blocks of 12h^2 + 13h, tied token table of the padded 50304-token vocabulary (not
    # GPT-2's 50257: the preset pads it for GPU efficiency), 1024 positions, final norm
    h = 768
    by_hand = 12 * (12 * h * h + 13 * h) + 50304 * h + 1024 * h + 2 * h
    assert param_count(PRESETS["gpt2"]) == by_hand == 124_475_904
    assert count_params(build_model("gpt2", 0)) == by_hand
    for name in ("tiny", "small"):
        assert param_count(PRESETS[name]) == count_params(build_model(name, 0))


def test_rank_parameters_add_up_over_pipeline_stages():
    cfg = PRESETS["gpt2"]
    assert rank_params(cfg, 12, True, True, 1, 1) == param_count(cfg)
    split = [rank_params(cfg, 6, True, False, 1, 2), rank_params(cfg, 6, False, True, 1, 2)]
    assert sum(split) == param_count(cfg) + cfg.vocab_size * cfg.d_model  # the last stage's copy of the tied table


def test_flops_per_token_by_hand():
    cfg = GPTConfig(n_layer=2, n_head=4, d_model=64, vocab_size=128, max_seq_len=32)
    n = 12 * 2 * 64 * 64 + 128 * 64  # weights in matrix products: 106,496
    assert flops_per_token(cfg, 32) == 6 * n + 12 * 2 * 32 * 64 == 688_128
    # recomputation: one more forward of the blocks (not of the head)
    assert flops_per_token(cfg, 32, recompute=True) == 688_128 + 24 * 2 * 64 * 64 + 4 * 2 * 32 * 64


def test_zero_model_states_mixed_and_fp32():
    P, N = 1000.0, 8
    total = lambda z, prec: sum(model_state_bytes(P, z, N, prec).values())  # noqa: E731
    assert total(0, "bf16") == 16 * P
    assert total(1, "bf16") == pytest.approx(4 * P + 12 * P / N)
    assert total(2, "bf16") == pytest.approx(2 * P + 16 * P / N)  # fp32 gradient shards (the paper: 14)
    assert total(3, "bf16") == pytest.approx(16 * P / N)
    assert total(0, "fp32") == 16 * P  # 4 + 4 + 8: the fp32 parameter is its own master
    assert total(1, "fp32") == pytest.approx(8 * P + 8 * P / N)
    assert total(3, "fp32") == pytest.approx(16 * P / N)


def test_activation_formula_matches_the_tensors_autograd_keeps():
    cfg = PRESETS["small"]
    model = build_model("small", 0)
    b, s = 4, 64
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    x = model.embed(torch.randint(0, 256, (b, s)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.blocks[0](x)
    predicted = activation_bytes_per_layer(s, b, cfg.d_model, 1, False, 4)
    # the formula counts the sbh-sized tensors; norms' statistics and softmax sums are extra
    assert predicted <= sum(kept.values()) <= 1.05 * predicted


def test_bubble_fraction_and_in_flight_from_the_real_table():
    for p, m in [(2, 4), (4, 8), (4, 4), (8, 32)]:
        for sched in ("gpipe", "1f1b"):
            bubble, in_flight, _ = schedule_info(sched, p, m, 1)
            assert bubble == pytest.approx((p - 1) / (m + p - 1))
            assert in_flight[0] == (m if sched == "gpipe" else min(p, m))
        bubble, _, _ = schedule_info("interleaved", p, m, 2)
        assert bubble == pytest.approx((p - 1) / (2 * m + p - 1))
    # the closed forms used above TABLE_LIMIT agree with the tables below it
    for sched, p, m, v in [("1f1b", 8, 24, 1), ("gpipe", 4, 12, 1), ("interleaved", 4, 8, 2), ("interleaved", 8, 16, 2)]:
        assert 2 * p * m * v <= TABLE_LIMIT
        table = build_schedule(sched, p, m, v)
        closed = {"gpipe": [m] * p, "1f1b": [min(p - r, m) for r in range(p)],
                  "interleaved": [min(2 * (p - r - 1) + (v - 1) * p + 1, v * m) for r in range(p)]}[sched]
        assert [peak_in_flight(a) for a in table] == closed


def test_ring_all_reduce_alpha_beta_by_hand():
    link = Link(alpha=1e-4, beta=1e9)
    n, S = 4, 8e6
    assert ring_time("all_reduce", S, n, link) == pytest.approx(2 * (n - 1) * 1e-4 + 2 * (n - 1) / n * S / 1e9)
    assert ring_time("all_reduce", S, n, link) == pytest.approx(0.0126)
    assert ring_time("all_reduce", S, 1, link) == 0.0
    # reduce-scatter + all-gather of the same tensor cost what the all-reduce costs
    rs_ag = ring_time("reduce_scatter", S, n, link) + ring_time("all_gather", S / n, n, link)
    assert rs_ag == pytest.approx(ring_time("all_reduce", S, n, link))
    # tree: 2 log2(n) alpha + 2 S / beta; the cheaper one is taken only where the backend has both
    assert tree_all_reduce_time(S, n, link) == pytest.approx(4 * 1e-4 + 2 * S / 1e9)
    small = 1e3
    assert all_reduce_time(small, 1024, link, ("ring", "tree")) == pytest.approx(tree_all_reduce_time(small, 1024, link))
    assert all_reduce_time(small, 1024, link, ("ring",)) == pytest.approx(ring_time("all_reduce", small, 1024, link))


def test_groups_and_nodes():
    assert not crosses_node(128, 8, 1, "tp", 8)
    assert crosses_node(64, 16, 1, "tp", 8)
    assert crosses_node(8, 8, 16, "pp", 8) and crosses_node(8, 8, 16, "dp", 8)
    assert not crosses_node(2, 2, 2, "pp", 8)  # one node


def test_175b_on_1024_a100s_plans_fast_and_fits():
    t0 = time.perf_counter()
    res = plan(GPT3, 2048, 1536, 1024, get_hardware("a100-80gb"), 8)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10, elapsed
    best = res.ranked[0]
    assert best.fits and best.candidate.tp <= 8 and best.candidate.world == 1024
    assert best.peak_mem_bytes <= 80e9 and 0.2 < best.mfu < 0.8
    assert res.rejected["out of device memory"] > 0  # e.g. pure data parallelism: 16 bytes x 175B per GPU
    assert all(e.candidate.tp <= 8 for e in res.ranked)  # tp stays inside the node


def test_more_memory_never_hurts_and_sharding_saves_memory():
    hw = get_hardware("h100-80gb")
    cfg = PRESETS["gpt2"]
    mem = [estimate(cfg, 1024, 64, Candidate(dp=8, zero=z, precision="bf16"), hw).peak_mem_bytes for z in range(4)]
    assert mem == sorted(mem, reverse=True)
    a = estimate(cfg, 1024, 64, Candidate(dp=1, tp=1, microbatches=1, precision="bf16"), hw)
    b = estimate(cfg, 1024, 64, Candidate(dp=1, tp=1, microbatches=1, activation_checkpointing=True, precision="bf16"), hw)
    assert b.peak_mem_bytes < a.peak_mem_bytes and b.step_time_s > a.step_time_s


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code, capsys.readouterr()


@pytest.mark.parametrize("argv", [
    ["plan", "--model", "nope"],
    ["plan", "--gpu", "tpu-v9", "--model", "small"],
    ["plan", "--layers", "96", "--hidden", "12288"],
    ["plan", "--model", "small", "--gpus", "0"],
    ["plan", "--model", "small", "--gpus", "lots"],
    ["plan", "--layers", "4", "--hidden", "100", "--heads", "3", "--vocab", "256", "--seq-len", "64"],
])
def test_bad_plan_input_is_one_line_and_exit_2(argv, capsys):
    code, out = _run(argv, capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("paratrain: error: ") and "--" in lines[0], out.err


def test_plan_json_has_the_contract_keys(capsys):
    assert main(["plan", "--model", "gpt2", "--gpus", "8", "--gpu", "h100-80gb", "--global-batch", "64",
                 "--seq-len", "1024", "--top", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) >= 3
    keys = {"layout", "microbatches", "schedule", "step_time_s", "tflops_per_gpu", "mfu", "peak_mem_bytes", "fits", "reason"}
    for r in rows:
        assert keys <= set(r)
    assert rows[0]["fits"] and rows[0]["step_time_s"] <= rows[1]["step_time_s"]
    assert rows[0]["layout"].startswith("dp=")


def test_plan_human_output_explains_the_choice(capsys):
    assert main(["plan", "--model", "small", "--gpus", "2", "--gpu", "cpu-local"]) == 0
    out = capsys.readouterr().out
    assert "not calibrated" in out and "why dp=" in out and "layout" in out


def test_calibration_file_is_used_when_it_matches_this_machine(tmp_path, monkeypatch):
    from paratrain.planner import hardware

    path = tmp_path / "cache" / "cpu-local.json"
    path.parent.mkdir(parents=True)
    cores = hardware.local_cores()
    measured = {"gemm": [[1e6, 1e10], [1e9, 4e10]], "attn": [[1e6, 5e9]],
                "elem": {"gelu": 1e-9, "layer_norm": 2e-9, "softmax": 3e-9, "adamw": 4e-9, "bw": 1e10}}
    data = {"cores": cores, "when": "now", "threads": {str(max(1, cores // w)): measured for w in (1, 2, 4)},
            "dispatch_s": 5e-6, "baseline_bytes": 3e8, "efficiency": {"1": 0.5},
            "collectives": {"all_reduce": {"alpha": 1e-4, "beta": 1e9}, "reduce_scatter": {"alpha": 2e-4, "beta": 1e9},
                            "all_gather": {"alpha": 2e-4, "beta": 1e9}, "p2p": {"alpha": 5e-5, "beta": 2e9}}}
    path.write_text(json.dumps(data))
    hw = cpu_local()
    assert hw.calibrated and hw.reserve_bytes == 3e8 and hw.intra == Link(1e-4, 1e9)
    assert hw.gemm_rate(1e6) == pytest.approx(1e10) and hw.gemm_rate(1e9) == pytest.approx(4e10)
    assert 1e10 < hw.gemm_rate(3e7) < 4e10  # log-linear in between
    assert hw.elementwise_time("gelu", 1000) == pytest.approx(1e-6)
    assert hw.link(False, "reduce_scatter") == Link(2e-4, 1e9) and hw.p2p_link(False) == Link(5e-5, 2e9)
    assert hw.local_slowdown(cores) == 2.0  # one thread per worker: efficiency 0.5
    assert hw.local_slowdown(1) == (2.0 if cores == 1 else 1.0)  # all cores: not measured, 1
    path.write_text(json.dumps({**data, "cores": data["cores"] + 1}))
    assert not cpu_local().calibrated  # another machine's numbers are not used


@pytest.mark.parametrize("flags", [
    ["--model", "small"],
    ["--model", "tiny", "--global-batch", "8"],
    ["--model", "small", "--pp", "2"],
    ["--model", "gpt2", "--global-batch", "4", "--seq-len", "256"],
])
def test_layout_auto_validates(flags, capsys):
    args = build_parser().parse_args(["train", "--layout", "auto", "--device", "cpu", *flags])
    cfg = config_from_args(args)
    validate(cfg)
    assert "--layout auto chose dp=" in capsys.readouterr().out
    if "--pp" in flags:
        assert cfg.layout.pp == 2 and cfg.layout.microbatches >= 2


def test_gpu_peak_by_cuda_device_name():
    from paratrain.planner import gpu_peak_flops

    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_peak_flops("NVIDIA H100 NVL") == 835e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12 and gpu_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak_flops("Tesla T4") is None
