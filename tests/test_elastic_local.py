"""An elastic run on one machine, no root needed: two torchrun agents on localhost (`--nnodes 1:2`, one
c10d rendezvous that the first agent hosts), two ranks each. `--simulate-failure 2:STEP:permanent`
makes the worker of rank 2 take its whole node with it (its agent and that agent's workers are
SIGKILLed); the other agent's workers re-rendezvous at a world of 2, dp follows (`--dp auto`), the
run resumes from the newest checkpoint and ends with the final loss of one process."""

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from helpers import cli, refused
from paratrain.cluster import ELASTIC_ENV, FAST_RDZV, kill_until_gone, read_records
from paratrain.faults import descendants, is_torchrun_agent, lose_node

STEPS = 20
FLAGS = [
    "--model",
    "tiny",
    "--global-batch",
    "8",
    "--seq-len",
    "32",
    "--seed",
    "5",
    "--no-progress",
    "--steps",
    str(STEPS),
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "PARATRAIN_ELASTIC_LOCAL"  # in the environment of every process a test starts, to find them all


def free_port() -> int:
    """A free TCP port below the ephemeral range, so that no port the workers take meanwhile (gloo's,
    the agents' worker stores: all ephemeral) can be it."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def agent_argv(
    port: int, run_id: str, host: bool, args: list[str], entry: tuple[str, ...] = ("-m", "paratrain")
) -> list[str]:
    """One torchrun agent of the run: 2 workers, elastic 1 to 2 nodes, FAST_RDZV, hosting the store or
    not, each worker running `entry ARGS` (paratrain's CLI, or a script)."""
    conf = ",".join(f"{k}={v}" for k, v in {**FAST_RDZV, "is_host": int(host)}.items())
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1:2",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "3",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        run_id,
        "--rdzv-conf",
        conf,
        *entry,
        *args,
    ]


def marked_pids(mark: str) -> list[int]:
    """The processes whose environment holds MARK=mark (workers outlive a killed agent, in sessions of their own)."""
    needle = f"{MARK}={mark}".encode()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            try:
                with open(f"/proc/{name}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        out.append(int(name))
            except OSError:
                pass
    return out


def kill_marked(mark: str) -> None:
    kill_until_gone(lambda: marked_pids(mark), pause=0.05)


def run_two_agents(
    tmp_path,
    args: list[str],
    timeout: float = 240,
    entry: tuple[str, ...] = ("-m", "paratrain"),
    env: dict | None = None,
) -> tuple[list[subprocess.CompletedProcess], str]:
    """Start the hosting agent, then the other, both running `paratrain ARGS`; wait for both. The
    rendezvous orders nodes by pid, so the first agent holds ranks 0-1 (it hosts the store, which must
    outlive the loss) and the second ranks 2-3. Every process started is SIGKILLed at the end."""
    mark = uuid.uuid4().hex
    env = {
        **os.environ,
        **(env or {}),
        **ELASTIC_ENV,
        MARK: mark,
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
    }
    procs = []
    try:
        port, run_id = free_port(), f"paratrain-local-{mark[:8]}"
        for k in range(2):
            out, err = open(tmp_path / f"agent{k}.out", "w+"), open(tmp_path / f"agent{k}.err", "w+")
            procs.append(
                (
                    subprocess.Popen(
                        agent_argv(port, run_id, k == 0, args, entry),
                        env=env,
                        stdout=out,
                        stderr=err,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    ),
                    out,
                    err,
                )
            )
        assert procs[0][0].pid < procs[1][0].pid, "pids wrapped around: the rendezvous would rank the host second"
        deadline = time.monotonic() + timeout
        for p, _, _ in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p, _, _ in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        kill_marked(mark)
    results = []
    for p, out, err in procs:
        p.wait()
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        results.append(subprocess.CompletedProcess(p.args, p.returncode, *texts))
    summary = "\n".join(f"agent {k}: exit {r.returncode}\n{r.stderr[-3000:]}" for k, r in enumerate(results))
    return results, summary


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The final loss of one process trained with the same flags."""
    path = tmp_path_factory.mktemp("reference") / "metrics.jsonl"
    out = cli("train", *FLAGS, "--dp", "1", "--metrics", str(path))
    assert out.returncode == 0, out.stderr
    return read_records(str(path))[-1]["final_loss"]


def lose_a_node(tmp_path, fault: str, *more: str) -> tuple[list[dict], list[subprocess.CompletedProcess]]:
    """Train on two local agents with `--simulate-failure fault`; the agent of ranks 2-3 must be gone
    (SIGKILLed) and the other finish; returns the metrics records and the agents' results."""
    metrics = str(tmp_path / "metrics.jsonl")
    args = [
        "train",
        *FLAGS,
        "--dp",
        "auto",
        "--checkpoint-dir",
        str(tmp_path / "ck"),
        "--checkpoint-every",
        "5",
        "--metrics",
        metrics,
        "--simulate-failure",
        fault,
        *more,
    ]
    agents, summary = run_two_agents(tmp_path, args)
    assert agents[0].returncode == 0, summary
    assert agents[1].returncode == -signal.SIGKILL, summary  # the node of rank 2, lost for good
    return read_records(metrics), agents


def check_survivor(records: list[dict], final_loss: float, resumed_from: int) -> None:
    assert records[0]["event"] == "start" and records[0]["world_size"] == 4, records[0]
    restarts = [r for r in records if r.get("event") == "restart"]
    assert [(r["world_size"], r["resumed_from_step"]) for r in restarts] == [(2, resumed_from)], restarts
    assert restarts[0]["layout"].startswith("dp=2,tp=1,pp=1")
    steps = sorted(r["step"] for r in records if "event" not in r)
    assert steps == list(range(1, STEPS + 1))  # every step once, the redone ones included
    end = records[-1]
    assert end["event"] == "end" and end["steps"] == STEPS
    assert end["final_loss"] == pytest.approx(final_loss, rel=1e-5)
    assert end["membership_changes"] == 1  # the membership record itself: asserted in test_elastic


def test_a_node_lost_for_good_leaves_the_other_agent_to_finish(tmp_path, one_process):
    records, _ = lose_a_node(tmp_path, "2:8:permanent")
    check_survivor(records, one_process, resumed_from=5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault,resumed_from", [("2:3:permanent", 0), ("3:10:save-permanent", 5)], ids=["before-any-checkpoint", "in-a-save"]
)
def test_a_node_lost_before_a_checkpoint_or_in_a_save(tmp_path, one_process, fault, resumed_from):
    records, _ = lose_a_node(tmp_path, fault)
    check_survivor(records, one_process, resumed_from)
    saved = [r["step"] for r in records if r.get("event") == "checkpoint"]
    assert 10 in saved and saved.count(10) == 1  # step 10 published once: by the survivor, after the loss


@pytest.mark.slow
def test_balanced_shares_start_even_in_the_new_world_and_move_again(tmp_path, one_process):
    """--balance dynamic across the loss: rank 1 (on the surviving node) slowed 2x; after the restart at
    dp=2 the saved dp=4 shares do not apply, the run starts even and moves work off rank 1 again."""
    records, _ = lose_a_node(
        tmp_path, "2:8:permanent", "--balance", "dynamic", "--simulate-slowdown", "1:2", "--microbatches", "2"
    )
    check_survivor(records, one_process, resumed_from=5)
    steps = [r for r in records if "shares" in r]
    before = [r["shares"] for r in steps if len(r["shares"]) == 4]
    after = [r["shares"] for r in steps if len(r["shares"]) == 2]
    assert before[0] == [2, 2, 2, 2] and before[-1] != before[0]
    assert after[0] == [4, 4] and after[-1][0] > after[-1][1] and sum(after[-1]) == 8


@pytest.mark.parametrize("how", ["permanent", "save-permanent"])
def test_a_node_loss_is_refused_outside_torchrun(capsys, how):
    # paratrain's own launcher is the only node: its workers die with it, and nothing would go on
    code, err = refused(capsys, "train", *FLAGS, "--dp", "2", "--simulate-failure", f"1:3:{how}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"--simulate-failure 1:3:{how}" in lines[0] and "torchrun" in lines[0], err


def test_a_node_is_its_agents_process_tree_and_another_parent_is_never_signalled():
    if is_torchrun_agent(os.getppid()):
        pytest.skip("pytest runs under torchrun: lose_node() would take this node")
    grandchild = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])"
    child = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; {grandchild}; time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while not descendants(child.pid) and time.monotonic() < deadline:  # other tests may leave children too
            time.sleep(0.05)
        below = descendants(child.pid)
        assert len(below) == 1 and child.pid in descendants(os.getpid()) and below[0] in descendants(os.getpid())
        with pytest.raises(RuntimeError, match="not a torchrun agent"):
            lose_node()  # this process's parent is no torchrun agent: nothing is signalled
        assert child.poll() is None
    finally:
        for pid in descendants(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait()
