"""Export a checkpoint as a Hugging Face model folder: config.json and model.safetensors, which
`AutoModelForCausalLM.from_pretrained(folder)` loads with every weight in place and runs with the
same logits as the model trained.

paratrain's GPT becomes a GPT2LMHeadModel: GPT-2's Conv1D layers hold the transposed weights
(in x out) and one fused c_attn = [q; k; v]; GELU in its tanh form (`gelu_new`), LayerNorm eps
1e-5, the position table of max_seq_len rows. paratrain's Llama becomes a LlamaForCausalLM:
the same tensors under Hugging Face's names, with RoPE's theta, RMSNorm's eps and the key/value
heads in its config. A Hugging Face model trained from its folder keeps its own names and its
config.json. The vocabulary and the position table are read from the tensors themselves, so a
run that grew or overrode its preset's vocabulary exports what it trained.
"""

from __future__ import annotations

import os
import shutil

import torch

from paratrain.checkpoint.store import MANIFEST, CheckpointError, latest_good, load_full_model, verify, warn_skipped
from paratrain.models.gpt import GPT, PRESETS, GPTConfig
from paratrain.models.llama import LLAMA_PRESETS, Llama, LlamaConfig

CONFIG, WEIGHTS = "config.json", "model.safetensors"


class ExportError(ValueError):
    """A model that cannot be exported as a Hugging Face folder; the message is one line."""


LLAMA_NAMES = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               **{f"attn.{x}": f"self_attn.{x}_proj" for x in "qkvo"},
               **{f"mlp.{x}": f"mlp.{x}_proj" for x in ("gate", "up", "down")}}


def export_hf(root_or_folder: str, out_dir: str) -> str:
    """Write the newest good checkpoint under `root_or_folder` (or that checkpoint folder) to
    `out_dir` as a Hugging Face model folder; returns the checkpoint folder exported.
    CheckpointError for a checkpoint that cannot be used, ExportError (a ValueError, one line) for
    a model that cannot be exported, ImportError (one line) without transformers."""
    folder = _checkpoint(root_or_folder)
    manifest = verify(folder)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"export: {out_dir!r} is a file; give a folder for config.json and {WEIGHTS}")
    tensors = {k: v.contiguous() for k, v in load_full_model(folder).items()}
    kind, model = _model_of(manifest, folder)
    os.makedirs(out_dir, exist_ok=True)
    if kind == "hf":
        for alias, kept in (manifest.get("aliases") or {}).items():
            if kept in tensors and alias not in tensors:
                tensors[alias] = tensors[kept].clone()  # safetensors refuses shared storage
        shutil.copyfile(os.path.join(model, CONFIG), os.path.join(out_dir, CONFIG))
    else:
        dropout = float(((manifest.get("config") or {}).get("model") or {}).get("dropout") or 0.0)
        cfg = _shape(model, tensors, folder)
        hf_config, tensors = (_gpt2 if isinstance(cfg, GPTConfig) else _llama)(cfg, tensors, dropout)
        hf_config.save_pretrained(out_dir)
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(out_dir, WEIGHTS), metadata={"format": "pt"})
    return folder


def _checkpoint(root_or_folder: str) -> str:
    """The checkpoint folder itself, or the newest good one under a checkpoint root."""
    if os.path.exists(os.path.join(root_or_folder, MANIFEST)):
        return root_or_folder
    folder, skipped = latest_good(root_or_folder)
    warn_skipped(skipped)
    if folder is None:
        raise CheckpointError(f"no complete checkpoint under {root_or_folder}")
    return folder


def _model_of(manifest: dict, folder: str) -> tuple[str, str]:
    """("preset", name) or ("hf", model folder): the model the checkpoint's run trained, by the
    name its model identity records (a preset's), else the run's --model (a Hugging Face folder;
    a run of the Python API records the default --model, which says nothing)."""
    identity = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    config = manifest.get("config") if isinstance(manifest.get("config"), dict) else {}
    run_model = config.get("model") if isinstance(config.get("model"), dict) else {}
    name, run_name = identity.get("name"), run_model.get("name")
    presets = [*PRESETS, *LLAMA_PRESETS]
    if isinstance(name, str) and name in presets:
        return "preset", name
    if isinstance(run_name, str) and os.path.isfile(os.path.join(run_name, CONFIG)):
        return "hf", run_name
    if not identity and isinstance(run_name, str) and run_name in presets:
        return "preset", run_name
    raise ExportError(f"export: {folder} holds model {name or run_name!r}, neither a preset of paratrain's GPT or "
                     f"Llama ({', '.join(presets)}) nor a Hugging Face model folder with {CONFIG}; export its "
                     f"tensors with `paratrain checkpoint export --to model.safetensors`")


def _shape(name: str, tensors: dict[str, torch.Tensor], folder: str) -> GPTConfig | LlamaConfig:
    """The preset's shape with the vocabulary (and GPT's position table) the tensors have, and
    a tied head where the checkpoint holds none of its own; ExportError if the tensors are not
    that model's."""
    if "wte.weight" not in tensors:
        raise ExportError(f"export: {folder} holds no token embedding (wte.weight): not a checkpoint of model {name}")
    preset = PRESETS.get(name) or LLAMA_PRESETS[name]
    sizes = {"vocab_size": tensors["wte.weight"].shape[0], "tie_embeddings": "head.weight" not in tensors}
    if isinstance(preset, GPTConfig) and "wpe.weight" in tensors:
        sizes["max_seq_len"] = tensors["wpe.weight"].shape[0]
    cfg = type(preset)(**{**preset.__dict__, **sizes})
    with torch.device("meta"):
        model = (GPT if isinstance(cfg, GPTConfig) else Llama)(cfg)
    expected = {k: tuple(p.shape) for k, p in model.named_parameters()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != expected:
        differ = sorted(set(found) ^ set(expected)) or [k for k in expected if found[k] != expected[k]]
        raise ExportError(f"export: {folder}'s tensors are not those of model {name} (first difference: {differ[0]}, "
                         f"{found.get(differ[0])} in the checkpoint, {expected.get(differ[0])} in the model)")
    return cfg


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("export to a Hugging Face folder needs the `transformers` package: "
                          "pip install 'paratrain[hf]'") from None
    return transformers


def _gpt2(cfg: GPTConfig, t: dict[str, torch.Tensor], dropout: float):
    """GPT2LMHeadModel's config and state dict (Conv1D weights are in x out: transposed)."""
    hf = _transformers().GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model, n_layer=cfg.n_layer,
        n_head=cfg.n_head, n_inner=cfg.d_mlp, activation_function="gelu_new", layer_norm_epsilon=1e-5,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=None, eos_token_id=None, architectures=["GPT2LMHeadModel"])
    out = {"transformer.wte.weight": t["wte.weight"], "transformer.wpe.weight": t["wpe.weight"],
           "transformer.ln_f.weight": t["ln_f.weight"], "transformer.ln_f.bias": t["ln_f.bias"]}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for a, b in (("ln1", "ln_1"), ("ln2", "ln_2")):
            for p in ("weight", "bias"):
                out[f"{theirs}{b}.{p}"] = t[f"{ours}{a}.{p}"]
        out[f"{theirs}attn.c_attn.weight"] = torch.cat([t[f"{ours}attn.{x}.weight"] for x in "qkv"]).T.contiguous()
        out[f"{theirs}attn.c_attn.bias"] = torch.cat([t[f"{ours}attn.{x}.bias"] for x in "qkv"])
        for a, b in (("attn.proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
            out[f"{theirs}{b}.weight"] = t[f"{ours}{a}.weight"].T.contiguous()
            out[f"{theirs}{b}.bias"] = t[f"{ours}{a}.bias"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["head.weight"]
    return hf, out


def _llama(cfg: LlamaConfig, t: dict[str, torch.Tensor], dropout: float):
    """LlamaForCausalLM's config and state dict: the same tensors under its names."""
    hf = _transformers().LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, hidden_act="silu", attention_bias=False, mlp_bias=False,
        attention_dropout=dropout, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=None, eos_token_id=None,
        architectures=["LlamaForCausalLM"])
    out = {"model.embed_tokens.weight": t["wte.weight"], "model.norm.weight": t["norm.weight"]}
    for i in range(cfg.n_layer):
        for ours, theirs in LLAMA_NAMES.items():
            out[f"model.layers.{i}.{theirs}.weight"] = t[f"blocks.{i}.{ours}.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["head.weight"]
    return hf, out
