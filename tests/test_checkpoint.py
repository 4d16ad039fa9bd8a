"""Checkpoints: exact resume across layouts, survival of a SIGKILLed worker, clear refusals.

A run saved in one layout and resumed in another (dp x tp -> pp, ZeRO-3 -> tp, a pipeline ->
ZeRO-2, with an asynchronous save) continues with the losses of the uninterrupted run. A worker
killed with SIGKILL under --max-restarts 1 costs only the steps since the last checkpoint: the
final loss and parameters equal those of the run never interrupted. A truncated file, another
model's checkpoint and a missing folder are one line and exit status 2; a broken newest
checkpoint falls back to the previous good one.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import run_tiny
from paratrain.checkpoint import checkpoints, load_full_model

CASES = [
    (dict(dp=2, tp=2), dict(pp=2, microbatches=2)),
    (dict(dp=2, zero=3, checkpoint_async=True), dict(tp=2)),
    pytest.param(dict(pp=2, schedule="gpipe", microbatches=2), dict(dp=2, zero=2), marks=pytest.mark.slow),
]


def run_ckpt(folder, every=0, resume=False, async_save=False, **layout):
    from paratrain.config import RunConfig, validate  # noqa: F401  (run_tiny builds the config)

    return run_tiny(checkpoint={"dir": str(folder), "every": every, "resume": resume, "async_save": async_save},
                    **layout)


@pytest.mark.parametrize("saved,loaded", CASES, ids=["dp2tp2-to-pp2", "zero3-async-to-tp2", "pp2-to-zero2"])
def test_resume_in_another_layout_continues_the_same_losses(tmp_path, saved, loaded):
    saved = dict(saved)
    async_save = saved.pop("checkpoint_async", False)
    full = run_ckpt(tmp_path, every=6, async_save=async_save, **saved)  # saves at step 6 (and not at 10)
    assert [os.path.basename(c) for c in checkpoints(tmp_path)] == ["step_00000006"]
    resumed = run_ckpt(tmp_path, resume=True, **loaded)
    assert resumed["resumed_from"].endswith("step_00000006")
    torch.testing.assert_close(torch.tensor(resumed["losses"]), torch.tensor(full["losses"][6:]), rtol=1e-5, atol=0)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "paratrain", *args], capture_output=True, text=True, timeout=timeout)


TRAIN = ["train", "--model", "tiny", "--dp", "2", "--steps", "12", "--seq-len", "32", "--seed", "5", "--no-progress"]


def test_sigkilled_worker_restarts_from_the_last_checkpoint_and_ends_exactly(tmp_path):
    clean = cli(*TRAIN, "--checkpoint-dir", str(tmp_path / "a"), "--checkpoint-every", "4",
                "--metrics", str(tmp_path / "a.jsonl"))
    assert clean.returncode == 0, clean.stderr
    killed = cli(*TRAIN, "--checkpoint-dir", str(tmp_path / "b"), "--checkpoint-every", "4", "--max-restarts", "1",
                 "--simulate-failure", "1:7:kill", "--metrics", str(tmp_path / "b.jsonl"))
    assert killed.returncode == 0, killed.stderr
    end_a = json.loads(open(tmp_path / "a.jsonl").readlines()[-1])
    end_b = json.loads(open(tmp_path / "b.jsonl").readlines()[-1])
    assert end_b["resumed_from"].endswith("step_00000004")  # steps 5-7 were lost and redone
    assert end_b["final_loss"] == pytest.approx(end_a["final_loss"], rel=1e-6)
    a, b = load_full_model(checkpoints(tmp_path / "a")[0]), load_full_model(checkpoints(tmp_path / "b")[0])
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=0, msg=name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    run_ckpt(folder, every=3, steps=6)  # step_3 and step_6
    return folder


def test_truncated_newest_checkpoint_falls_back_and_a_lone_broken_one_is_refused(saved, tmp_path):
    work = tmp_path / "c"
    shutil.copytree(saved, work)
    newest = checkpoints(work)[0]
    data = next(f for f in os.listdir(newest) if f.endswith(".distcp") and os.path.getsize(os.path.join(newest, f)) > 1000)
    with open(os.path.join(newest, data), "r+b") as fh:
        fh.truncate(1000)
    r = cli("train", "--model", "tiny", "--dp", "1", "--steps", "8", "--seq-len", "32", "--seed", "5",
            "--no-progress", "--checkpoint-dir", str(work), "--resume")
    assert r.returncode == 0, r.stderr
    assert "skipped checkpoint step_00000006" in r.stderr and "truncated" in r.stderr
    assert "resumed from" in r.stdout and "step_00000003" in r.stdout
    shutil.rmtree(checkpoints(work)[-1])  # now the broken one is all there is (plus what the run saved: none)
    r = cli("train", "--model", "tiny", "--steps", "8", "--seed", "5", "--checkpoint-dir", str(work), "--resume")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 2  # the warning, then the error
    assert r.stderr.strip().splitlines()[-1].startswith("paratrain: error: --resume: no complete checkpoint")
    assert os.path.exists(os.path.join(newest, data))  # nothing was deleted


def test_other_model_and_missing_folder_are_refused_in_one_line(saved, tmp_path):
    r = cli("train", "--model", "small", "--steps", "8", "--checkpoint-dir", str(saved), "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "holds model" in r.stderr and "tiny" in r.stderr
    r = cli("train", "--model", "tiny", "--steps", "8", "--checkpoint-dir", str(saved), "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--seed 5" in r.stderr
    r = cli("train", "--model", "tiny", "--steps", "8", "--checkpoint-dir", str(tmp_path / "none"), "--resume")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no checkpoint folder" in r.stderr


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_writes_one_consolidated_model(saved, tmp_path, suffix):
    out = tmp_path / f"model{suffix}"
    r = cli("checkpoint", "export", str(saved), "--to", str(out))
    assert r.returncode == 0, r.stderr
    if suffix == ".pt":
        tensors = torch.load(out)
    else:
        from safetensors.torch import load_file

        tensors = load_file(out)
    from paratrain.models.gpt import build_model

    model = build_model("tiny", 0)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and missing == ["head.weight"]  # tied: the embedding is the head
    ref = load_full_model(checkpoints(saved)[0])
    torch.testing.assert_close(tensors["blocks.3.mlp.fc.weight"], ref["blocks.3.mlp.fc.weight"])
