"""`paratrain horovodrun`: Horovod's launcher flags as torchrun commands (no processes started
here): one local host is `torchrun --standalone`; several hosts one agent each at a c10d
rendezvous on the first; `python [-m] X` and other programs; elastic bounds; hostfiles; bad
input in one line with exit status 2."""

from __future__ import annotations

import pytest

from helpers import refused
from paratrain.cli import build_parser
from paratrain.horovod.run import LaunchError, parse_hosts, plan


def _plan(*argv: str):
    return plan(build_parser().parse_args(["horovodrun", *argv]))


def test_one_local_host_is_standalone_torchrun():
    [(host, argv)] = _plan("-np", "4", "python", "train.py", "--epochs", "2")
    assert host == "localhost" and argv == ["--standalone", "--nproc-per-node", "4", "train.py", "--epochs", "2"]
    [(_, argv)] = _plan("-np", "2", "-H", "localhost:2", "python3", "-m", "pkg.train", "--lr", "0.1")
    assert argv[-4:] == ["-m", "pkg.train", "--lr", "0.1"]
    [(_, argv)] = _plan("-np", "2", "--reset-limit", "3", "./run.sh", "a")
    assert argv == ["--standalone", "--nproc-per-node", "2", "--max-restarts", "3", "--no-python", "./run.sh", "a"]


def test_several_hosts_get_one_agent_each_at_the_first_hosts_rendezvous():
    agents = _plan("-np", "4", "-H", "node-a:2,node-b:2", "python", "train.py")
    assert [h for h, _ in agents] == ["node-a", "node-b"]
    for _, argv in agents:
        assert argv[:4] == ["--nnodes", "2", "--nproc-per-node", "2"]
        assert argv[argv.index("--rdzv-endpoint") + 1] == "node-a:29400" and argv[-1] == "train.py"
    assert agents[0][1][agents[0][1].index("--rdzv-id") + 1] == agents[1][1][agents[1][1].index("--rdzv-id") + 1]
    two = _plan("-np", "2", "-H", "node-a:1,node-b:1,node-c:1", "python", "t.py")
    assert [h for h, _ in two] == ["node-a", "node-b"]  # the first hosts that hold -np
    elastic = _plan("-np", "4", "--min-np", "2", "--max-np", "6", "-H", "a:2,b:2,c:2", "python", "t.py")
    assert len(elastic) == 2 and elastic[0][1][1] == "1:3"


def test_hostfile_and_host_lists(tmp_path):
    f = tmp_path / "hosts"
    f.write_text("# cluster\nnode-a slots=2\nnode-b slots=2  # second\n\n")
    assert parse_hosts(None, str(f), None) == [("node-a", 2), ("node-b", 2)]
    assert parse_hosts("a,b", None, None) == [("a", 1), ("b", 1)]
    assert parse_hosts(None, None, 3) == [("localhost", 3)]
    with pytest.raises(LaunchError, match="HOST:SLOTS"):
        parse_hosts("a:x", None, None)


@pytest.mark.parametrize("argv,message", [
    (["-np", "3", "-H", "a:2,b:2", "python", "x.py"], "does not fill hosts a:2,b:2 evenly"),
    (["-np", "5", "python", "x.py"], None),
    (["-np", "4", "-H", "localhost:2", "python", "x.py"], "-np 4 is more than the 2 slots of localhost"),
    (["-np", "2", "--mpi", "python", "x.py"], "--mpi: paratrain runs on torch.distributed"),
    (["-np", "2", "python", "-c", "print(1)"], "not `python -c`"),
    (["-np", "2"], "give the training command"),
    (["-np", "2", "-H", "a:1", "--hostfile", "f", "python", "x.py"], "give -H or --hostfile, not both"),
])
def test_bad_horovodrun_commands_are_one_line_and_exit_2(capsys, argv, message):
    if message is None:  # -np alone on this host is fine: nothing to refuse
        assert _plan(*argv)[0][1][2] == "5"
        return
    code, err = refused(capsys, "horovodrun", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
