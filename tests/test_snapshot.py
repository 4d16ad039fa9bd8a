"""In-memory snapshots (--snapshot-every): a restart restores the newest snapshot that every node
holds whole, newer than the disk checkpoint, and trains on to the loss of one process; a node
that holds only its shards (ZeRO, tp or pp across nodes) is named, and the disk checkpoint serves."""

import json
import os

import pytest

from helpers import cli, spawn

FLAGS = ["--model", "tiny", "--global-batch", "8", "--seq-len", "32", "--seed", "5", "--no-progress", "--steps", "12"]


def records(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def test_a_restart_restores_the_snapshot_and_redoes_no_step(tmp_path):
    ref = cli("train", *FLAGS, "--dp", "1", "--metrics", str(tmp_path / "ref.jsonl"))
    assert ref.returncode == 0, ref.stderr
    shm = tmp_path / "shm"
    out = cli(
        "train",
        *FLAGS,
        "--dp",
        "2",
        "--max-restarts",
        "1",
        "--simulate-failure",
        "1:9",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--checkpoint-every",
        "5",
        "--snapshot-every",
        "1",
        "--snapshot-dir",
        str(shm),
        "--metrics",
        str(tmp_path / "m.jsonl"),
    )
    assert out.returncode == 0, out.stderr
    assert "restored the in-memory snapshot of step 8" in out.stdout
    got = records(tmp_path / "m.jsonl")
    restart = next(r for r in got if r.get("event") == "restart")
    assert restart["restored_from"] == "snapshot" and restart["resumed_from_step"] == 8
    assert restart["steps_redone"] == 0  # the disk checkpoint (step 5) would have cost steps 6-8
    recovered = next(r for r in got if r.get("event") == "recovered")
    assert recovered["step"] == 9 and recovered["since_last_step_s"] > 0
    assert "paratrain: recovered: step 9 trained" in out.stdout
    assert sorted(r["step"] for r in got if "event" not in r) == list(range(1, 13))
    end = got[-1]
    assert end["final_loss"] == pytest.approx(records(tmp_path / "ref.jsonl")[-1]["final_loss"], rel=1e-5)
    assert [s["step"] for s in end["snapshots"]] == [9, 11]  # this attempt's: 10 went to disk, 12 is the end
    assert not any(shm.iterdir())  # the run is over: its snapshots are gone, the disk checkpoints stay


def _snapshot_on_nodes_of_two(ck_dir: str, shm: str, layouts: list[dict]) -> list[tuple]:
    """Each layout on 4 ranks in nodes of 2: what a node misses; the choice before a snapshot of
    step 1, after it, with a disk checkpoint as new, and in another layout."""
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    import shutil

    import torch.distributed as dist

    from paratrain.config import RunConfig
    from paratrain.mesh import Mesh
    from paratrain.train import Trainer

    out = []
    for i, lay in enumerate(layouts):
        cfg = RunConfig()
        cfg.model.name, cfg.train.global_batch, cfg.train.seq_len, cfg.train.progress = "tiny", 8, 32, False
        cfg.layout.dp, cfg.layout.tp, cfg.layout.zero = lay["dp"], lay.get("tp", 1), lay.get("zero", 0)
        cfg.checkpoint.dir, cfg.checkpoint.snapshot_every, cfg.checkpoint.snapshot_dir = f"{ck_dir}/{i}", 1, shm
        t = Trainer.from_config(cfg, Mesh.build(cfg.layout.dp, cfg.layout.tp, 1))
        before = t.snapshots.choose(None)
        t.run_step(1)
        t.snapshots.save(1)
        after, with_disk = t.snapshots.choose(None), t.snapshots.choose(1)
        t.ckpt.layout = "dp=2,tp=1,pp=1,zero=3"  # as if the world had changed since the snapshot
        changed = t.snapshots.choose(None)
        out.append((t.snapshots.missing, before, after[0] is not None, with_disk, changed[0] is not None, changed[1]))
        t.snapshots.close()
        t.ckpt.close()
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(f"{ck_dir}/{i}")
    return out


def test_a_node_holds_the_whole_state_only_where_the_model_is_replicated_across_nodes(tmp_path):
    layouts = [{"dp": 4}, {"dp": 2, "tp": 2}, {"dp": 4, "zero": 3}]
    per_rank = spawn(_snapshot_on_nodes_of_two, 4, str(tmp_path / "ck"), str(tmp_path / "shm"), layouts)
    for rank_result in per_rank:
        (dp_missing, *dp), (tp_missing, *tp), (zero_missing, *zero) = rank_result
        assert dp_missing is None and tp_missing is None  # each node holds a whole replica (tp inside it)
        assert zero_missing is not None  # ZeRO-3: each node holds half the shards
        for before, restorable, with_disk, in_another_world, why_not in (dp, tp, zero):
            assert before == (None, None) and restorable  # the same ranks in the same layout: even ZeRO's shards
            assert with_disk == (None, None)  # the disk checkpoint is as new: it serves
        assert dp[3] and tp[3] and dp[4] is None and tp[4] is None  # a whole replica serves any world
        assert not zero[3] and "holds only its ranks' shards" in zero[4] and "lost node" in zero[4]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--snapshot-every", "2"], "--snapshot-every: snapshots stand in front of the disk checkpoints"),
        (["--snapshot-every", "-1", "--checkpoint-dir", "ck"], "--snapshot-every: must be at least 0"),
    ],
)
def test_bad_snapshot_flags_are_one_line_and_exit_2(tmp_path, flags, message):
    out = cli("train", *FLAGS, *flags)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
