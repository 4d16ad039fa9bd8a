"""Checkpoints: exact resume across layouts, survival of a SIGKILLed worker, clear refusals.

A run saved in one layout and resumed in another (ZeRO-3 with an asynchronous save -> dp x tp ->
pp in one chain; dp x tp -> pp, ZeRO-3 -> tp, a pipeline -> ZeRO-2 in the slow set) continues
with the losses of the uninterrupted run. A worker killed with SIGKILL under max_restarts 1
costs only the steps since the last checkpoint: the final loss and parameters equal those of
the run never interrupted. A truncated file, another
model's checkpoint and a missing folder are one line and exit status 2; a broken newest
checkpoint falls back to the previous good one. An export holds the tied head too, so it loads
into the model with strict=True.
"""

import os
import shutil

import pytest
import torch

from helpers import cli, refused, run_tiny
from paratrain.checkpoint import checkpoints, load_full_model

CASES = [  # slow-marked: test_resume_through_a_chain_of_layouts covers the first two in one chain
    pytest.param(dict(dp=2, tp=2), dict(pp=2, microbatches=2), marks=pytest.mark.slow),
    pytest.param(dict(dp=2, zero=3, checkpoint_async=True), dict(tp=2), marks=pytest.mark.slow),
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


@pytest.mark.slow  # default-suite time; the cases beside it stay in the default run
def test_resume_through_a_chain_of_layouts(tmp_path):
    """ZeRO-3 saved asynchronously -> dp x tp, which saves again -> pp: each resumed run
    continues with the losses of the uninterrupted ZeRO-3 run (three launches for two changes
    of layout)."""
    full = run_ckpt(tmp_path / "a", every=6, async_save=True, dp=2, zero=3)  # saves at step 6 (and not at 10)
    assert [os.path.basename(c) for c in checkpoints(tmp_path / "a")] == ["step_00000006"]
    middle = run_ckpt(tmp_path / "a", every=2, resume=True, dp=2, tp=2)  # from step 6; saves at 8 and 10
    assert middle["resumed_from"].endswith("step_00000006")
    torch.testing.assert_close(torch.tensor(middle["losses"]), torch.tensor(full["losses"][6:]), rtol=1e-5, atol=0)
    shutil.copytree(tmp_path / "a" / "step_00000008", tmp_path / "b" / "step_00000008")
    last = run_ckpt(tmp_path / "b", resume=True, pp=2, microbatches=2)
    assert last["resumed_from"].endswith("step_00000008")
    torch.testing.assert_close(torch.tensor(last["losses"]), torch.tensor(full["losses"][8:]), rtol=1e-5, atol=0)




@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """dp=2, 6 steps, saved at steps 3 and 6: the uninterrupted run of the SIGKILL test and the
    checkpoints the refusal and export tests read (copied where they are changed)."""
    folder = tmp_path_factory.mktemp("ckpt")
    return folder, run_ckpt(folder, every=3, steps=6, dp=2)


@pytest.fixture(scope="module")
def saved(saved_run):
    return saved_run[0]


def test_sigkilled_worker_restarts_from_the_last_checkpoint_and_ends_exactly(saved_run, tmp_path):
    clean_dir, clean = saved_run
    # rank 1 is SIGKILLed at step 5; every rank restarts from step 3 and redoes steps 4 and 5
    killed = run_tiny(steps=6, dp=2, max_restarts=1, simulate_failure="1:5:kill",
                      checkpoint={"dir": str(tmp_path / "b"), "every": 3})
    assert killed["resumed_from"].endswith("step_00000003")
    assert killed["final_loss"] == pytest.approx(clean["final_loss"], rel=1e-6)
    a, b = load_full_model(checkpoints(clean_dir)[0]), load_full_model(checkpoints(tmp_path / "b")[0])
    assert os.path.basename(checkpoints(tmp_path / "b")[0]) == "step_00000006"
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=0, msg=name)


def test_truncated_newest_checkpoint_falls_back_and_a_lone_broken_one_is_refused(saved, tmp_path, capsys):
    work = tmp_path / "c"
    shutil.copytree(saved, work)
    newest = checkpoints(work)[0]
    data = next(f for f in os.listdir(newest) if f.endswith(".distcp") and os.path.getsize(os.path.join(newest, f)) > 1000)
    with open(os.path.join(newest, data), "r+b") as fh:
        fh.truncate(1000)
    r = cli("train", "--model", "tiny", "--dp", "1", "--steps", "6", "--seq-len", "32", "--seed", "5", "--lr", "3e-3",
            "--warmup-steps", "2",
            "--no-progress", "--checkpoint-dir", str(work), "--resume")
    assert r.returncode == 0, r.stderr
    assert "skipped checkpoint step_00000006" in r.stderr and "truncated" in r.stderr
    assert "resumed from" in r.stdout and "step_00000003" in r.stdout
    shutil.rmtree(checkpoints(work)[-1])  # now the broken one is all there is (plus what the run saved: none)
    code, err = refused(capsys, "train", "--model", "tiny", "--steps", "8", "--seed", "5", "--checkpoint-dir", str(work),
                        "--resume")
    assert code == 2 and len(err.strip().splitlines()) == 2  # the warning, then the error
    assert err.strip().splitlines()[-1].startswith("paratrain: error: --resume: no complete checkpoint")
    assert os.path.exists(os.path.join(newest, data))  # nothing was deleted


def test_other_model_and_missing_folder_are_refused_in_one_line(saved, tmp_path, capsys):
    code, err = refused(capsys, "train", "--model", "small", "--steps", "8", "--checkpoint-dir", str(saved), "--resume")
    assert code == 2 and err.count("\n") == 1 and "holds model" in err and "tiny" in err
    code, err = refused(capsys, "train", "--model", "tiny", "--steps", "8", "--checkpoint-dir", str(saved), "--resume")
    assert code == 2 and err.count("\n") == 1 and "--seed 5" in err
    code, err = refused(capsys, "train", "--model", "tiny", "--steps", "8", "--checkpoint-dir", str(tmp_path / "none"),
                        "--resume")
    assert code == 2 and err.count("\n") == 1 and "no checkpoint folder" in err


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
    model.load_state_dict(tensors, strict=True)  # the tied head is written too, as a copy of the embedding
    torch.testing.assert_close(tensors["head.weight"], tensors["wte.weight"], rtol=0, atol=0)
    ref = load_full_model(checkpoints(saved)[0])
    torch.testing.assert_close(tensors["blocks.3.mlp.fc.weight"], ref["blocks.3.mlp.fc.weight"])
