"""Data parallelism is the same math as one process: losses and gradients.

The per-step losses of dp=2 and dp=4 (with and without gradient accumulation) equal those of
dp=1 for 10 steps of `tiny` in fp32, through the real launcher; the gradients after one step
equal a plain single-process model's; buckets fire during backward and not under no_sync.
"""

import pytest
import torch
import torch.nn.functional as F

from helpers import spawn
from paratrain.config import RunConfig, validate
from paratrain.data import TokenLoader, load_corpus
from paratrain.launch import launch
from paratrain.mesh import Mesh
from paratrain.models.gpt import build_model
from paratrain.parallel.data import DataParallel

SEQ, BATCH, SEED = 32, 8, 11


def tiny_run(dp: int, microbatches: int = 1, steps: int = 10, bucket_mb: float = 25.0) -> list[float]:
    cfg = RunConfig()
    cfg.model.name = "tiny"
    cfg.layout.dp, cfg.layout.microbatches = dp, microbatches
    cfg.train.steps, cfg.train.global_batch, cfg.train.seq_len = steps, BATCH, SEQ
    cfg.train.seed, cfg.train.bucket_mb, cfg.train.progress = SEED, bucket_mb, False
    cfg.train.lr, cfg.train.warmup_steps = 3e-3, 2
    validate(cfg)
    return launch(cfg)["losses"]


@pytest.fixture(scope="module")
def reference() -> list[float]:
    return tiny_run(dp=1)


def test_reference_learns(reference):
    assert len(reference) == 10 and reference[-1] < reference[0] - 0.3


@pytest.mark.parametrize(
    "dp,microbatches,bucket_mb",
    [(2, 1, 25.0), pytest.param(4, 1, 25.0, marks=pytest.mark.slow), (2, 2, 25.0), (1, 4, 25.0), (2, 1, 0.01)],
    ids=["dp2", "dp4", "dp2-accum2", "dp1-accum4", "dp2-small-buckets"],
)
def test_losses_match_single_process(reference, dp, microbatches, bucket_mb):
    losses = tiny_run(dp, microbatches, bucket_mb=bucket_mb)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)


def reference_grads(microbatch_slices: int) -> dict[str, torch.Tensor]:
    """One backward of a plain model on the whole global batch: the gradient of the mean loss."""
    model = build_model("tiny", SEED)
    batch = TokenLoader(load_corpus("stdlib", max_bytes=1 << 20), SEQ, BATCH, SEED).batch(1)
    logits = model(batch.inputs)
    F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _dp_grads(microbatches: int, bucket_mb: float):
    """In a spawned rank: one accumulated backward under DataParallel; return grads and comm calls."""
    world = torch.distributed.get_world_size()
    mesh = Mesh.build(dp=world)
    model = DataParallel(build_model("tiny", SEED), mesh, bucket_mb=bucket_mb)
    loader = TokenLoader(load_corpus("stdlib", max_bytes=1 << 20), SEQ, BATCH, SEED)
    local = loader.local_batch(1, mesh.coord("dp"), world)
    mesh.comm.reset()
    calls_during_accumulation = []
    for i, (x, y) in enumerate(zip(local.inputs.chunk(microbatches), local.targets.chunk(microbatches))):
        last = i == microbatches - 1
        ctx = torch.enable_grad() if last else model.no_sync()
        with ctx:
            logits = model(x)
            (F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum") / (BATCH * SEQ)).backward()
        if not last:
            calls_during_accumulation.append(sum(mesh.comm.calls.values()))
    launched_in_backward = mesh.comm.calls["all_reduce"]  # before finish_grad_sync
    model.finish_grad_sync()
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    return grads, calls_during_accumulation, launched_in_backward, len(model.buckets)


@pytest.mark.parametrize("world,microbatches,bucket_mb", [(2, 1, 25.0), (4, 2, 0.02)])
def test_gradients_equal_single_process_reference(world, microbatches, bucket_mb):
    expected = reference_grads(microbatches)
    for grads, during_accumulation, launched, n_buckets in spawn(_dp_grads, world, microbatches, bucket_mb):
        assert set(grads) == set(expected)
        for name, g in grads.items():
            torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-7, msg=name)
        assert during_accumulation == [0] * (microbatches - 1)  # no_sync sends nothing
        # every bucket was launched from a gradient hook during backward (overlap), none later
        assert launched == n_buckets and (n_buckets > 1) == (bucket_mb < 1)


@pytest.mark.parametrize("algorithm", ["tree", pytest.param("ring", marks=pytest.mark.slow),
                                       pytest.param("hierarchical", marks=pytest.mark.slow),
                                       pytest.param("auto", marks=pytest.mark.slow)])
def test_our_allreduce_algorithms_train_like_the_backend(algorithm):
    """--allreduce ring/tree/...: the buckets reduced on the communication thread give the
    backend's losses (the summation order differs: rtol 1e-5)."""
    from helpers import run_tiny

    reference = run_tiny(steps=3, global_batch=8, dp=2)
    ours = run_tiny(steps=3, global_batch=8, dp=2, allreduce=algorithm)
    torch.testing.assert_close(torch.tensor(ours["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
