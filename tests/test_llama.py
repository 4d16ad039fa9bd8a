"""paratrain's Llama (models/llama.py): Hugging Face's LlamaForCausalLM's logits from the same
weights; tensor (with and without sequence parallelism) and pipeline parallelism give one
process's losses through the API; the planner's FLOPs and parameters from the module's own
weights, and `paratrain plan` on a Llama preset; checkpoints of both families exported as
Hugging Face folders that `from_pretrained` loads with every weight and the same logits."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import spawn

STEPS = 3


@pytest.mark.parametrize("tie", [False, True])
def test_llama_matches_hugging_face_logits(tie):
    """Grouped-query attention (4 query heads on 2 kv heads), RoPE with a non-default theta,
    RMSNorm's eps and SwiGLU give LlamaForCausalLM's logits after the weights are renamed."""
    from transformers import LlamaForCausalLM

    from paratrain.checkpoint.hf_export import _llama
    from paratrain.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_mlp=176, vocab_size=96, max_seq_len=64,
                      rope_theta=500000.0, norm_eps=1e-6, tie_embeddings=tie)
    torch.manual_seed(0)
    ours = Llama(cfg).eval()
    hf_config, state = _llama(cfg, dict(ours.state_dict()), 0.0)  # the export's renaming
    theirs = LlamaForCausalLM(hf_config).eval()
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tie else [])  # tied: the embedding
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, rtol=1e-5, atol=1e-5)


def test_rotary_is_a_rotation_by_position():
    """q . k after RoPE depends only on the distance between the positions (Su et al. 2021)."""
    from paratrain.models.llama import apply_rotary, rotary

    cos, sin = rotary(32, 16, 10000.0, torch.device("cpu"))
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    rot = lambda x, t: apply_rotary(x.expand(32, 16).clone(), cos.double(), sin.double())[t]  # noqa: E731
    assert torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 20) @ rot(k, 17))
    assert not torch.allclose(rot(q, 5) @ rot(k, 2), rot(q, 5) @ rot(k, 4))


# ---------------------------------------------------------------- tp, tp + sp, pp through the API
def _losses(layouts: list[dict]) -> list[list[float]]:
    import paratrain
    from paratrain.data import load_corpus, token_batches
    from paratrain.models.llama import llama_spec

    corpus = load_corpus(max_bytes=1 << 20)
    out = []
    for lay in layouts:
        mesh = paratrain.init(tp=lay.get("tp", 1), pp=lay.get("pp", 1))
        data = token_batches(corpus, seq_len=32, global_batch=8, seed=5)
        settings = {k: v for k, v in lay.items() if k not in ("tp", "pp")}
        trainer = paratrain.Trainer(llama_spec("llama-tiny", 5, 32), mesh, data=data, lr=3e-3, warmup_steps=2,
                                    steps=STEPS, progress=False, **settings)
        out.append([trainer.run_step(k).loss for k in range(1, STEPS + 1)])
    return out


def test_llama_under_tp_sequence_parallel_and_pp_matches_one_process():
    """The plan splits q, k, v by heads (2 kv heads over tp=2), gate and up by features; the
    pipeline cuts the blocks where the modelled cost balances."""
    layouts = [dict(tp=2), dict(tp=2, sequence_parallel=True), dict(pp=2, microbatches=2)]
    reference = spawn(_losses, 1, [{}])[0][0]
    ranks = spawn(_losses, 2, layouts)
    for r, rank in enumerate(ranks):
        for lay, losses in zip(layouts, rank):
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=1e-5, atol=0,
                                       msg=f"rank {r} {lay}")
    assert all(math.isfinite(x) and x < 6 for x in reference)


# ---------------------------------------------------------------- the planner
def test_planner_counts_llama_tiny_from_its_weights():
    """N = the weights of every matrix product (per block q, o d x d, k, v d x kv, gate, up, down
    d x d_mlp; the untied head), the FLOPs 6 N + 12 L T d; parameters as the module has them."""
    from paratrain.models.gpt import count_params
    from paratrain.models.llama import LLAMA_PRESETS, build_llama
    from paratrain.parallel.pipeline.partition import split_gpt
    from paratrain.planner.cost import flops_per_token, matmul_params, param_count, rank_params

    cfg, T = LLAMA_PRESETS["llama-tiny"], 32
    model = build_llama("llama-tiny", 0)
    matrices = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matrices == matmul_params(cfg) == 4 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 176) + 256 * 64
    assert flops_per_token(cfg, T) == 6 * matrices + 12 * cfg.n_layer * T * cfg.d_model
    assert param_count(cfg) == count_params(model) == matrices + 256 * 64 + (2 * cfg.n_layer + 1) * 64
    halves = [rank_params(cfg, 2, True, False, 1, 2), rank_params(cfg, 2, False, True, 1, 2)]
    assert sum(halves) == param_count(cfg)  # untied: no second copy of the table
    assert split_gpt(cfg, T, 2) == [range(0, 2), range(2, 4)]
    big = LLAMA_PRESETS["llama-1b"]  # Llama 3.2 1B's published size
    assert param_count(big) == 1_235_814_400


def test_plan_llama_small_and_unknown_model(capsys):
    from paratrain.cli import main

    assert main(["plan", "--model", "llama-small", "--gpus", "2", "--gpu", "cpu-local"]) == 0
    out = capsys.readouterr().out
    assert "3.0M parameters" in out and "why " in out
    assert main(["plan", "--model", "llama-1b", "--gpus", "8", "--gpu", "h100-80gb", "--json"]) == 0
    assert '"fits": true' in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--model", "llama-huge"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "llama-tiny" in err


# ---------------------------------------------------------------- export to a Hugging Face folder
def _save(spec_of: str, root: str) -> None:
    import paratrain
    from paratrain.data import load_corpus, token_batches
    from paratrain.models.llama import llama_spec
    from paratrain.models.spec import gpt_spec

    spec = llama_spec("llama-tiny", 3, 32) if spec_of == "llama" else gpt_spec("tiny", 3, 32)
    data = token_batches(load_corpus(max_bytes=1 << 18), seq_len=32, global_batch=4, seed=1)
    trainer = paratrain.Trainer(spec, paratrain.init(), data=data, lr=3e-3, steps=2, progress=False,
                                checkpoint_dir=root)
    for k in (1, 2):
        trainer.run_step(k)
    trainer.save_checkpoint()


def _exported_logits(family: str, tmp_path):
    from transformers import AutoModelForCausalLM

    from paratrain.checkpoint import load_full_model
    from paratrain.checkpoint.hf_export import export_hf
    from paratrain.models.gpt import build_model
    from paratrain.models.llama import build_llama

    root, out = str(tmp_path / "ck"), str(tmp_path / "hf")
    spawn(_save, 1, family, root)
    folder = export_hf(root, out)
    ours = build_llama("llama-tiny", 0) if family == "llama" else build_model("tiny", 0)
    missing = ours.load_state_dict(load_full_model(folder), strict=False).missing_keys
    assert missing == (["head.weight"] if family == "gpt" else [])  # GPT's head is its tied embedding
    theirs, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    idx = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return ours.eval()(idx), theirs.eval()(idx).logits, type(theirs).__name__


def test_export_llama_checkpoint_loads_in_llama_for_causal_lm(tmp_path):
    ours, theirs, cls = _exported_logits("llama", tmp_path)
    assert cls == "LlamaForCausalLM"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_gpt_checkpoint_loads_in_gpt2_lm_head_model(tmp_path):
    ours, theirs, cls = _exported_logits("gpt", tmp_path)
    assert cls == "GPT2LMHeadModel"
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_model_it_cannot_name(tmp_path):
    import json

    from paratrain.checkpoint.hf_export import ExportError, _model_of, _shape
    from paratrain.models.gpt import build_model

    for theirs, run in (("Sequential", str(tmp_path)), ("LlamaForCausalLM", "small")):  # a folder without
        with pytest.raises(ValueError, match="neither a preset") as e:  # config.json; the API's default name
            _model_of({"model": {"name": theirs}, "config": {"model": {"name": run}}}, "step_1")
        assert "\n" not in str(e.value)
    assert _model_of({"model": {"name": "llama-tiny"}, "config": {"model": {"name": "small"}}}, "x") \
        == ("preset", "llama-tiny")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert _model_of({"model": {"name": "LlamaForCausalLM"}, "config": {"model": {"name": str(tmp_path)}}}, "x") \
        == ("hf", str(tmp_path))
    gpt = {k: v for k, v in build_model("tiny", 0).state_dict().items() if k != "head.weight"}
    with pytest.raises(ExportError, match="not those of model llama-tiny"):
        _shape("llama-tiny", gpt, "step_1")  # a manifest naming another model than the tensors are
    grown = _shape("tiny", {**gpt, "wte.weight": torch.zeros(512, 64)}, "x")  # a vocabulary grown for a tokenizer
    assert (grown.vocab_size, grown.tie_embeddings, grown.max_seq_len) == (512, True, 128)
