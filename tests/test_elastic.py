"""Elastic runs on two nodes (paratrain.cluster, `torchrun --nnodes 1:2`): a node SIGKILLed at a random
step leaves the survivor to finish with dp taken from the smaller world (`--dp auto`) and the final
loss of one uninterrupted process; a node started again is taken in again, and the run still ends
with that loss. The metrics file records every membership change."""

import os
import random
import shutil
import signal

import pytest

from helpers import cli
from paratrain.checkpoint.store import MANIFEST, CheckpointError, checkpoints, latest_good, tmp_folder, verify
from paratrain.cluster import ELASTIC_ENV, FAST_RDZV, Cluster, available, namespaces, read_records

STEPS = 20
FLAGS = ["--model", "tiny", "--global-batch", "8", "--seq-len", "32", "--seed", "5", "--no-progress"]
LAUNCHER = ["--nnodes", "1:2", "--max-restarts", "3"]


@pytest.fixture(autouse=True)
def _needs_a_cluster():
    reason = available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final loss of one process training `steps` steps, for each `steps` asked."""
    cache = {}

    def final_loss(steps: int) -> float:
        if steps not in cache:
            path = tmp_path_factory.mktemp("reference") / "metrics.jsonl"
            out = cli("train", *FLAGS, "--steps", str(steps), "--dp", "1", "--metrics", str(path))
            assert out.returncode == 0, out.stderr
            cache[steps] = read_records(str(path))[-1]["final_loss"]
        return cache[steps]

    return final_loss


@pytest.fixture(scope="module")
def cluster():
    with Cluster(nodes=2, ranks_per_node=2, rate="1gbit", name_prefix="ptelastic") as c:
        yield c
    assert not [n for n in namespaces() if n.startswith("ptelastic")]


def world_now(records: list[dict]) -> int | None:
    """The world size of the newest start or restart record."""
    starts = [r for r in records if r.get("event") in ("start", "restart")]
    return starts[-1]["world_size"] if starts else None


def after_step(path: str, step: int, world: int, since: float = 0.0):
    """A predicate: the run, at `world` ranks, has recorded a step >= `step` after wall time `since`."""
    def holds() -> bool:
        records = read_records(path)
        return world_now(records) == world and any(
            "event" not in r and r["step"] >= step and r["time"] > since for r in records)
    return holds


def membership(records: list[dict]) -> list[tuple[int, int]]:
    """(world before, world after) of every membership change the metrics file recorded."""
    changes = [r.get("membership") or r for r in records
               if r.get("event") == "membership" or (r.get("event") == "restart" and r.get("membership"))]
    return [(c.get("world_size_from"), c.get("world_size_to")) for c in changes]


LAST = {}  # the newest lose_node_1's ClusterRun


def lose_node_1(cluster, tmp_path, layout: list[str], kill_at: int, rejoin: bool = False,
                steps: int = STEPS, extra: tuple = ()) -> list[dict]:
    """Train with `layout` on both nodes, SIGKILL node 1 once step `kill_at` is recorded, and (`rejoin`)
    start its agent again once the survivor has trained a step; return the metrics records."""
    path = str(tmp_path / "metrics.jsonl")  # the namespaces share the file system
    args = ["train", *FLAGS, "--steps", str(steps), *layout, "--metrics", path,
            "--checkpoint-dir", str(tmp_path / "ck"), "--checkpoint-every", "5", *extra]
    launch = cluster.start(args, launcher_args=LAUNCHER, rdzv_conf=FAST_RDZV, env=ELASTIC_ENV)
    assert launch.wait_until(after_step(path, kill_at, world=4), timeout=240), launch.wait(1).summary()
    killed = launch.kill_node(1)
    if rejoin:
        assert launch.wait_until(after_step(path, 0, world=2, since=killed), timeout=240), launch.wait(1).summary()
        launch.restart_node(1)
    result = LAST["run"] = launch.wait(timeout=400)
    assert result.ok, result.summary()
    assert result.nodes[0].returncode == 0 and result.nodes[1].killed != rejoin
    return read_records(path)


def check_run(records: list[dict], final_loss: float, steps: int, changes: list[tuple[int, int]]) -> None:
    steps_seen = sorted(r["step"] for r in records if "event" not in r)
    assert steps_seen == list(range(1, steps + 1))  # every step once, the redone ones included
    end = records[-1]
    assert end["event"] == "end" and end["steps"] == steps
    assert end["final_loss"] == pytest.approx(final_loss, rel=1e-5)
    got = membership(records)
    assert got == changes, got
    assert end["membership_changes"] == len(changes)


@pytest.mark.parametrize("layout", [
    ["--dp", "auto"],
    pytest.param(["--dp", "auto", "--tp", "2"], marks=pytest.mark.slow),
    pytest.param(["--dp", "auto", "--zero", "3"], marks=pytest.mark.slow),
], ids=["dp4", "dp2-tp2", "dp4-zero3"])
def test_a_lost_node_leaves_the_survivor_to_finish_with_the_loss_of_one_process(cluster, reference, tmp_path,
                                                                                 layout):
    kill_at = random.Random(" ".join(layout)).randint(6, STEPS - 4)  # after the first checkpoint
    records = lose_node_1(cluster, tmp_path, layout, kill_at)
    check_run(records, reference(STEPS), STEPS, [(4, 2)])
    assert records[-1]["layout"].startswith("dp=1,tp=2" if "--tp" in layout else "dp=2,tp=1")


@pytest.mark.slow
def test_a_node_that_comes_back_is_taken_in_again(cluster, reference, tmp_path):
    steps = 120  # long enough that the survivor still trains when node 1 is back
    records = lose_node_1(cluster, tmp_path, ["--dp", "auto"], kill_at=7, rejoin=True, steps=steps)
    check_run(records, reference(steps), steps, [(4, 2), (2, 4)])
    assert records[-1]["layout"].startswith("dp=4")


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(10))
def test_ten_random_kill_steps(cluster, reference, tmp_path, draw):
    kill_at = random.Random(draw).randint(1, STEPS - 4)
    records = lose_node_1(cluster, tmp_path, ["--dp", "auto"], kill_at)
    check_run(records, reference(STEPS), STEPS, [(4, 2)])


@pytest.mark.slow  # default-suite time; the cases beside it stay in the default run
def test_a_node_lost_in_a_save_leaves_no_checkpoint_taken_for_complete(cluster, reference, tmp_path):
    """`--simulate-failure 2:10:save-permanent`: node 1 goes for good while the save of step 10 is begun.
    The survivor resumes from step 5, never from the half-written step 10, and ends with the loss of one
    process; every published checkpoint verifies, and the partial save as the node left it is refused."""
    path, root = str(tmp_path / "metrics.jsonl"), str(tmp_path / "ck")
    args = ["train", *FLAGS, "--steps", str(STEPS), "--dp", "auto", "--metrics", path, "--checkpoint-dir", root,
            "--checkpoint-every", "5", "--simulate-failure", "2:10:save-permanent"]
    launch = cluster.start(args, launcher_args=LAUNCHER, rdzv_conf=FAST_RDZV, env=ELASTIC_ENV)
    assert launch.wait_until(lambda: launch.procs[1].poll() is not None, timeout=240), launch.wait(1).summary()
    partial = keep_partial_save(tmp_folder(root, 10), str(tmp_path / "partial"))  # before the survivors clean it up
    result = launch.wait(timeout=400)
    assert not result.timed_out and result.nodes[0].returncode == 0, result.summary()
    assert result.nodes[1].returncode == -signal.SIGKILL, result.summary()  # the node took itself away
    records = read_records(path)
    assert [r["resumed_from_step"] for r in records if r.get("event") == "restart"] == [5]
    check_run(records, reference(STEPS), STEPS, [(4, 2)])
    published = checkpoints(root)
    assert [int(os.path.basename(f).split("_")[1]) for f in published] == [20, 15, 10]
    for folder in published:
        verify(folder)
    assert not [n for n in os.listdir(root) if n.startswith(".tmp-")]  # leftovers removed at the next publication
    refuses_partial(partial, published[0], str(tmp_path / "check"))


def keep_partial_save(tmp: str, to: str) -> str | None:
    """A copy of the save folder `tmp` as it is now, or None where it is gone already."""
    try:
        shutil.copytree(tmp, to)
    except (FileNotFoundError, shutil.Error):
        return None
    return to


def refuses_partial(partial: str | None, good: str, check: str) -> None:
    """A partial save (no manifest: publication writes it last, then renames the folder) is never the
    newest good checkpoint, even under a published name beside a good one: the copy of the real one (the
    node left before writing, so it may hold nothing yet), and one as the protocol leaves it later on,
    all data written but no manifest. Each sits under a published name and under its save-time name."""
    shutil.copytree(good, os.path.join(check, os.path.basename(good)))
    written = os.path.join(check, "written")
    shutil.copytree(good, written)
    os.remove(os.path.join(written, MANIFEST))
    halves = {30: written} if partial is None else {30: written, 40: partial}
    if partial is not None:
        assert not os.path.exists(os.path.join(partial, MANIFEST))
    for step, folder in halves.items():
        shutil.copytree(folder, tmp_folder(check, step))
        shutil.copytree(folder, os.path.join(check, f"step_{step:08d}"))
        with pytest.raises(CheckpointError):
            verify(os.path.join(check, f"step_{step:08d}"))
    folder, skipped = latest_good(check)
    assert folder == os.path.join(check, os.path.basename(good))
    assert len(skipped) == len(halves) and all("manifest" in why for why in skipped), skipped


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--dp", "auto"], ["--dp", "auto", "--zero", "3"]], ids=["dp4", "dp4-zero3"])
def test_the_survivor_restores_its_snapshot_where_its_node_holds_a_whole_replica(cluster, reference, tmp_path,
                                                                                 layout):
    kill_at = random.Random("snapshot " + " ".join(layout)).randint(6, STEPS - 4)
    records = lose_node_1(cluster, tmp_path, layout, kill_at, extra=("--snapshot-every", "1",
                                                                      "--snapshot-dir", str(tmp_path / "shm")))
    check_run(records, reference(STEPS), STEPS, [(4, 2)])
    restart = next(r for r in records if r.get("event") == "restart")
    if "--zero" in layout:  # each node held half the shards: the disk checkpoint serves, and the run says why
        assert restart["restored_from"] == "disk" and restart["resumed_from_step"] % 5 == 0
        assert "holds only its ranks' shards" in LAST["run"].nodes[0].stdout
    else:  # at most the step in flight at the kill is redone
        assert restart["steps_redone"] <= 1 and restart["resumed_from_step"] >= kill_at - 1
