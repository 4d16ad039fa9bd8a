"""`paratrain train --model DIR` on Hugging Face models built from configs written in the test
(Llama with grouped-query attention, Qwen2 with q/k/v biases, GPT-2 with its tied head): every
layout gives one process's losses (fp32, rtol 1e-5), tensor parallelism from the model's own
plan; weights saved with save_pretrained give the Hugging Face forward's own first loss; a
`MODULE:FUNCTION` factory trains the same model; export after dp x tp reproduces the logits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import refused, spawn

pytest.importorskip("transformers")

SEQ, BATCH, STEPS, SEED = 32, 8, 3, 7


def llama_config(kind: str = "llama"):
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    configs = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}
    return configs[kind](**common)


def gpt2_config():
    import transformers

    return transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=4, n_head=4, resid_pdrop=0.0,
                                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)


def model_dir(tmp_path, config, weights: bool, name: str = "model") -> str:
    """A Hugging Face folder: config.json, with model.safetensors if `weights`."""
    import transformers

    path = tmp_path / name
    if weights:
        torch.manual_seed(11)
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    else:
        config.save_pretrained(path)
    return str(path)


def train(path: str, tmp_path, tag: str, **settings) -> list[float]:
    """`paratrain train --model path` in this process through the launcher: the per-step losses."""
    from paratrain.config import LayoutConfig, RunConfig, validate
    from paratrain.launch import launch

    cfg = RunConfig()
    cfg.model.name = path
    tr = cfg.train
    tr.steps, tr.global_batch, tr.seq_len, tr.seed, tr.lr, tr.warmup_steps = STEPS, BATCH, SEQ, SEED, 3e-3, 1
    tr.progress, tr.eval_batches, tr.metrics = False, 1, str(tmp_path / f"{tag}.jsonl")
    for key, value in settings.pop("data", {}).items():
        setattr(cfg.data, key, value)
    for key, value in settings.items():
        setattr(cfg.layout if key in LayoutConfig.__dataclass_fields__ else tr, key, value)
    validate(cfg)
    launch(cfg)
    with open(tr.metrics) as f:
        return [r["loss"] for r in map(json.loads, f) if "event" not in r]


def close(losses, reference, rtol=1e-5):
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=rtol, atol=0)


LLAMA_LAYOUTS = {
    "dp2-zero3": dict(dp=2, zero=3),
    "tp2-sp": dict(tp=2, sequence_parallel=True),
    "pp2": dict(pp=2, microbatches=2),
    "tp2": pytest.param(dict(tp=2), marks=pytest.mark.slow),
    "dp2": pytest.param(dict(dp=2), marks=pytest.mark.slow),
    "dp2-tp2-pp2-zero1": pytest.param(dict(dp=2, tp=2, pp=2, zero=1, microbatches=2), marks=pytest.mark.slow),
    "tp2-pp2-sp-ckpt": pytest.param(dict(tp=2, pp=2, microbatches=2, sequence_parallel=True,
                                         activation_checkpointing=True), marks=pytest.mark.slow),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A Llama folder with weights, and its one-process losses."""
    tmp = tmp_path_factory.mktemp("llama")
    path = model_dir(tmp, llama_config(), weights=True)
    return path, train(path, tmp, "reference")


@pytest.mark.parametrize("settings", list(LLAMA_LAYOUTS.values()), ids=list(LLAMA_LAYOUTS))
def test_llama_folder_in_every_layout_matches_one_process(llama, tmp_path, settings):
    path, reference = llama
    close(train(path, tmp_path, "run", **settings), reference)
    assert reference[-1] < reference[0]


def test_weights_saved_with_save_pretrained_give_the_models_own_first_loss(llama):
    """The first step's loss of the run equals transformers' own forward (labels) on that batch."""
    import transformers

    from paratrain.data import TokenLoader, load_corpus

    path, reference = llama
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    batch = TokenLoader(load_corpus(), SEQ, BATCH, SEED).batch(1)
    with torch.no_grad():
        logits = model(batch.inputs).logits
    own = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
    assert math.isclose(reference[0], float(own), rel_tol=1e-5)


@pytest.mark.parametrize("kind", [pytest.param("qwen2", marks=pytest.mark.slow),
                                  pytest.param("qwen3", marks=pytest.mark.slow),
                                  pytest.param("mistral", marks=pytest.mark.slow)])
def test_other_families_under_their_own_plans_with_dp_and_tp_match_one_process(tmp_path, kind):
    """Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms: replicated_with_grad_allreduce), Mistral."""
    path = model_dir(tmp_path, llama_config(kind), weights=False)
    reference = train(path, tmp_path, "reference")
    close(train(path, tmp_path, "dp2-tp2", dp=2, tp=2), reference)


@pytest.mark.parametrize("settings", [dict(pp=2, microbatches=2),
                                      pytest.param(dict(dp=2, zero=3), marks=pytest.mark.slow)],
                         ids=["pp2", "dp2-zero3"])
def test_gpt2_folder_with_its_tied_head_matches_one_process(tmp_path, settings):
    path = model_dir(tmp_path, gpt2_config(), weights=False)
    close(train(path, tmp_path, "run", **settings), train(path, tmp_path, "reference"))


@pytest.mark.slow
def test_llama_folder_in_bf16_stays_near_fp32(llama, tmp_path):
    path, reference = llama
    close(train(path, tmp_path, "bf16", dp=2, tp=2, precision="bf16"), reference, rtol=2e-2)


@pytest.mark.slow
def test_llama_folder_compiled_trains_like_eager(llama, tmp_path):
    path, reference = llama
    close(train(path, tmp_path, "compiled", dp=2, compile=True), reference, rtol=1e-4)


FACTORY = '''
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build():
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False))
'''


@pytest.mark.slow
def test_factory_builds_the_same_model_as_its_folder(tmp_path, monkeypatch):
    """`--model MODULE:FUNCTION` (importable from the working folder) under tp=2 trains the model
    the folder of the same config trains (weights from the seed alike)."""
    (tmp_path / "mymodels.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = model_dir(tmp_path, llama_config(), weights=False)
    close(train("mymodels:build", tmp_path, "factory", tp=2), train(path, tmp_path, "folder"))


@pytest.mark.slow  # default-suite time; the cases beside it stay in the default run
def test_readme_command_a_folder_with_its_tokenizer_on_jsonl_under_tp_and_pp(tmp_path):
    """The README's one command: a model folder holding its tokenizer.json, records of text,
    `--tokenizer DIR --tp 2 --pp 2`, the losses of one process."""
    import transformers

    from paratrain.data import load_corpus
    from paratrain.vocab import train_bpe

    text = bytes(load_corpus(max_bytes=1 << 18)).decode("utf-8", errors="replace")
    docs = [text[i : i + 4000] for i in range(0, len(text), 4000)]
    path = model_dir(tmp_path, transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64), weights=False)
    train_bpe(docs, 400, f"{path}/tokenizer.json")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = dict(tokenizer=path, path=str(corpus), cache_dir=str(tmp_path / "cache"))
    reference = train(path, tmp_path, "reference", data=data)
    close(train(path, tmp_path, "tp2-pp2", data=data, tp=2, pp=2, microbatches=2), reference)


# ---------------------------------------------------------------- export from dp x tp
def _train_and_export(path: str, root: str) -> torch.Tensor | None:
    import paratrain
    from paratrain.data import load_corpus, token_batches
    from paratrain.models.hf import hf_spec
    from paratrain.parallel.tensor import gather_from_region, TPGroup

    mesh = paratrain.init(tp=2)
    data = token_batches(load_corpus(max_bytes=1 << 20), SEQ, BATCH, SEED)
    trainer = paratrain.Trainer(hf_spec(path, SEED, SEQ), mesh, data=data, lr=3e-3, steps=2, progress=False,
                                checkpoint_dir=root)
    for k in (1, 2):
        trainer.run_step(k)
    trainer.save_checkpoint()
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(data.batch(9).inputs[:2]).logits  # this rank's vocabulary shard
        full = gather_from_region(logits, TPGroup.from_mesh(mesh))
    return full if mesh.rank == 0 else None


def test_export_after_dp_tp_loads_with_from_pretrained_and_gives_the_trained_logits(llama, tmp_path):
    import transformers

    from paratrain.checkpoint.hf_export import export_hf
    from paratrain.data import load_corpus, token_batches

    path, _ = llama
    logits = spawn(_train_and_export, 4, path, str(tmp_path / "ckpt"))[0]
    out = tmp_path / "exported"
    export_hf(str(tmp_path / "ckpt"), str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    inputs = token_batches(load_corpus(max_bytes=1 << 20), SEQ, BATCH, SEED).batch(9).inputs[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(inputs).logits, logits, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- refusals
def test_bad_model_folders_and_layouts_are_one_line_before_any_worker(capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    gpt2 = model_dir(tmp_path, gpt2_config(), weights=False, name="gpt2")
    import transformers

    opt = tmp_path / "opt"
    transformers.OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                           max_position_embeddings=64, word_embed_proj_dim=32).save_pretrained(opt)
    small = model_dir(tmp_path, llama_config(), weights=False, name="llama")
    cases = [
        (["--model", str(empty)], "without config.json"),
        (["--model", str(opt), "--pp", "2"], "no pipeline adapter for the 'opt' family"),
        (["--model", small, "--tokenizer", "bpe:4096"], "vocabulary has 256 entries"),
        (["--model", small, "--tp", "4"], "2 key-value heads, not divisible by tp=4"),
        (["--model", gpt2, "--tp", "2"], "no tensor-parallel plan"),
        (["--model", "nosuchmodule_xyz:build"], "cannot import 'nosuchmodule_xyz'"),
        (["--model", "json:not_there"], "has no function 'not_there'"),
        (["--model", gpt2, "--seq-len", "65"], "--seq-len: must be between 1 and 64"),
    ]
    for args, expected in cases:
        status, err = refused(capsys, "train", *args, "--steps", "1")
        assert status == 2 and expected in err, (args, err)
        assert len(err.strip().splitlines()) == 1, err


def test_sharded_safetensors_folders_load_and_factories_are_specs(tmp_path, monkeypatch, capsys):
    """A sharded safetensors index loads whole; a factory's spec builds its model and its identity
    (computed on the meta device before any worker) is the built model's; `plan` reads a folder."""
    import transformers

    from paratrain.cli import main
    from paratrain.config import RunConfig
    from paratrain.models import catalog
    from paratrain.models.hf import build_hf, weight_files

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config())
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(weight_files(str(tmp_path / "sharded"))) > 1
    loaded = build_hf(str(tmp_path / "sharded"), seed=123).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)
    (tmp_path / "mymodels.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = RunConfig()
    cfg.model.name = "mymodels:build"
    spec = catalog.model_spec(cfg)
    assert spec.identity == catalog.model_identity(cfg) and spec.source == "mymodels:build"
    assert isinstance(spec.build(), transformers.LlamaForCausalLM)
    assert main(["plan", "--model", str(tmp_path / "sharded"), "--gpus", "2", "--seq-len", "64"]) == 0
    assert "dp=" in capsys.readouterr().out


def test_tensor_parallel_plans_of_hugging_face_are_translated():
    """Hugging Face's own styles (and its base-model plan, without the `model.` prefix) become
    paratrain's; regions wrap attention and MLP; the head stays vocabulary-parallel for our loss."""
    import transformers

    from paratrain.models.hf import translate_plan

    model = transformers.LlamaForCausalLM(llama_config())
    plan = translate_plan(model)
    assert plan["lm_head"] == "vocab_head" and plan["model.embed_tokens"] == "vocab"
    assert plan["model.layers.*.self_attn"] == "region" and plan["model.layers.*.mlp"] == "region"
    assert plan["model.layers.*.self_attn.q_proj"] == "colwise"
    base = translate_plan(model, model.config.base_model_tp_plan, vocab_head=False)
    assert base["model.layers.*.mlp.down_proj"] == "rowwise" and base["lm_head"] == "sequence_end"
    assert translate_plan(model, model.tp_plan, vocab_head=False)["lm_head"] == "colwise_gather_output"
    with pytest.raises(ValueError, match="does not split"):
        translate_plan(model, {"model.layers.*.mlp.gate_up_proj": "packed_colwise"})


def test_cli_exports_a_checkpoint_as_a_hugging_face_folder(tmp_path, capsys):
    """`paratrain checkpoint export ck --to folder/`: a GPT preset's checkpoint becomes a GPT-2
    folder that from_pretrained loads with the trained model's logits."""
    import transformers

    from helpers import run_tiny
    from paratrain.checkpoint import load_full_model
    from paratrain.cli import main
    from paratrain.models.gpt import build_model

    run_tiny(steps=2, global_batch=4, checkpoint={"dir": str(tmp_path / "ck"), "every": 2})
    assert main(["checkpoint", "export", str(tmp_path / "ck"), "--to", str(tmp_path / "out")]) == 0
    ours = build_model("tiny", 0)
    ours.load_state_dict(load_full_model(str(tmp_path / "ck" / "step_00000002")), strict=False)  # the tied head
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, ours(ids), rtol=1e-5, atol=1e-5)
    status, err = refused(capsys, "checkpoint", "export", str(tmp_path / "ck"), "--to", str(tmp_path / "x.zip"))
    assert status == 2 and "--to" in err
