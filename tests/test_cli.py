"""`paratrain train` end to end: the metrics contract, failure reports, joining torchrun."""

import json
import os
import subprocess
import sys

import pytest

STEP_KEYS = {"step", "loss", "tokens", "step_time_s", "tokens_per_s", "peak_mem_bytes", "comm_bytes",
             "grad_norm", "lr"}
TINY = ["--model", "tiny", "--steps", "4", "--global-batch", "8", "--seq-len", "32", "--device", "cpu"]


def paratrain(*argv, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "paratrain", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def read_metrics(path):
    return [json.loads(line) for line in open(path)]


def test_train_writes_the_metrics_contract(tmp_path):
    path = tmp_path / "m.jsonl"
    r = paratrain("train", *TINY, "--dp", "2", "--metrics", str(path), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "loss" in r.stdout and "throughput" in r.stdout and "peak memory" in r.stdout
    start, *steps, end = read_metrics(path)
    assert start["event"] == "start" and start["layout"] == "dp=2,tp=1,pp=1,zero=0"
    assert start["world_size"] == 2 and start["params"] > 0 and start["config"]["model"]["name"] == "tiny"
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    for s in steps:
        assert STEP_KEYS <= set(s)
        assert s["tokens"] == 8 * 32 and s["peak_mem_bytes"] > 10 * 2**20
        assert s["tokens_per_s"] == pytest.approx(s["tokens"] / s["step_time_s"])
    # dp=2: a ring all-reduce of the 4P gradient bytes sends 2(n-1)/n * 4P = 4P from each rank
    assert steps[0]["comm_bytes"] == 2 * 4 * start["params"]
    assert end["event"] == "end" and end["steps"] == 4 and end["final_loss"] == steps[-1]["loss"]
    assert end["tokens_per_s"] > 0 and len(end["peak_mem_bytes_per_rank"]) == 2
    # model FLOP/s per device by the planner's formula; no MFU without a known GPU peak
    from paratrain.models.gpt import PRESETS
    from paratrain.planner import flops_per_token

    assert end["tflops_per_device"] == pytest.approx(end["tokens_per_s"] * flops_per_token(PRESETS["tiny"], 32) / 2 / 1e12)
    assert end["mfu"] is None and "TFLOP/s per device" in r.stdout


def test_failed_worker_names_its_rank_and_first_error():
    r = paratrain("train", *TINY, "--dp", "2", "--simulate-failure", "1:2", "--no-progress")
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [
        "paratrain: rank 1 failed: RuntimeError: simulated failure of rank 1 at step 2 "
        f"(--simulate-failure) (at train.py:{lines[0].rsplit(':', 1)[1]}"
    ], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow  # restarts from a checkpoint are tested by default (test_checkpoint.py, test_param_server.py)
def test_restart_after_a_transient_failure_completes(tmp_path):
    # The engine restarts both workers; without a checkpoint the run starts over, so it ends
    # exactly where an uninterrupted run ends.
    clean, restarted = tmp_path / "clean.jsonl", tmp_path / "restarted.jsonl"
    assert paratrain("train", *TINY, "--dp", "2", "--metrics", str(clean), "--no-progress").returncode == 0
    r = paratrain("train", *TINY, "--dp", "2", "--simulate-failure", "0:3", "--max-restarts", "1",
                  "--metrics", str(restarted), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("paratrain: training tiny") == 2  # the first attempt and the restart
    assert read_metrics(restarted)[-1]["final_loss"] == read_metrics(clean)[-1]["final_loss"]
    r = paratrain("train", *TINY, "--dp", "2", "--simulate-failure", "0:3", "--no-progress")
    assert r.returncode == 1 and "rank 0 failed" in r.stderr  # no restarts allowed: the run fails


def test_joins_a_torchrun_group(tmp_path):
    path = tmp_path / "m.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "paratrain", "train", *TINY, "--dp", "2", "--metrics", str(path), "--no-progress"],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode == 0, r.stderr
    start, *steps, end = read_metrics(path)
    assert start["world_size"] == 2 and len(steps) == 4 and end["event"] == "end"


def test_torchrun_world_must_match_the_layout():
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "paratrain", "train", *TINY, "--dp", "1", "--no-progress"],
        capture_output=True, text=True, timeout=180,
    )
    assert r.returncode != 0 and "needs world size 1 but the launcher started 2" in r.stderr
