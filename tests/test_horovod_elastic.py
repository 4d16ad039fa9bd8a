"""`hvd.elastic` on paratrain's restarts: a Horovod elastic script under torchrun --max-restarts 1
commits its model, optimizer and epoch every epoch; a worker fails in epoch 3 of the first attempt;
torchrun restarts every worker, `@hvd.elastic.run` gives them the newest commit (epoch 2 done,
the model and optimizer as committed) and the run ends with the parameters of one that never failed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import os, sys, torch
import paratrain.horovod as hvd

hvd.init()
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
optimizer = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                     named_parameters=model.named_parameters())
state = hvd.elastic.TorchState(model, optimizer, epoch=0)
resets = []
state.register_reset_callbacks([lambda: resets.append(hvd.size())])

@hvd.elastic.run
def train(state):
    while state.epoch < 5:
        g = torch.Generator().manual_seed(100 * state.epoch + hvd.rank())
        x = torch.randn(8, 4, generator=g)
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()
        if state.epoch == 3 and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            if hvd.rank() == 1 and os.environ.get("FAIL") == "1":
                raise RuntimeError("worker lost")
            if hvd.rank() == 2 and os.environ.get("FAIL") == "node":
                from paratrain.faults import lose_node
                lose_node()  # its torchrun agent and both its workers SIGKILLed: a node gone for good
        state.epoch += 1
        state.commit()  # the epoch done, and the one to start from

first = os.environ.get("TORCHELASTIC_RESTART_COUNT")
train(state)
if hvd.rank() == 0:
    print("RESULT", first, resets, state.epoch, [round(v, 6) for v in model.weight.detach().flatten().tolist()])
"""


def _run(tmp_path, fail: bool) -> str:
    script = tmp_path / "elastic_script.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "FAIL": "1" if fail else "0",
        "PARATRAIN_HOROVOD_STATE_DIR": str(tmp_path / "state"),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            "1",
            str(script),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))


def test_a_restarted_elastic_script_continues_from_its_last_commit(tmp_path):
    clean = _run(tmp_path / "a", fail=False) if (tmp_path / "a").mkdir() is None else None
    failed = _run(tmp_path / "b", fail=True) if (tmp_path / "b").mkdir() is None else None
    assert clean.startswith("RESULT 0 [] 5 ")
    assert failed.startswith("RESULT 1 [2] 5 ")  # the second attempt, its reset callback called
    assert clean.split(" 5 ", 1)[1] == failed.split(" 5 ", 1)[1]  # the same weights as the run that never failed


def _one_process(worlds: list[int]) -> list[float]:
    """The script's math in one process: each epoch, SGD with momentum on the average over that
    epoch's ranks of their gradients."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for epoch, world in enumerate(worlds):
        optimizer.zero_grad()
        for r in range(world):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(100 * epoch + r))
            (model(x).pow(2).mean() / world).backward()
        optimizer.step()
    return model.weight.detach().flatten().tolist()


@pytest.mark.slow
def test_a_node_lost_for_good_resumes_the_commit_in_the_smaller_world(tmp_path):
    """Two local torchrun agents of two workers (`--nnodes 1:2`); after epoch 3's step rank 2 takes
    its node with it, before its commit. Rank 0 (the other node) committed epoch 3; that agent's
    workers re-rendezvous at a world of 2, `@hvd.elastic.run` gives them the commit, the reset
    callback sees the new size, and the weights are those of one process that averaged 4 ranks for
    epochs 0-3 and 2 ranks for epoch 4."""
    from test_elastic_local import run_two_agents

    script = tmp_path / "elastic_script.py"
    script.write_text(SCRIPT)
    env = {"FAIL": "node", "PARATRAIN_HOROVOD_STATE_DIR": str(tmp_path / "state")}
    agents, summary = run_two_agents(tmp_path, [], entry=(str(script),), env=env)
    assert agents[0].returncode == 0 and agents[1].returncode == -signal.SIGKILL, summary
    result = next(line for line in agents[0].stdout.splitlines() if line.startswith("RESULT"))
    first, resets, rest = result.split(" ", 3)[1], result.split("[", 1)[1].split("]")[0], result.rsplit("[", 1)[1]
    assert int(first) >= 1 and resets == "2", result  # restarted, the reset callback saw a world of 2
    weights = [float(v) for v in rest.rstrip("]").split(",")]
    assert weights == pytest.approx(_one_process([4, 4, 4, 4, 2]), abs=1e-5)
