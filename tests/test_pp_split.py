"""`--pp-split auto-measured`: the pipeline cut by each layer's measured forward and backward time.

A sequence whose heaviest layer has few parameters is cut there by time where parameter counts
cut elsewhere; the measurement leaves no trace (gradients, buffers, random streams); a measured
split is the same math as one process (a user's sequential model through the Trainer on 2 ranks,
and, slow-marked, the CLI's `tiny` under pp=2), printed and recorded in the end summary; bad
values are refused.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import refused, run_tiny, spawn
from paratrain.config import ConfigError, RunConfig, validate_settings
from paratrain.models.gpt import build_model
from paratrain.models.spec import gpt_spec, module_spec
from paratrain.parallel.pipeline.measure import describe, measured_split

D = 32


class Repeated(nn.Module):
    """Few parameters, much compute: one small matrix applied `times` times."""

    def __init__(self, times: int = 400):
        super().__init__()
        self.lin, self.times = nn.Linear(D, D), times

    def forward(self, x):
        for _ in range(self.times):
            x = torch.tanh(self.lin(x))
        return x


class Wide(nn.Module):
    """Many parameters, little compute: a large table of which one row is added."""

    def __init__(self, rows: int = 2000):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(rows, D))

    def forward(self, x):
        return x + self.table[0]


def heavy_model(seed: int = 0) -> nn.Sequential:
    # parameters: ~1k, ~1k, 64k, 0.1k -> by count [0, 1 | 2, 3]; by time (400 : 300 : ~0 : ~0) [0 | 1, 2, 3],
    # whose slowest stage is far more than KEEP_MODELLED faster
    torch.manual_seed(seed)
    return nn.Sequential(Repeated(400), Repeated(300), Wide(), nn.Linear(D, 4))


@pytest.fixture
def one_thread():
    """One intra-op thread (as each worker has on a small machine): a thread pool waiting for a
    core that other processes hold would time the wait, not the layer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_measured_split_puts_the_heavy_layer_alone_where_parameter_counts_do_not(one_thread):
    model = heavy_model()
    spec = module_spec(model, F.cross_entropy)
    x, y = torch.randn(16, D), torch.randint(0, 4, (16,))
    stages, record = measured_split(spec, model, 2, x, lambda out: F.cross_entropy(out, y), torch.device("cpu"))
    assert record["modelled_stages"] == [[0, 1], [2, 3]]  # by parameter count
    assert record["stages"] == [[0, 0], [1, 3]]  # by time: Repeated alone
    assert [list(s.blocks) for s in stages] == [["0"], ["1", "2", "3"]]
    assert len(record["layer_ms"]) == 4 and record["stage_ms"][0] > record["stage_ms"][1]
    lines = describe(record, ["0", "1", "2", "3"], "layers")
    assert lines[1].startswith("paratrain: pp split by measured time: stage 0 layers 0 (")
    assert "by modelled cost it would be 0-1 (" in lines[1]


def test_measurement_leaves_no_trace_and_the_gpt_stages_compose_to_the_model():
    model = build_model("tiny", seed=0, dropout=0.1)
    spec = gpt_spec("tiny", 0, 32, dropout=0.1)
    x = torch.randint(0, 256, (2, 32))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    stages, record = measured_split(spec, model, 2, x, None, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None and torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert len(record["layer_ms"]) == 8 + 2  # the embedding, each block, the norm and head
    assert [a for a, _ in record["stages"]][0] == 0 and record["stages"][-1][1] == 7
    model.eval()
    y = x
    for s in stages:
        y = s(y)
    torch.testing.assert_close(y, model(x))


@pytest.mark.slow
def test_cli_run_with_measured_split_matches_one_process(capfd):
    reference = run_tiny(steps=4)
    capfd.readouterr()
    out = run_tiny(steps=4, pp=2, microbatches=4, pp_split="auto-measured")
    printed = capfd.readouterr().out
    torch.testing.assert_close(torch.tensor(out["losses"]), torch.tensor(reference["losses"]), rtol=1e-5, atol=0)
    assert "paratrain: measured forward + backward per layer (ms" in printed
    assert "paratrain: pp split by measured time: stage 0 blocks 0-" in printed
    record = out["pp_split_measured"]
    assert len(record["layer_ms"]) == 10 and len(record["stages"]) == len(record["stage_ms"]) == 2
    assert record["stages"][0][0] == 0 and record["stages"][1][1] == 7
    assert record["stages"][1][0] == record["stages"][0][1] + 1


def _sequential(pp: int, steps: int = 3):
    import contextlib
    import io

    import paratrain
    from paratrain.data import DatasetLoader

    gen = torch.Generator().manual_seed(3)
    xs, ys = torch.randn(64, D, generator=gen), torch.randint(0, 4, (64,), generator=gen)
    mesh = paratrain.init(pp=pp)
    kw = dict(microbatches=2, pp_split="auto-measured") if pp > 1 else {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer = paratrain.Trainer(
            heavy_model(),
            mesh,
            F.cross_entropy,
            data=DatasetLoader(list(zip(xs, ys)), 8, 1),
            lr=1e-2,
            progress=False,
            **kw,
        )
    losses = [trainer.run_step(k).loss for k in range(1, steps + 1)]
    return losses, getattr(trainer, "pp_split_measured", None), printed.getvalue()


def test_own_sequential_model_with_measured_split_matches_one_process():
    reference = spawn(_sequential, 1, 1)[0][0]
    out = spawn(_sequential, 2, 2)
    assert out[0][1] == out[1][1]  # every rank cut alike (which cut: the unit test above)
    assert [len(s) for s in (out[0][1]["layer_ms"], out[0][1]["stages"], out[0][1]["stage_ms"])] == [4, 2, 2]
    lines = out[0][2].splitlines()  # rank 0 prints, the others do not
    assert len(lines) == 2 and lines[0].startswith("paratrain: measured forward + backward per layer (ms")
    assert lines[1].startswith("paratrain: pp split by measured time: stage 0 layers 0") and not out[1][2]
    for losses, _, _ in out:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "args,expected",
    [
        (
            ("--pp-split", "even", "--pp", "2", "--microbatches", "2"),
            "--pp-split: must be auto or auto-measured, got 'even'",
        ),
        (("--pp-split", "auto-measured"), "--pp-split: auto-measured cuts pipeline stages and needs --pp 2 or more"),
    ],
)
def test_bad_pp_split_is_refused_in_one_line(capsys, args, expected):
    code, err = refused(capsys, "train", "--model", "tiny", *args)
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_a_model_folder_is_refused_before_any_worker(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, max_position_embeddings=64).save_pretrained(tmp_path / "llama")
    code, err = refused(capsys, "train", "--model", str(tmp_path / "llama"), "--pp", "2", "--microbatches", "2",
                        "--pp-split", "auto-measured")
    assert code == 2 and "is cut by its family's adapter: use --pp-split auto" in err
    assert len(err.strip().splitlines()) == 1


def test_a_model_not_given_as_a_sequence_is_refused_in_one_line():
    spec = module_spec(nn.ModuleDict({"a": nn.Linear(D, D)}), F.cross_entropy)
    with pytest.raises(ValueError, match="auto-measured times the layers of an nn.Sequential or layers="):
        spec.pp_units(spec.build())


def test_bad_pp_split_setting_is_refused_by_the_api_checks():
    cfg = RunConfig()
    cfg.layout.pp, cfg.layout.pp_split = 2, "measured"
    with pytest.raises(ConfigError, match="must be auto or auto-measured"):
        validate_settings(cfg)
