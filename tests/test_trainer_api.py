"""The one Trainer through the Python API, against one process on the same seed and batches:
paratrain's GPT as a spec under sequence parallelism, a Hugging Face Llama (built from its
config in the test) under dp x tp with ZeRO-1/2/3, dict inputs and gradient accumulation, a
sequential model under tp x pp and dp x pp, evaluation of a pipeline, the data helper, and the
user's own optimizer with its own hyper-parameters."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import spawn

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
STEPS = 3


# ---------------------------------------------------------------- paratrain's GPT as a spec
def _gpt(tp: int, settings: dict) -> list[float]:
    import paratrain
    from paratrain.data import load_corpus, token_batches
    from paratrain.models.spec import gpt_spec

    mesh = paratrain.init(tp=tp)
    data = token_batches(load_corpus(max_bytes=1 << 20), seq_len=32, global_batch=8, seed=5)
    trainer = paratrain.Trainer(gpt_spec("tiny", 5, 32), mesh, data=data, lr=3e-3, warmup_steps=2, steps=STEPS,
                                progress=False, **settings)
    return [trainer.run_step(k).loss for k in range(1, STEPS + 1)]


def test_api_sequence_parallel_matches_one_process():
    """The API's step is the CLI's: the sequence-parallel norms' gradients are summed over tp."""
    reference = spawn(_gpt, 1, 1, {})[0]
    for losses in spawn(_gpt, 2, 2, {"sequence_parallel": True}):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- a Hugging Face Llama
LLAMA_PLAN = {"model.embed_tokens": "vocab", "model.layers.*.self_attn.[qkv]_proj": "colwise",
              "model.layers.*.self_attn.o_proj": "rowwise", "model.layers.*.mlp.gate_proj": "colwise",
              "model.layers.*.mlp.up_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"}
# Hugging Face's own plans as they are (`model.tp_plan`, and the base model's without the `model.`
# prefix), sequence parallelism included, and paratrain's styles written by hand
LLAMA_RUNS = [dict(zero=1, microbatches=2, tp_plan="own"), dict(zero=2, tp_plan="base", sequence_parallel=True),
              dict(zero=3, microbatches=2, tp_plan="ours")]


def _llama(tp: int) -> list[list[float]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import paratrain
    from paratrain.data import DatasetLoader

    mesh = paratrain.init(tp=tp)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (64, 17), generator=g)
    dataset = [({"input_ids": row[:-1]}, row[1:]) for row in ids]  # inputs as Hugging Face takes them

    def loss_fn(out, targets):
        return F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())

    out = []
    for run in LLAMA_RUNS:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=32))
        kw = {k: v for k, v in run.items() if k != "tp_plan" and (tp > 1 or k != "sequence_parallel")}
        plan = {"own": model.tp_plan, "base": model.config.base_model_tp_plan, "ours": LLAMA_PLAN}[run["tp_plan"]]
        trainer = paratrain.Trainer(model, mesh, loss_fn, data=DatasetLoader(dataset, 8, seed=1),
                                    tp_plan=plan if tp > 1 else None, lr=2e-3, progress=False, **kw)
        out.append([trainer.run_step(k).loss for k in range(1, STEPS + 1)])
    return out


def test_hugging_face_llama_under_dp_tp_zero_and_accumulation_matches_one_process():
    reference = spawn(_llama, 1, 1)[0]
    for ranks in spawn(_llama, 4, 2):  # dp=2 x tp=2
        for losses, ref, kw in zip(ranks, reference, LLAMA_RUNS):
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref), rtol=1e-5, atol=0, msg=str(kw))
    assert reference[0][-1] < reference[0][0]


# ---------------------------------------------------------------- a sequential model under pp
class Block(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


def sequential(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(64, 32), *[Block() for _ in range(4)], nn.LayerNorm(32), nn.Linear(32, 64))


def token_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _sequential(dp: int, tp: int, pp: int, kw: dict) -> tuple[list[float], float]:
    import paratrain
    from paratrain.data import DatasetLoader

    mesh = paratrain.init(dp=dp, tp=tp, pp=pp)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 64, (48, 8), generator=g)
    data = DatasetLoader(list(zip(x, (x + 1) % 64)), 8, seed=4)
    plan = {"*.up": "colwise", "*.down": "rowwise"} if tp > 1 else None
    trainer = paratrain.Trainer(sequential(), mesh, token_loss, data=data, eval_data=data, tp_plan=plan, lr=3e-3,
                                eval_batches=2, progress=False, **kw)
    losses = [trainer.run_step(k).loss for k in range(1, STEPS + 1)]
    return losses, trainer.evaluate()


@pytest.mark.parametrize("dp,tp,pp,kw", [
    (1, 2, 2, dict(zero=1, microbatches=4)),
    pytest.param(2, 1, 2, dict(zero=3, microbatches=2, schedule="gpipe"), marks=pytest.mark.slow),
], ids=["tp2-pp2-zero1-mb4", "dp2-pp2-zero3-gpipe"])
def test_sequential_model_under_tp_pp_zero_matches_one_process(dp, tp, pp, kw):
    ref_losses, ref_val = spawn(_sequential, 1, 1, 1, 1, {})[0]
    for losses, val in spawn(_sequential, dp * tp * pp, dp, tp, pp, kw):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=0)
        assert val == pytest.approx(ref_val, rel=1e-5)  # a pipeline evaluates through its schedule


# ---------------------------------------------------------------- the user's optimizer, one process
def _optimizers() -> dict:
    import functools

    import paratrain

    mesh = paratrain.init()
    x, y = torch.randn(16, 8), torch.randn(16, 2)
    out = {}
    for name, opt in (("factory", functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01)),
                      ("class", torch.optim.Adagrad)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        twin.load_state_dict(model.state_dict())
        trainer = paratrain.Trainer(model, mesh, F.mse_loss, optimizer=opt, grad_clip=0.0)
        ref = opt(twin.parameters())
        for _ in range(3):
            trainer.step(x, y)
            ref.zero_grad()
            F.mse_loss(twin(x), y).backward()
            ref.step()
        out[name] = (trainer.optimizer.param_groups[0]["weight_decay"],
                     all(torch.allclose(a, b, rtol=1e-6, atol=1e-7) for a, b in zip(model.parameters(),
                                                                                    twin.parameters())))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.5)
    trainer = paratrain.Trainer(model, mesh, F.mse_loss, optimizer=sgd, zero=1)  # rebuilt over ZeRO's masters
    trainer.step(x, y)
    out["instance"] = (type(trainer.optimizer).__name__, trainer.optimizer.param_groups[0]["momentum"],
                       trainer.optimizer.param_groups[0]["lr"])
    keys = [k for k in model.state_dict()]
    paratrain.Trainer(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), mesh, F.mse_loss, zero=3,
                      blocks=None)
    m2 = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    paratrain.Trainer(m2, mesh, F.mse_loss, zero=3, blocks=[m2[0], m2[1]])
    out["blocks_keys"] = (keys, [k for k, _ in m2.named_modules()])
    return out


def test_users_optimizer_keeps_its_hyper_parameters_one_plain_process():
    out = spawn(_optimizers, 1)[0]
    assert out["factory"] == (0.01, True)  # the user's weight decay, and the same steps as plain torch
    assert out["class"] == (0, True)
    assert out["instance"] == ("SGD", 0.5, 0.05)
    assert "blocks" not in out["blocks_keys"][1]  # blocks= adds nothing to the user's model


# ---------------------------------------------------------------- checkpoints of the user's model
def _resumable(dp: int, tp: int, folder: str, steps: int, kw: dict) -> list[float]:
    import paratrain
    from paratrain.data import DatasetLoader

    mesh = paratrain.init(dp=dp, tp=tp)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 64, (64, 8), generator=g)
    plan = {"*.up": "colwise", "*.down": "rowwise"} if tp > 1 else None
    trainer = paratrain.Trainer(sequential(), mesh, token_loss, data=DatasetLoader(list(zip(x, (x + 1) % 64)), 8, 4),
                                tp_plan=plan, lr=3e-3, steps=steps, progress=False, checkpoint_dir=folder,
                                checkpoint_every=3, eval_batches=1, **kw)
    return trainer.fit()["losses"]  # from where the checkpoint left off


def test_users_model_saved_under_zero3_resumes_under_tp_and_one_process_and_exports(tmp_path):
    from safetensors.torch import load_file

    from paratrain.checkpoint import export

    reference = spawn(_resumable, 1, 1, 1, str(tmp_path / "ref"), 6, {})[0]  # never stopped
    saved = spawn(_resumable, 2, 2, 1, str(tmp_path / "ck"), 3, {"zero": 3})[0]
    torch.testing.assert_close(torch.tensor(saved), torch.tensor(reference[:3]), rtol=1e-5, atol=0)
    for dp, tp in ((1, 2), (1, 1)):
        folder = tmp_path / f"ck-{dp}-{tp}"
        shutil.copytree(tmp_path / "ck", folder)
        resumed = spawn(_resumable, dp * tp, dp, tp, str(folder), 6, {"resume": True})[0]
        torch.testing.assert_close(torch.tensor(resumed), torch.tensor(reference[3:]), rtol=1e-5, atol=0)
    export(str(tmp_path / "ck"), str(tmp_path / "model.safetensors"))
    fresh = sequential(seed=1)
    fresh.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)


# ---------------------------------------------------------------- BatchNorm: the Trainer is DDP
def _cnn_against_ddp(steps: int = 4):
    import functools
    import sys

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    sys.path.insert(0, str(EXAMPLES))
    import digits_cnn

    import paratrain

    mesh = paratrain.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    train, _ = digits_cnn.digits()
    data = paratrain.data.DatasetLoader(train, 32, seed=0)
    sgd = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    trainer = paratrain.Trainer(digits_cnn.build(), mesh, F.cross_entropy, data=data, optimizer=sgd, grad_clip=0.0)
    twin = DDP(digits_cnn.build())
    opt = sgd(twin.parameters())
    same = []
    for k in range(1, steps + 1):
        x, y = data.local_batch(k, rank, world)  # each rank its own images: buffers differ without the broadcast
        loss = trainer.step(x, y)
        opt.zero_grad()
        ref = F.cross_entropy(twin(x), y)
        ref.backward()
        opt.step()
        ref = ref.detach()
        dist.all_reduce(ref)
        mine = dict(trainer.model.module.state_dict())
        same.append((abs(loss - float(ref) / world) <= 1e-5 * abs(loss),
                     all(torch.allclose(mine[n].float(), t.float(), rtol=1e-5, atol=1e-6)
                         for n, t in twin.module.state_dict().items())))
    return same


def test_cnn_with_batchnorm_under_dp2_matches_torch_ddp_step_by_step_buffers_included():
    pytest.importorskip("sklearn")
    for rank in spawn(_cnn_against_ddp, 2):
        assert rank == [(True, True)] * 4


def _digits_run(args: list[str], nproc: int) -> float:
    import subprocess
    import sys

    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(nproc)]
    r = subprocess.run([*launcher, str(EXAMPLES / "digits_cnn.py"), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split("held-out accuracy ")[1].split("%")[0]) / 100


def test_digits_example_trains_a_cnn_in_one_plain_process():
    """paratrain.init() outside torchrun (a group of one); real data; the gathered model scores."""
    pytest.importorskip("sklearn")
    assert _digits_run(["--steps", "40"], 1) > 0.8


@pytest.mark.slow
def test_digits_example_under_torchrun_zero3_sync_batchnorm(tmp_path):
    pytest.importorskip("sklearn")
    assert _digits_run(["--steps", "40", "--zero", "3", "--sync-batchnorm", "--checkpoint-dir", str(tmp_path)], 2) > 0.8


RESTART_SCRIPT = '''
import torch, torch.nn as nn, torch.nn.functional as F, paratrain, sys
from paratrain.data import DatasetLoader
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 2))
g = torch.Generator().manual_seed(1)
x = torch.randn(64, 8, generator=g)
data = DatasetLoader(list(zip(x, x[:, :2].sin())), 8, seed=2)
trainer = paratrain.Trainer(model, paratrain.init(), F.mse_loss, data=data, steps=8, checkpoint_dir=sys.argv[1],
                            checkpoint_every=2, simulate_failure=sys.argv[2] or None, progress=False, metrics=sys.argv[3])
trainer.fit()
'''


@pytest.mark.slow
def test_api_script_restarts_under_torchrun_and_resumes_from_its_checkpoint(tmp_path):
    """A failure at step 5 under `torchrun --max-restarts 1`: the restarted Trainer resumes from
    step 4's checkpoint and ends with the losses of a run that never failed."""
    import json
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(RESTART_SCRIPT)
    runs = {}
    for name, fail in (("clean", ""), ("failed", "1:5")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", str(script), str(tmp_path / name), fail, str(tmp_path / f"{name}.jsonl")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        lines = [json.loads(line) for line in open(tmp_path / f"{name}.jsonl")]
        runs[name] = {rec["step"]: rec["loss"] for rec in lines if "event" not in rec}
        runs[name + "_end"] = lines[-1]
    assert sorted(runs["failed"]) == [5, 6, 7, 8]  # the restart's metrics file: from the checkpoint on
    assert "step_00000004" in runs["failed_end"]["resumed_from"]
    for step, loss in runs["failed"].items():
        assert loss == pytest.approx(runs["clean"][step], rel=1e-5)
