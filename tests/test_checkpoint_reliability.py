"""Checkpoint folders under faults: run identity, the folder's lock, verification from the data,
pruning of the run's own checkpoints only, a full disk, and a rank frozen in a save.

Each test reproduces a defect of issue 17 (a reused folder silently returned another run's model;
two runs on one folder overwrote each other; a manifest `{}` or a metadata-only folder passed or
broke verification; a junk `step_99` held a pruning slot; a full disk gave pages of traceback and
retried; a rank frozen in a save hung the run) and checks the fix.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import cli, refused
from paratrain.checkpoint import CheckpointError, checkpoints, latest_good, publish, runs, start_point, verify
from paratrain.checkpoint.store import cause

TINY = ["--model", "tiny", "--global-batch", "4", "--seq-len", "32", "--no-progress", "--device", "cpu"]




@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A finished run of 4 steps saved at steps 2 and 4 (copied where a test changes it)."""
    folder = tmp_path_factory.mktemp("ck") / "run"
    r = cli("train", *TINY, "--dp", "1", "--steps", "4", "--checkpoint-dir", str(folder), "--checkpoint-every", "2")
    assert r.returncode == 0, r.stderr
    return folder


def copy(saved, tmp_path, name="c"):
    work = tmp_path / name
    shutil.copytree(saved, work)
    return work


def manifest_of(folder):
    with open(os.path.join(folder, "manifest.json")) as fh:
        return json.load(fh)


def test_a_fresh_run_refuses_a_folder_of_another_run_and_deletes_nothing(saved, tmp_path, capsys):
    work = copy(saved, tmp_path)
    before = {c: manifest_of(c) for c in checkpoints(work)}
    # the reproduction of the issue: a new run (other lr) with a failure and a restart allowed
    code, err = refused(capsys, "train", *TINY, "--steps", "8", "--lr", "1e-3", "--max-restarts", "1",
                        "--simulate-failure", "0:3", "--checkpoint-dir", str(work), "--checkpoint-every", "2")
    assert code == 2 and err.count("\n") == 1, err
    assert "already holds checkpoints (step_00000004" in err and "--resume" in err
    assert {c: manifest_of(c) for c in checkpoints(work)} == before  # nothing pruned, nothing overwritten
    assert not os.path.exists(work / runs.LOCK)


def test_resume_names_the_first_setting_that_differs(saved, capsys):
    code, err = refused(capsys, "train", *TINY, "--steps", "4", "--lr", "5e-3", "--checkpoint-dir", str(saved),
                        "--resume")
    assert code == 2 and err.count("\n") == 1 and "--lr 0.002" in err and "this run has --lr 0.005" in err, err
    code, err = refused(capsys, "train", *TINY, "--steps", "9", "--checkpoint-dir", str(saved), "--resume")
    assert code == 2 and "--steps 4" in err and "learning-rate schedule" in err, err


def test_a_restart_loads_only_its_own_runs_checkpoints(saved, tmp_path):
    work = copy(saved, tmp_path)
    theirs = manifest_of(checkpoints(work)[0])["run"]
    run = theirs["identity"]
    # a restart of run "mine", which has saved step 2 only: the newer step 4 is another run's
    shutil.copytree(work / "step_00000002", work / "mine_2")
    info = manifest_of(work / "mine_2")
    info["run"] = {**info["run"], "id": "mine"}
    shutil.rmtree(work / "step_00000002")
    os.remove(work / "mine_2" / "manifest.json")
    publish(str(work), str(work / "mine_2"), 2, info, keep=1)
    runs.acquire(str(work), os.getpid(), run_id="mine")
    try:
        assert start_point(str(work), run, resume=False, restart=True) == ("mine", str(work / "step_00000002"))
        # --resume (no restart) continues the newest checkpoint of this run's settings, and its run
        assert start_point(str(work), run, resume=True, restart=False) == (theirs["id"], str(work / "step_00000004"))
        with pytest.raises(CheckpointError, match="already holds checkpoints"):
            start_point(str(work), run, resume=False, restart=False)
    finally:
        runs.release(str(work), os.getpid())
    assert [os.path.basename(c) for c in checkpoints(work)] == ["step_00000004", "step_00000002"]


def test_pruning_touches_only_the_runs_own_and_junk_holds_no_slot(saved, tmp_path):
    work = copy(saved, tmp_path)
    (work / "step_00000099").write_text("junk")  # a file named like a checkpoint
    os.makedirs(work / "step_00000098")  # a folder with no manifest
    src = work / "step_00000004"
    for step in (5, 6, 7):  # three saves of run "mine" with keep=2
        tmp = tmp_path / f"tmp{step}"
        shutil.copytree(src, tmp)
        info = manifest_of(tmp)
        os.remove(tmp / "manifest.json")
        info.update(step=step, run={**info["run"], "id": "mine"})
        publish(str(work), str(tmp), step, info, keep=2)
    names = sorted(os.path.basename(c) for c in checkpoints(work))
    # mine: 6 and 7 kept (5 pruned); the other run's 2 and 4 untouched; junk left but never counted
    assert names == ["step_00000002", "step_00000004", "step_00000006", "step_00000007", "step_00000098",
                     "step_00000099"]
    folder, skipped = latest_good(str(work))
    assert folder.endswith("step_00000007") and any("step_00000099 is not a folder" in s for s in skipped)


@pytest.mark.parametrize("damage", ["empty-object", "list", "folder", "no-files", "metadata-only", "bad-metadata"])
def test_verification_reads_the_data_not_the_manifest_alone(saved, tmp_path, damage):
    work = copy(saved, tmp_path)
    newest = checkpoints(work)[0]
    path = os.path.join(newest, "manifest.json")
    m = manifest_of(newest)
    if damage == "empty-object":
        open(path, "w").write("{}")
    elif damage == "list":
        open(path, "w").write("[]")
    elif damage == "folder":
        os.remove(path)
        os.makedirs(path)
    elif damage == "no-files":
        open(path, "w").write(json.dumps({**m, "files": {}}))
    elif damage == "metadata-only":  # what one trial of two runs on a folder published
        for f in m["files"]:
            if f.endswith(".distcp"):
                os.remove(os.path.join(newest, f))
        open(path, "w").write(json.dumps({**m, "files": {".metadata": m["files"][".metadata"]}}))
    else:
        open(os.path.join(newest, ".metadata"), "wb").write(b"not a pickle")
        m["files"][".metadata"] = {"bytes": 12, "crc32": __import__("zlib").crc32(b"not a pickle")}
        open(path, "w").write(json.dumps(m))
    with pytest.raises(CheckpointError):
        verify(newest)
    folder, skipped = latest_good(str(work))  # the previous good checkpoint, with a warning
    assert folder.endswith("step_00000002") and len(skipped) == 1 and "step_00000004" in skipped[0]


def test_export_of_a_manifest_listing_no_files_is_one_line(saved, tmp_path, capsys):
    work = copy(saved, tmp_path)
    newest = checkpoints(work)[0]
    open(os.path.join(newest, "manifest.json"), "w").write("{}")
    code, err = refused(capsys, "checkpoint", "export", newest, "--to", str(tmp_path / "m.safetensors"))
    assert code == 2 and err.count("\n") == 1 and "manifest.json lists no files" in err, err


def test_a_folder_held_by_a_live_run_is_refused_and_a_stale_lock_is_taken_over(saved, tmp_path, capsys):
    work = copy(saved, tmp_path)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        runs.acquire(str(work), other.pid)
        with pytest.raises(runs.LockHeld, match="in use by another run"):
            runs.acquire(str(work), os.getpid())
        code, err = refused(capsys, "train", *TINY, "--steps", "6", "--checkpoint-dir", str(work), "--resume")
        assert code == 2 and err.count("\n") == 1 and f"in use by another run (pid {other.pid}" in err, err
    finally:
        other.kill()
        other.wait()
    held = runs.acquire(str(work), os.getpid())  # its owner is gone: stale, taken over
    assert held["pid"] == os.getpid() and "stale lock" in capsys.readouterr().err
    runs.release(str(work), os.getpid())
    assert not os.path.exists(work / runs.LOCK)


def test_the_cause_of_a_failed_write_is_one_line():
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(28, "No space left on device", "/ck/.tmp-step_00000004/__1_0.distcp")
    e = CheckpointException("failed", {1: (full, None), 0: (full, None)})
    assert cause(e) == ("rank 0: No space left on device (/ck/.tmp-step_00000004/__1_0.distcp); "
                        "rank 1: No space left on device (/ck/.tmp-step_00000004/__1_0.distcp)")
    try:
        raise RuntimeError("write failed") from PermissionError(13, "Permission denied", "/ck/x")
    except RuntimeError as wrapped:
        assert cause(wrapped) == "Permission denied (/ck/x)"


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs: one tiny checkpoint (5.7 MB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_stops_the_run_in_one_line_per_cause_without_retrying(small_disk):
    folder = small_disk / "ck"
    r = cli("train", *TINY, "--dp", "2", "--steps", "6", "--checkpoint-dir", str(folder), "--checkpoint-every", "2",
            "--max-restarts", "1")
    assert r.returncode == 5, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint of step 4 could not be written" in lines[0], r.stderr
    assert "No space left on device" in lines[0] and "Traceback" not in r.stderr
    assert "resumed from" not in r.stdout  # not retried
    assert sorted(os.listdir(folder)) == ["step_00000002"]  # the partial folder removed, the lock released
    verify(str(folder / "step_00000002"))


def test_a_rank_frozen_in_a_checkpoint_save_is_reported_and_the_run_stops(tmp_path):
    r = cli("train", *TINY, "--dp", "2", "--steps", "8", "--checkpoint-dir", str(tmp_path / "ck"),
            "--checkpoint-every", "2", "--simulate-failure", "1:4:save-freeze", "--collective-timeout", "3",
            timeout=240)
    assert r.returncode == 3, r.stderr
    assert "rank 0 waits in checkpoint: save (DCP)" in r.stderr and "step 4" in r.stderr, r.stderr
    assert "rank 1 reported nothing" in r.stderr
    assert [os.path.basename(c) for c in checkpoints(tmp_path / "ck")] == ["step_00000002"]
