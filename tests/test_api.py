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
    trainer = paratrain.Trainer(hf_gpt2.build(), mesh, hf_gpt2.loss_fn, data=hf_gpt2.data(), zero=zero, lr=1e-3,
                                progress=False)
    return [trainer.run_step(k).loss for k in range(1, steps + 1)]


@pytest.fixture(scope="module")
def reference():
    return spawn(_train, 1, 0)[0]


@pytest.mark.parametrize("zero", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow), 3])
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


# ---------------------------------------------------------------- pipeline parallelism, own model
def _pipeline(pp: int, dp: int = 1, kw: dict | None = None, steps: int = 4):
    sys.path.insert(0, str(EXAMPLES))
    import own_model_pp as ex

    import paratrain

    mesh = paratrain.init(dp=dp, pp=pp)
    trainer = paratrain.Trainer(ex.build(), mesh, ex.loss_fn, data=ex.data(), lr=3e-3, progress=False, **(kw or {}))
    stages = [[int(b) for b in s] for s in trainer.pipeline.stage_blocks] if pp > 1 else None
    return [trainer.run_step(k).loss for k in range(1, steps + 1)], stages


@pytest.fixture(scope="module")
def pp_reference():
    return spawn(_pipeline, 1, 1)[0][0]


@pytest.mark.parametrize("pp,dp,kw", [
    pytest.param(2, 1, dict(microbatches=4), marks=pytest.mark.slow),
    (2, 1, dict(microbatches=4, schedule="interleaved", pp_split=[2, 4, 6])),
    (2, 2, dict(microbatches=2, schedule="gpipe", zero=1)),
    (2, 1, dict(microbatches=2, zero=3, activation_checkpointing=True)),
], ids=["pp2-1f1b", "pp2-interleaved-split", "dp2-pp2-gpipe-zero1", "pp2-zero3-ac"])
def test_own_sequential_model_under_pipeline_matches_one_process(pp_reference, pp, dp, kw):
    out = spawn(_pipeline, pp * dp, pp, dp, kw)
    for losses, _ in out:  # every rank returns the global mean loss
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(pp_reference), rtol=1e-5, atol=0)
    stages = out[0][1]  # the layers of each stage: contiguous, all of them, in order
    assert [i for s in stages for i in s] == list(range(9)) and all(s for s in stages)
    if "pp_split" in kw:
        assert [s[0] for s in stages[1:]] == kw["pp_split"]


def _pipeline_errors():
    import torch.nn as nn

    import paratrain

    mesh = paratrain.init(pp=2)
    errors = []
    lin = nn.Linear(4, 4)
    for model, kw in ((nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1), {}),
                      (nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU()), {"schedule": "interleaved", "microbatches": 2}),
                      (nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), {"pp_split": [5]}),
                      (nn.Sequential(nn.Linear(4, 4)), {})):
        try:
            paratrain.parallelize(model, mesh, **kw)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    return errors


def test_pipeline_refuses_what_it_cannot_cut():
    errors = spawn(_pipeline_errors, 2)[0]
    assert "nn.Sequential, or layers=" in errors[0]
    assert "stage 2 shares a parameter with stage 0; only the first and the last" in errors[1]
    assert "pp_split must name 1 increasing" in errors[2]
    assert "cannot fill 2 pipeline stages" in errors[3]


# ---------------------------------------------------------------- frozen parameters (fine-tuning)
FROZEN_RUNS = [dict(zero=0), dict(zero=3), dict(zero=1, precision="bf16")]


def _frozen(steps: int = 3):
    """A model whose embedding is frozen, trained under each of FROZEN_RUNS in turn: the losses,
    and whether the frozen weight stayed as it was (in the compute dtype) while the rest moved.
    Each rank builds it from its own seed: the wrappers start every replica from dp rank 0's
    parameters (frozen ones too) and buffers, so the run is rank 0's model trained on the batch."""
    import torch.nn as nn
    import torch.nn.functional as F

    import paratrain

    class Gain(nn.Module):  # a buffer in the forward
        def __init__(self):
            super().__init__()
            self.register_buffer("gain", torch.rand(32) + 0.5)

        def forward(self, x):
            return x * self.gain.to(x.dtype)

    mesh = paratrain.init()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = []
    for kw in FROZEN_RUNS:
        torch.manual_seed(rank)
        model = nn.Sequential(nn.Embedding(64, 32), Gain(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 64))
        model[0].weight.requires_grad_(False)
        frozen, head = model[0].weight.detach().clone(), model[4].weight.detach().clone()
        trainer = paratrain.Trainer(model, mesh, lambda y, t: F.cross_entropy(y.flatten(0, 1), t.flatten()),
                                    lr=1e-2, **kw)
        g, losses = torch.Generator().manual_seed(1), []
        for _ in range(steps):  # each rank its share of the same global batch
            x, t = torch.randint(0, 64, (2, 4, 8), generator=g)
            losses.append(trainer.step(x[rank * 4 // world:(rank + 1) * 4 // world],
                                       t[rank * 4 // world:(rank + 1) * 4 // world]))
        dtype = torch.bfloat16 if kw.get("precision") == "bf16" else torch.float32
        kept = torch.equal(model[0].weight, frozen.to(dtype))
        moved = kw["zero"] == 3 or not torch.equal(model[4].weight.float(), head)  # zero 3: the modules hold no weights
        out.append((losses, kept, moved))
    return out


def test_frozen_parameters_and_replicas_built_apart_match_one_process():
    reference = spawn(_frozen, 1)[0]
    for (losses, kept, moved), (ref, _, _), kw in zip(spawn(_frozen, 2)[0], reference, FROZEN_RUNS):
        assert kept and moved, kw
        rtol = 1e-2 if kw.get("precision") == "bf16" else 1e-5
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=rtol, atol=0)
