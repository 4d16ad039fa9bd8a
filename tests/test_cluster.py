"""Two nodes on one machine (paratrain.cluster): torchrun across network namespaces trains the same
losses as one process, and the harness leaves nothing behind, a run past its timeout included."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import cli
from paratrain.cluster import Cluster, available, cleanup_stale, namespaces

FLAGS = ["--model", "tiny", "--steps", "3", "--global-batch", "8", "--seq-len", "32", "--no-progress", "--seed", "5"]


@pytest.fixture(autouse=True)
def _needs_a_cluster():
    reason = available()
    if reason:
        pytest.skip(reason)


def losses(path) -> list[float]:
    """The loss of every step record (the lines without an "event" key) of a metrics file."""
    records = [json.loads(line) for line in open(path) if line.strip()]
    return [r["loss"] for r in records if "event" not in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    path = tmp_path_factory.mktemp("reference") / "metrics.jsonl"
    out = cli("train", *FLAGS, "--dp", "1", "--metrics", str(path))
    assert out.returncode == 0, out.stderr
    return losses(path)


@pytest.fixture(scope="module")
def cluster():
    with Cluster(nodes=2, ranks_per_node=2, rate="1gbit", name_prefix="pttrain") as c:
        yield c
    assert not [n for n in namespaces() if n.startswith("pttrain")]


def train_across(cluster, tmp_path, *layout) -> list[float]:
    path = tmp_path / "metrics.jsonl"  # the namespaces share the file system
    result = cluster.run(["train", *FLAGS, *layout, "--metrics", str(path)], timeout=400)
    assert result.ok, result.summary()
    return losses(path)


@pytest.mark.parametrize("layout", [
    pytest.param(["--dp", "4"], marks=pytest.mark.slow),
    ["--dp", "4", "--allreduce", "hierarchical"],
    pytest.param(["--dp", "2", "--tp", "2"], marks=pytest.mark.slow),
    pytest.param(["--dp", "2", "--pp", "2", "--microbatches", "2"], marks=pytest.mark.slow),
    pytest.param(["--dp", "4", "--allreduce", "auto"], marks=pytest.mark.slow),
    pytest.param(["--dp", "4", "--allreduce", "tree"], marks=pytest.mark.slow),
    pytest.param(["--dp", "2", "--tp", "2", "--allreduce", "ring"], marks=pytest.mark.slow),
    pytest.param(["--dp", "4", "--zero", "1", "--allreduce", "hierarchical"], marks=pytest.mark.slow),
    pytest.param(["--dp", "4", "--zero", "3", "--allreduce", "auto"], marks=pytest.mark.slow),
    pytest.param(["--dp", "2", "--tp", "2", "--zero", "2", "--allreduce", "ring"], marks=pytest.mark.slow),
], ids=["dp4", "dp4-hierarchical", "dp2-tp2", "dp2-pp2", "dp4-auto", "dp4-tree", "dp2-tp2-ring", "dp4-zero1-hierarchical",
        "dp4-zero3-auto", "dp2-tp2-zero2-ring"])
def test_two_nodes_train_the_losses_of_one_process(cluster, reference, tmp_path, layout):
    got = train_across(cluster, tmp_path, *layout)
    assert len(got) == len(reference) == 3
    assert got == pytest.approx(reference, rel=1e-5)
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"event"' not in line]
    for r in steps:  # the dp reduction crosses the nodes, tp and pp stay inside
        assert 0 < r["comm_bytes_inter_node"] < r["comm_bytes"]
        assert r["comm_bytes_intra_node"] + r["comm_bytes_inter_node"] == r["comm_bytes"]


def test_a_cluster_is_two_namespaces_and_a_bridge_and_nothing_is_left_after_an_error():
    with pytest.raises(RuntimeError, match="inside"):
        with Cluster(nodes=2, ranks_per_node=1, name_prefix="pterror") as c:
            assert set(c.names + [c.bridge]) <= set(namespaces())
            tc = subprocess.run(["tc", "-n", c.names[1], "qdisc", "show", "dev", c.ifname(1)],
                                capture_output=True, text=True).stdout
            assert "tbf" in tc and "1Gbit" in tc, tc
            ping = subprocess.run(["ip", "netns", "exec", c.names[0], sys.executable, "-c",
                                   "import socket; s = socket.create_connection((%r, 9), 5)" % c.addr(1)],
                                  capture_output=True, text=True)
            assert "Connection refused" in ping.stderr, ping.stderr  # node 1 answers (no one listens on 9)
            raise RuntimeError("inside the context")
    assert not [n for n in namespaces() if n.startswith("pterror")]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_run_past_its_timeout_is_killed_and_torn_down(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import os, sys, time\n"
                      "open(os.path.join(sys.argv[1], 'pid-' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
                      "time.sleep(600)\n")
    with Cluster(nodes=2, ranks_per_node=2, name_prefix="ptdown") as c:
        launch = c.start([str(script), str(tmp_path)], module=None)
        deadline = time.monotonic() + 120
        while len(list(tmp_path.glob("pid-*"))) < 4 and not launch.poll() and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = [int(p.read_text()) for p in tmp_path.glob("pid-*")]
        assert len(workers) == 4, "the four workers did not start"
        result = launch.wait(timeout=1)
        assert result.timed_out and not result.ok
        assert [n.returncode for n in result.nodes] == [None, None]
        assert c.pids(0) == [] and c.pids(1) == []
        assert not [pid for pid in workers if _alive(pid)]
    assert not [n for n in namespaces() if n.startswith("ptdown")]


def test_cleanup_stale_removes_the_namespaces_of_a_dead_process():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [f"ptstalenode0-{dead.pid}", f"ptstalebr-{dead.pid}"]
    mine = f"ptstalenode0-{os.getpid()}"
    for name in stale + [mine]:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert sorted(cleanup_stale("ptstale")) == sorted(stale)
        assert [n for n in namespaces() if n.startswith("ptstale")] == [mine]
    finally:
        for name in stale + [mine]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_bad_cluster_settings_are_refused_in_one_line():
    with pytest.raises(ValueError, match="not a tc rate"):
        Cluster(rate="fast")
    with pytest.raises(ValueError, match="nodes"):
        Cluster(nodes=0)
    with pytest.raises(ValueError, match="name_prefix"):
        Cluster(name_prefix="Bad-Name")
