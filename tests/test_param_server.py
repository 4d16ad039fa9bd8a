"""Parameter servers: synchronous is the same math as one process; staleness stays bounded.

`--staleness 0` must give the per-step losses of dp=1 (rtol 1e-5) with one and two servers.
With a straggler, stale-synchronous runs never let a worker lead the slowest by more than K
clocks (asserted from the clocks server 0 recorded at every grant), asynchronous runs let the
fast worker do more of the work, and a failing worker ends the run with one line, servers and all.
Synchronous servers checkpoint in the canonical form: a restart after a failure resumes exactly,
and the checkpoint loads into an all-reduce layout and back.
"""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import run_tiny


@pytest.fixture(scope="module")
def reference():
    return run_tiny()


@pytest.mark.parametrize("servers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_synchronous_ps_matches_single_process(reference, servers):
    result = run_tiny(dp=2, sync="ps", servers=servers)
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    assert result["ps_max_clock_gap"] == 0 and result["ps_max_version_staleness"] == 0


def test_stale_synchronous_bound_holds_with_a_straggler():
    result = run_tiny(dp=2, sync="ps", servers=1, staleness=2, simulate_straggler="1:0.15", steps=12)
    gaps = result["ps_clock_gaps"]
    assert len(gaps) == 2 * 12  # every promised push was granted once
    assert max(gaps) <= 2 and max(gaps) > 0  # the fast worker did run ahead, never past the bound
    assert len(result["losses"]) == 12 and result["final_loss"] < result["first_loss"] - 0.3


def test_asynchronous_ps_lets_the_fast_worker_do_more():
    result = run_tiny(dp=2, sync="ps", servers=1, staleness=-1, simulate_straggler="1:0.2", steps=12)
    # 24 pushes in all; worker 0 (not slowed) did more than its half
    assert result["worker0_clocks"] > 12
    assert max(result["ps_version_staleness"]) >= 1
    assert result["final_loss"] < result["first_loss"] - 0.3


def test_a_failing_worker_stops_the_servers_too():
    r = subprocess.run(
        [sys.executable, "-m", "paratrain", "train", "--model", "tiny", "--dp", "2", "--sync", "ps", "--servers", "1",
         "--steps", "20", "--seq-len", "32", "--simulate-failure", "1:3", "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 1
    assert "rank 1 failed: RuntimeError: simulated failure of rank 1 at step 3" in r.stderr


PS_RUN = ["--model", "tiny", "--steps", "8", "--global-batch", "8", "--seq-len", "32", "--no-progress"]


def train(*flags, timeout=240):
    r = subprocess.run([sys.executable, "-m", "paratrain", "train", *PS_RUN, *flags],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(path):
    return {m["step"]: m["loss"] for m in map(json.loads, open(path)) if "step" in m and "loss" in m}


def test_ps_checkpoints_resume_exactly_after_a_restart_and_across_layouts(tmp_path):
    ps = ["--sync", "ps", "--dp", "2", "--servers", "2"]
    train(*ps, "--checkpoint-dir", str(tmp_path / "a"), "--checkpoint-every", "4", "--metrics", str(tmp_path / "a.jsonl"))
    whole = losses(tmp_path / "a.jsonl")
    assert sorted(whole) == list(range(1, 9))
    # worker 1 fails at step 6: every rank restarts and the servers reload step 4
    r = train(*ps, "--checkpoint-dir", str(tmp_path / "b"), "--checkpoint-every", "4", "--simulate-failure", "1:6",
              "--max-restarts", "1", "--metrics", str(tmp_path / "b.jsonl"))
    assert "resumed from" in r.stdout and "(step 4)" in r.stdout
    after = losses(tmp_path / "b.jsonl")
    assert sorted(after) == [5, 6, 7, 8]
    assert [after[k] for k in after] == pytest.approx([whole[k] for k in after], rel=1e-5)
    # the servers' step 4 loads into all-reduce ZeRO-1 on two ranks, whose step 8 loads into one
    # worker with two servers again
    (tmp_path / "c").mkdir()
    shutil.copytree(tmp_path / "a" / "step_00000004", tmp_path / "c" / "step_00000004")
    train("--dp", "2", "--zero", "1", "--checkpoint-dir", str(tmp_path / "c"), "--resume", "--checkpoint-every", "4",
          "--steps", "12", "--metrics", str(tmp_path / "c.jsonl"))
    mixed = losses(tmp_path / "c.jsonl")
    assert [mixed[k] for k in (5, 6, 7, 8)] == pytest.approx([whole[k] for k in (5, 6, 7, 8)], rel=1e-5)
    shutil.rmtree(tmp_path / "c" / "step_00000012")
    train("--sync", "ps", "--dp", "1", "--servers", "2", "--checkpoint-dir", str(tmp_path / "c"), "--resume",
          "--steps", "12", "--metrics", str(tmp_path / "d.jsonl"))
    back = losses(tmp_path / "d.jsonl")
    assert sorted(back) == [9, 10, 11, 12]
    assert [back[k] for k in back] == pytest.approx([mixed[k] for k in back], rel=1e-5)


def test_ps_with_staleness_refuses_checkpoints():
    r = subprocess.run([sys.executable, "-m", "paratrain", "train", *PS_RUN, "--sync", "ps", "--dp", "2", "--servers", "1",
                        "--staleness", "2", "--checkpoint-dir", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--checkpoint-dir: parameter servers checkpoint synchronous runs only (--staleness 0)" in r.stderr
