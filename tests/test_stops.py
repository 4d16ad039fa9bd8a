"""Runs that stop on purpose (paratrain.stops). A NaN or inf gradient norm or loss stops the run
at that step on every rank: exit status 4, one line naming the step, no update applied, nothing
saved after the last good step, a `stopped` record in a strict-JSON metrics file; under
pipelines and parameter servers too. fp16 reports each skipped step and stops after
--max-skipped-steps in a row. SIGTERM / SIGINT make every rank finish its step and save it (exit
143 / 130, one line), and --resume then ends with the loss of the run that was never stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from helpers import spawn

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--global-batch", "8", "--seq-len", "64", "--no-progress"]


def command(*argv) -> list[str]:
    return [sys.executable, "-m", "paratrain", "train", *TINY, *map(str, argv)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def train(*argv, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(command(*argv), capture_output=True, text=True, timeout=timeout, env=env())


def strict_records(path: Path) -> list[dict]:
    """Every line of a metrics file, parsed as strict JSON (a bare NaN or Infinity fails)."""
    def refuse(name):
        raise ValueError(f"{path.name} holds {name}, which strict JSON parsers reject")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def saved_steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in folder.glob("step_*")) if folder.is_dir() else []


def stderr_lines(r) -> list[str]:
    return [line for line in r.stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------- non-finite values
def check_non_finite_stop(r, tmp_path: Path, last_line_start: str) -> int:
    """Exit 4, the stop's line last on stderr naming the step, nothing saved from that step on,
    a strict-JSON metrics file that ends with the stop's record; returns the step."""
    assert r.returncode == 4, r.stderr[-3000:]
    line = stderr_lines(r)[-1]
    assert line.startswith(last_line_start), r.stderr
    records = strict_records(tmp_path / "m.jsonl")
    stop = records[-1]
    assert stop["event"] == "stopped" and stop["status"] == 4 and stop["reason"] == "NonFiniteError"
    step = stop["step"]
    assert f"at step {step}" in line or f"-{step}," in line, line
    assert all(s < step for s in saved_steps(tmp_path / "ck")), (step, saved_steps(tmp_path / "ck"))
    assert [r["step"] for r in records if "loss" in r] == list(range(1, len([r for r in records if "loss" in r]) + 1))
    assert all(r["step"] < step for r in records if "loss" in r)
    assert "Traceback" not in r.stderr
    return step


LAYOUTS = {"dp": ["--dp", 2], "pp": ["--pp", 2, "--microbatches", 2], "ps": ["--dp", 2, "--sync", "ps", "--servers", 1]}


@pytest.mark.parametrize("layout", ["dp", pytest.param("pp", marks=pytest.mark.slow),
                                    pytest.param("ps", marks=pytest.mark.slow)])
def test_nan_gradient_norm_stops_the_run_at_that_step(tmp_path, layout):
    """--lr 1e6: step 2 blows the weights up, step 3's norm is NaN. Before the fix the run went
    on in NaN, saved NaN checkpoints (pruning the good ones) and exited 0 (pp, ps) or 1 (dp)."""
    r = train(*LAYOUTS[layout], "--steps", 20, "--lr", 1e6, "--metrics", tmp_path / "m.jsonl",
              "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", 1)
    step = check_non_finite_stop(r, tmp_path, "paratrain: non-finite")
    assert len(stderr_lines(r)) == 1, r.stderr
    assert "the update was not applied" in r.stderr and step < 20
    assert saved_steps(tmp_path / "ck")[-1] == step - 1  # the last good step is kept


@pytest.mark.slow
def test_fp16_reports_skipped_steps_and_stops_after_the_bound(tmp_path):
    """Before the fix fp16 skipped every step of the run without a word."""
    r = train("--dp", 2, "--precision", "fp16", "--max-skipped-steps", 4, "--steps", 20, "--lr", 1e6,
              "--metrics", tmp_path / "m.jsonl", "--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", 1)
    step = check_non_finite_stop(r, tmp_path, "paratrain: fp16 gradients overflowed in 4 steps in a row")
    warnings = stderr_lines(r)[:-1]
    assert len(warnings) == 4 and all("update skipped" in w for w in warnings), r.stderr
    assert f"step {step}: fp16" in warnings[-1]


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 4)

    def forward(self, x):
        return self.lin(x.to(self.lin.weight.dtype))  # fp16 compute takes fp16 inputs


def _api_stops(settings: dict, bad_loss: bool) -> dict:
    """Trainer.step on every rank until it raises (NaN inputs from step 3 on, so NaN gradients;
    or, with `bad_loss`, an inf loss with finite gradients); what each rank saw."""
    import paratrain
    from paratrain.stops import NonFiniteError

    mesh = paratrain.init()

    def loss_fn(out, y):
        loss = (out.float() - y).pow(2).mean()
        return loss + float("inf") if bad_loss else loss

    trainer = paratrain.Trainer(Linear(), mesh, loss_fn, lr=1e-2, warmup_steps=1, steps=10, progress=False,
                                **settings)
    g = torch.Generator().manual_seed(1)
    for k in range(1, 11):
        x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
        x = x * float("nan") if k >= 3 else x
        before = [p.detach().clone() for p in trainer.model.parameters()]
        try:
            trainer.step(x, y)
        except NonFiniteError as e:
            after = list(trainer.model.parameters())
            return {"step": e.step, "message": e.message, "status": e.status,
                    "unchanged": all(torch.equal(a, b) for a, b in zip(after, before)),
                    "position": trainer.position.step}
    return {"step": None}


@pytest.mark.parametrize("settings", [{}, {"zero": 1}, {"precision": "fp16", "max_skipped_steps": 3}],
                         ids=["dp", "zero1", "fp16"])
def test_api_step_raises_non_finite_error_alike_on_every_rank(settings):
    """The Python API stops as the CLI does; a NaN norm leaves the parameters as they were."""
    results = spawn(_api_stops, 2, settings, False)
    assert results[0] == results[1], results
    r = results[0]
    assert r["step"] is not None and r["status"] == 4, r
    if "precision" in settings:
        assert r["step"] == 5 and "3 steps in a row (steps 3-5" in r["message"] and r["position"] == 6
    else:
        assert r["step"] == 3 and r["message"].startswith("non-finite gradient norm (nan) at step 3"), r
        assert r["unchanged"] and r["position"] == 3  # the update was not applied


def test_api_non_finite_loss_with_finite_gradients_stops_at_step_one():
    (r,) = spawn(_api_stops, 1, {}, True)
    assert r["step"] == 1 and r["message"].startswith("non-finite loss (inf) at step 1"), r


# ---------------------------------------------------------------- preemption
STEPS = 40


def started(path: Path, steps: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until the metrics file shows `steps` step records; returns how many it shows."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        n = sum('"loss"' in line for line in path.read_text().splitlines()) if path.exists() else 0
        if n >= steps:
            return n
        time.sleep(0.05)
    raise AssertionError(f"{path} shows fewer than {steps} steps after {timeout} s")


def preempt(tmp_path: Path, sig: int, *flags, group: bool = False) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, signal it once a few steps are done (its process group: as Ctrl-C does),
    wait for it; returns the result and the step it stopped after."""
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen(command("--dp", 2, "--steps", STEPS, "--metrics", metrics, "--checkpoint-dir",
                                    tmp_path / "ck", "--checkpoint-every", 100, *flags),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            start_new_session=group)
    started(metrics, 3, proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=180)
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    records = strict_records(metrics)
    stop = records[-1]
    assert stop["event"] == "stopped" and stop["reason"] == "Preempted", records[-3:]
    assert stop["step"] == max(r["step"] for r in records if "loss" in r) < STEPS
    return r, stop["step"]


def resume_to_the_end(tmp_path: Path, step: int, *flags) -> dict:
    metrics = tmp_path / "resumed.jsonl"
    r = train("--dp", 2, "--steps", STEPS, "--metrics", metrics, "--checkpoint-dir", tmp_path / "ck",
              "--checkpoint-every", 100, "--resume", *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    records = strict_records(metrics)
    assert [x["step"] for x in records if "loss" in x] == list(range(step + 1, STEPS + 1))
    return records[-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("whole") / "m.jsonl"
    r = train("--dp", 2, "--steps", STEPS, "--metrics", path)
    assert r.returncode == 0, r.stderr[-3000:]
    return strict_records(path)[-1]


def check_preempted(r, step: int, tmp_path: Path, name: str, status: int) -> None:
    assert r.returncode == status, r.stderr[-3000:]
    lines = stderr_lines(r)
    assert len(lines) == 1 and lines[0].startswith(f"paratrain: preempted ({name})"), r.stderr
    assert f"step_{step:08d}" in r.stderr and "--resume" in r.stderr
    assert saved_steps(tmp_path / "ck") == [step]  # --checkpoint-every 100: the preemption saved it


def test_sigterm_saves_the_last_step_and_resume_continues_exactly(tmp_path, uninterrupted):
    """Before the fix: a 30-line traceback, exit 1, no checkpoint."""
    r, step = preempt(tmp_path, signal.SIGTERM)
    check_preempted(r, step, tmp_path, "SIGTERM", 143)
    end = resume_to_the_end(tmp_path, step)
    assert end["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-6)


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_saves_and_resumes(tmp_path, uninterrupted):
    """SIGINT reaches the launcher and every worker at once, as Ctrl-C in a terminal."""
    r, step = preempt(tmp_path, signal.SIGINT, group=True)
    check_preempted(r, step, tmp_path, "SIGINT", 130)
    end = resume_to_the_end(tmp_path, step)
    assert end["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-6)


@pytest.mark.slow
def test_sigterm_with_an_asynchronous_save_in_flight(tmp_path, uninterrupted):
    """Saving every step in the background: the save in flight completes, then the last step's."""
    metrics = tmp_path / "m.jsonl"
    proc = subprocess.Popen(command("--dp", 2, "--steps", STEPS, "--metrics", metrics, "--checkpoint-dir",
                                    tmp_path / "ck", "--checkpoint-every", 1, "--keep-checkpoints", 2,
                                    "--async-checkpoint"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    started(metrics, 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143, err[-3000:]
    stop = strict_records(metrics)[-1]
    step = stop["step"]
    assert stop["reason"] == "Preempted" and saved_steps(tmp_path / "ck")[-1] == step, (stop, err)
    assert not list((tmp_path / "ck").glob(".tmp*")) and len(err.strip().splitlines()) == 1, err
    end = resume_to_the_end(tmp_path, step, "--async-checkpoint")
    assert end["final_loss"] == pytest.approx(uninterrupted["final_loss"], rel=1e-6)
