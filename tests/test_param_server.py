"""Parameter servers: synchronous is the same math as one process; staleness stays bounded.

`--staleness 0` must give the per-step losses of dp=1 (rtol 1e-5) with one and two servers, and
with gradient accumulation on the workers (they run the one Trainer).
With a straggler, stale-synchronous runs never let a worker lead the slowest by more than K
clocks (asserted from the clocks server 0 recorded at every grant), asynchronous runs let the
fast worker do more of the work, and a failing worker ends the run with one line, servers and all.
Synchronous servers checkpoint in the canonical form: a restart after a failure resumes exactly,
and the checkpoint loads into an all-reduce layout and back.
"""

import glob
import importlib.util
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


@pytest.mark.slow
def test_ps_workers_run_the_trainer_and_its_components(reference, tmp_path):
    """A worker is a dp rank of the one Trainer: its micro-batches (gradient accumulation) and
    activation checkpointing are the engine's, and the run still matches one process; its
    records go to the metrics file and the trackers as `paratrain train` writes them."""
    report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    result = run_tiny(dp=2, sync="ps", servers=1, microbatches=2, activation_checkpointing=True,
                      metrics=str(tmp_path / "m.jsonl"), report_to=report_to, log_dir=str(tmp_path / "runs"))
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    assert result["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5)
    records = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert records[0]["event"] == "start" and records[0]["layout"] == "dp=2,tp=1,pp=1,zero=0,ps=1,staleness=0"
    assert records[0]["config"]["layout"]["dp"] == 2 and records[-1]["val_loss"] == result["val_loss"]
    assert [r["loss"] for r in records[1:-1]] == result["losses"]
    if report_to == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        (folder,) = glob.glob(str(tmp_path / "runs" / "tensorboard" / "*"))
        acc = EventAccumulator(folder)
        acc.Reload()
        assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(result["losses"], rel=1e-6)


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


def losses(path):
    return {m["step"]: m["loss"] for m in map(json.loads, open(path)) if "step" in m and "loss" in m}


def test_ps_checkpoints_resume_exactly_after_a_restart_and_across_layouts(reference, tmp_path, capfd):
    """All against the uninterrupted dp=1 `reference` (steps 1-10; synchronous servers are its
    math, see above): an all-reduce ZeRO-1 checkpoint loads into the servers, a restart after a
    worker's failure resumes from the servers' own checkpoint, and that loads into all-reduce."""
    ref = dict(enumerate(reference["losses"], start=1))

    def ckpt(folder, every=0, resume=False):
        return {"dir": str(tmp_path / folder), "every": every, "resume": resume}

    # all-reduce dp=2 ZeRO-1 saves step 4 (the whole run: the learning-rate schedule depends on it)
    saver = run_tiny(dp=2, zero=1, checkpoint=ckpt("a", every=4))
    assert saver["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    shutil.copytree(tmp_path / "a" / "step_00000004", tmp_path / "b" / "step_00000004")
    capfd.readouterr()
    # two workers and two servers resume from it; worker 1 fails at step 7: every rank restarts
    # and the servers reload their own step 6
    run_tiny(dp=2, sync="ps", servers=2, simulate_failure="1:7", max_restarts=1, metrics=str(tmp_path / "b.jsonl"),
             checkpoint=ckpt("b", every=2, resume=True))
    out = capfd.readouterr().out
    assert "resumed from" in out and "(step 4)" in out and "(step 6)" in out, out
    after = losses(tmp_path / "b.jsonl")
    assert sorted(after) == [7, 8, 9, 10]
    assert [after[k] for k in after] == pytest.approx([ref[k] for k in after], rel=1e-5)
    # the servers' step 6 loads into all-reduce ZeRO-1 on two ranks
    shutil.copytree(tmp_path / "b" / "step_00000006", tmp_path / "c" / "step_00000006")
    mixed = run_tiny(dp=2, zero=1, checkpoint=ckpt("c", resume=True))
    assert mixed["resumed_from"].endswith("step_00000006")
    assert mixed["losses"] == pytest.approx([ref[k] for k in range(7, 11)], rel=1e-5)


def test_ps_with_staleness_refuses_checkpoints(capsys):
    from paratrain.cli import main  # in this process: refused before any worker starts

    with pytest.raises(SystemExit) as exit_:
        main(["train", *PS_RUN, "--sync", "ps", "--dp", "2", "--servers", "1", "--staleness", "2",
              "--checkpoint-dir", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--checkpoint-dir: parameter servers checkpoint synchronous runs only (--staleness 0)" in err
