"""`hvd.elastic` on paratrain's restarts: a Horovod elastic script under torchrun --max-restarts 1
commits its model, optimizer and epoch every epoch; a worker fails in epoch 3 of the first attempt;
torchrun restarts every worker, `@hvd.elastic.run` gives them the newest commit (epoch 2 done,
the model and optimizer as committed) and the run ends with the parameters of one that never failed."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = '''
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
        if state.epoch == 3 and hvd.rank() == 1 and os.environ.get("FAIL") == "1" and \\
                os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
            raise RuntimeError("worker lost")
        state.epoch += 1
        state.commit()  # the epoch done, and the one to start from

first = os.environ.get("TORCHELASTIC_RESTART_COUNT")
train(state)
if hvd.rank() == 0:
    print("RESULT", first, resets, state.epoch, [round(v, 6) for v in model.weight.detach().flatten().tolist()])
'''


def _run(tmp_path, fail: bool) -> str:
    script = tmp_path / "elastic_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": ROOT, "FAIL": "1" if fail else "0",
           "PARATRAIN_HOROVOD_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "--max-restarts", "1", str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))


def test_a_restarted_elastic_script_continues_from_its_last_commit(tmp_path):
    clean = _run(tmp_path / "a", fail=False) if (tmp_path / "a").mkdir() is None else None
    failed = _run(tmp_path / "b", fail=True) if (tmp_path / "b").mkdir() is None else None
    assert clean.startswith("RESULT 0 [] 5 ")
    assert failed.startswith("RESULT 1 [2] 5 ")  # the second attempt, its reset callback called
    assert clean.split(" 5 ", 1)[1] == failed.split(" 5 ", 1)[1]  # the same weights as the run that never failed
