"""The Python API with a model from a widely used library (Hugging Face GPT-2, from its config,
code unchanged): data parallelism and ZeRO-1/3 give the losses of one process; the examples run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import spawn

pytest.importorskip("transformers")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _train(zero: int, steps: int = 4):
    sys.path.insert(0, str(EXAMPLES))
    import hf_gpt2

    import paratrain

    mesh = paratrain.init()
    trainer = paratrain.Trainer(hf_gpt2.build(), mesh, hf_gpt2.loss_fn, zero=zero, lr=1e-3)
    return trainer.fit(hf_gpt2.batches(mesh), steps, log_every=0)


@pytest.fixture(scope="module")
def reference():
    return spawn(_train, 1, 0)[0]


@pytest.mark.parametrize("zero", [0, 1, 3])
def test_hugging_face_gpt2_under_dp_and_zero_matches_one_process(reference, zero):
    for losses in spawn(_train, 2, zero):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)
    assert reference[-1] < reference[0]


def test_own_model_example_with_tensor_parallelism_runs():
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                        str(EXAMPLES / "own_model_tp.py")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(line.split("loss ")[1].split()[0]) for line in r.stdout.splitlines() if "loss" in line]
    assert len(losses) == 4 and losses[-1] < losses[0]
