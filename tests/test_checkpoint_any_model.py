"""Checkpoints of any model, not only paratrain's GPT.

A small CNN with BatchNorm (4-D conv weights, running statistics, a frozen parameter, a
non-persistent buffer) trained under dp=2 ZeRO-3 is saved with the Checkpointer and loaded into
one process (ZeRO-0) and into dp=2 ZeRO-1: parameters, buffers and Adam's moments are those
saved, and the next steps give the losses of the run never stopped. A Hugging Face GPT-2 with its
head tied to the embedding, saved under dp=2 ZeRO-1 and exported, loads into a fresh
GPT2LMHeadModel with strict=True and gives the same logits. ZeRO's flat shards cut a tensor of
any shape into contiguous boxes; a guarded ZeRO optimizer refuses another rank's shard.
"""

import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import spawn
from paratrain.checkpoint import flat_range_boxes, guard_sharded_optimizer, read_tensors


# ------------------------------------------------------------------ no processes
@pytest.mark.parametrize("shape", [(), (3,), (2, 3), (2, 3, 4), (2, 1, 3, 2)])
def test_flat_range_boxes_tile_every_range_of_any_shape(shape):
    n = math.prod(shape)
    index = torch.arange(n).reshape(shape)
    for a in range(n):
        for b in range(a + 1, n + 1):
            boxes = flat_range_boxes(a, b, shape)
            assert len(boxes) <= 2 * max(len(shape) - 1, 0) + 1, (a, b, boxes)
            covered = []
            for offset, size, lo, hi in boxes:
                flat = index[tuple(slice(o, o + s) for o, s in zip(offset, size))].reshape(-1).tolist()
                assert flat == list(range(lo, hi)), (a, b, offset, size)  # contiguous, in flat order
                covered += flat
            assert covered == list(range(a, b)), (a, b, boxes)  # exactly [a, b), each element once


def test_guarded_zero_optimizer_refuses_another_ranks_shard():
    def optimizer(dp_rank, dp, stage):
        p = nn.Parameter(torch.full((4,), float(dp_rank)))
        opt = torch.optim.AdamW([p], lr=0.1)
        p.grad = torch.ones(4)
        opt.step()
        guard_sharded_optimizer(opt, dp_rank, dp, stage)
        return opt

    saved = optimizer(0, 2, 1).state_dict()
    optimizer(0, 2, 1).load_state_dict(saved)  # the same shard: fine
    for other in [(1, 2, 1), (0, 4, 1), (0, 2, 2), (0, 1, 0)]:
        with pytest.raises(ValueError, match="trainer.save_checkpoint") as e:
            optimizer(*other).load_state_dict(saved)
        assert "\n" not in str(e.value)
    plain = torch.optim.AdamW([nn.Parameter(torch.zeros(4))]).state_dict()
    with pytest.raises(ValueError, match="records no shard"):
        optimizer(1, 2, 3).load_state_dict(plain)
    whole = optimizer(0, 2, 0).state_dict()  # stage 0: every rank holds the whole state
    optimizer(1, 2, 0).load_state_dict(whole)
    optimizer(0, 1, 0).load_state_dict(whole)


# ------------------------------------------------------------------ a CNN with BatchNorm
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(6 * 4 * 4, 10)
        self.shift = nn.Parameter(torch.full((1, 1, 1), 0.1), requires_grad=False)  # frozen
        self.register_buffer("scratch", torch.zeros(2), persistent=False)  # not in state_dict()

    def forward(self, x):
        return self.head(self.features(x - self.shift).flatten(1))


PARTS = 2  # the global batch of 8 images in two parts: one per rank at dp=2, both at dp=1


def cnn_step(engine, optimizer, mesh, k: int) -> float:
    """Step k on the global batch of k (a function of k only); returns the global mean loss."""
    from paratrain.parallel.zero import ZeroDataParallel

    gen = torch.Generator().manual_seed(1000 + k)
    x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    dp, r = mesh.size("dp"), mesh.coord("dp")
    parts = list(zip(x.chunk(PARTS), y.chunk(PARTS)))[r * PARTS // dp : (r + 1) * PARTS // dp]
    engine.train()
    engine.zero_grad()
    total = torch.zeros(())
    for i, (xi, yi) in enumerate(parts):  # BatchNorm sees the same parts in every layout
        with nullcontext() if i == len(parts) - 1 else engine.no_sync():
            loss = F.cross_entropy(engine(xi), yi) / PARTS
            loss.backward()
        total += loss.detach()
    engine.finish_grad_sync()
    if isinstance(engine, ZeroDataParallel):
        engine.unscale_grads(1.0)
        optimizer.step()
        engine.publish()
    else:
        optimizer.step()
    if dp > 1:
        torch.distributed.all_reduce(total, group=mesh.group("dp"))
    return float(total)


def cnn_setup(zero: int, seed: int, root: str):
    import paratrain
    from paratrain.api import optimizer_params
    from paratrain.checkpoint import Checkpointer
    from paratrain.mesh import Mesh

    mesh = Mesh.build(dp=torch.distributed.get_world_size())
    torch.manual_seed(seed)
    engine = paratrain.parallelize(SmallCNN(), mesh, zero=zero)
    optimizer = torch.optim.AdamW(optimizer_params(engine, 0.01), lr=1e-2)
    ckpt = Checkpointer(root, engine, optimizer, mesh, None, identity={"name": "SmallCNN"},
                        layout=f"dp={mesh.size('dp')},zero={zero}")
    return mesh, engine, optimizer, ckpt


def cnn_saved_run(root: str):
    """dp=2 ZeRO-3: three steps, a checkpoint, three more."""
    from paratrain.checkpoint import full_state_dict

    mesh, engine, optimizer, ckpt = cnn_setup(3, 0, root)
    losses = [cnn_step(engine, optimizer, mesh, k) for k in (1, 2, 3)]
    ckpt.save(3)
    saved = full_state_dict(engine, mesh)
    losses += [cnn_step(engine, optimizer, mesh, k) for k in (4, 5, 6)]
    return losses, saved


def cnn_resumed_run(zero: int, folder: str, again: str):
    """Another layout (and other initial weights): load, save again under `again`, three steps."""
    from paratrain.checkpoint import full_state_dict

    mesh, engine, optimizer, ckpt = cnn_setup(zero, 99, again)
    assert ckpt.load(folder) == 3
    loaded = full_state_dict(engine, mesh)
    ckpt.save(3)
    return [cnn_step(engine, optimizer, mesh, k) for k in (4, 5, 6)], loaded


def cnn_saved_and_resumed(root: str):
    """The saved run, then (in the same two processes, to spare a start-up) its resumption
    under dp=2 ZeRO-1."""
    saved = cnn_saved_run(f"{root}/zero3")
    return saved, cnn_resumed_run(1, f"{root}/zero3/step_00000003", f"{root}/zero1")


@pytest.fixture(scope="module")
def cnn_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    (losses, saved), resumed = spawn(cnn_saved_and_resumed, 2, str(root))[0]
    return root, losses, saved, resumed


def check_resumed(root, losses, saved, resumed, again) -> None:
    """The resumed run's model is the saved one; its re-save holds the same Adam moments; its
    steps give the losses of the run never stopped."""
    continued, loaded = resumed
    assert loaded.keys() == saved.keys()
    for name in saved:  # parameters, buffers, the frozen parameter: exactly as saved
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0, msg=name)
    first, second = read_tensors(str(root / "zero3" / "step_00000003"), "optim/"), read_tensors(again, "optim/")
    assert first.keys() == second.keys() and "exp_avg/features.0.weight" in first
    for name in first:  # Adam's moments went through the other layout unchanged
        torch.testing.assert_close(second[name], first[name], rtol=0, atol=0, msg=name)
    torch.testing.assert_close(torch.tensor(continued), torch.tensor(losses[3:]), rtol=1e-5, atol=0)


def test_cnn_saved_under_zero3_holds_every_tensor_of_its_state_dict(cnn_runs):
    _, _, saved, _ = cnn_runs
    assert saved["features.0.weight"].dim() == 4 and "features.1.running_var" in saved
    assert "features.1.num_batches_tracked" in saved and "shift" in saved and "scratch" not in saved
    assert list(saved) == list(SmallCNN().state_dict())


def test_cnn_saved_under_zero3_resumes_under_dp2_zero1(cnn_runs):
    root, losses, saved, resumed = cnn_runs
    check_resumed(root, losses, saved, resumed, str(root / "zero1" / "step_00000003"))


def test_cnn_saved_under_zero3_resumes_in_one_process(cnn_runs, tmp_path):
    root, losses, saved, _ = cnn_runs
    resumed = spawn(cnn_resumed_run, 1, 0, str(root / "zero3" / "step_00000003"), str(tmp_path))[0]
    check_resumed(root, losses, saved, resumed, str(tmp_path / "step_00000003"))


# ------------------------------------------------------------------ a Hugging Face GPT-2
def gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def gpt2_saved_run(root: str):
    """dp=2 ZeRO-1: two steps, a checkpoint; rank 0's logits on fixed tokens."""
    from transformers import GPT2LMHeadModel

    import paratrain
    from paratrain.api import optimizer_params
    from paratrain.checkpoint import Checkpointer, full_state_dict
    from paratrain.mesh import Mesh

    mesh = Mesh.build(dp=2)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    engine = paratrain.parallelize(model, mesh, zero=1)
    optimizer = torch.optim.AdamW(optimizer_params(engine, 0.01), lr=1e-2)
    ckpt = Checkpointer(root, engine, optimizer, mesh, None, identity={"name": "gpt2-test"}, layout="dp=2,zero=1")
    for k in (1, 2):
        ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(k)).chunk(2)[mesh.coord("dp")]
        engine.zero_grad()
        (engine(ids, labels=ids).loss / 2).backward()
        engine.finish_grad_sync()
        engine.unscale_grads(1.0)
        optimizer.step()
        engine.publish()
    ckpt.save(2)
    keys = full_state_dict(engine, mesh)
    engine.eval()
    with torch.no_grad():
        logits = engine(torch.arange(8).view(1, 8)).logits
    if torch.distributed.get_rank() == 0:
        assert list(keys) == list(GPT2LMHeadModel(gpt2_config()).state_dict())  # the tied head's name too
        return logits, ckpt.aliases, fresh_logits(root)
    return None


def fresh_logits(root: str) -> torch.Tensor:
    """Export the checkpoint to .safetensors, load it into a fresh GPT2LMHeadModel (strict), run it."""
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from paratrain.checkpoint import export

    export(root, f"{root}/model.safetensors")
    torch.manual_seed(7)  # other weights, so that loading matters
    fresh = GPT2LMHeadModel(gpt2_config())
    fresh.load_state_dict(load_file(f"{root}/model.safetensors"), strict=True)
    fresh.eval()
    with torch.no_grad():
        return fresh(torch.arange(8).view(1, 8)).logits


@pytest.mark.slow
def test_hugging_face_gpt2_with_a_tied_head_exports_for_a_fresh_model(tmp_path):
    logits, aliases, fresh = spawn(gpt2_saved_run, 2, str(tmp_path))[0]  # rank 0 exports (no transformers here)
    assert aliases == {"lm_head.weight": "transformer.wte.weight"}
    torch.testing.assert_close(fresh, logits, rtol=1e-5, atol=1e-6)
