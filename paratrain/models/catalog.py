"""What `--model` names: a preset of ours (GPT or Llama), a Hugging Face model folder, or a
user's factory `MODULE:FUNCTION`. One place answers, before any worker starts, what the model is
(`model_shape`: the sizes validation and the planner read), whether the layout can split it
(`check_model`), and what must match in a checkpoint (`model_identity`); and, in the workers,
builds its spec (`model_spec`), the one thing the Trainer needs.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
import torch.nn as nn

from paratrain.models import hf
from paratrain.models.gpt import PRESETS, GPTConfig
from paratrain.models.hf import shape_of_config
from paratrain.models.llama import LLAMA_PRESETS, LlamaConfig
from paratrain.models.spec import ModelSpec, gpt_identity, gpt_spec, module_identity, module_spec

Shape = GPTConfig | LlamaConfig


def preset_names() -> list[str]:
    return [*PRESETS, *LLAMA_PRESETS]


def kind_of(name: str) -> str:
    """gpt, llama (our presets), hf (a folder), factory (MODULE:FUNCTION) or unknown."""
    if name in PRESETS:
        return "gpt"
    if name in LLAMA_PRESETS:
        return "llama"
    if os.path.isdir(name):
        return "hf"
    if ":" in name and not os.path.exists(name):
        return "factory"
    return "unknown"


def unknown_model(name: str) -> ValueError:
    if os.path.exists(name):
        return ValueError(f"--model: {name!r} is a file; give a Hugging Face model folder (with config.json), "
                          f"MODULE:FUNCTION, or a preset: {', '.join(preset_names())}")
    return ValueError(f"--model: unknown model {name!r}; choose a preset ({', '.join(preset_names())}), a Hugging "
                      f"Face model folder, or MODULE:FUNCTION")


# ------------------------------------------------------------------ shapes
def model_shape(name: str, vocab_size: int = 0) -> Shape | None:
    """The shape `--model name` trains (the preset's vocabulary replaced by `vocab_size` if given);
    None for a factory's model or a family paratrain does not model."""
    kind = kind_of(name)
    if kind in ("gpt", "llama"):
        preset = (PRESETS if kind == "gpt" else LLAMA_PRESETS)[name]
        return type(preset)(**{**preset.__dict__, "vocab_size": vocab_size or preset.vocab_size})
    if kind == "hf":
        from paratrain.models.hf import read_config

        return shape_of_config(read_config(name))
    if kind == "factory":
        return None
    raise unknown_model(name)


def padded(n: int, multiple: int = 128) -> int:
    return -(-n // multiple) * multiple


def vocab_size(cfg) -> int:
    """The vocabulary of the run's model: a Hugging Face model's own; a preset's, grown (padded to
    a multiple of 128) to hold the tokenizer's or the token array's ids, unless --model's
    vocabulary is set (model.vocab_size). 0 for a factory (its model decides)."""
    kind = kind_of(cfg.model.name)
    if kind == "hf":
        from paratrain.models.hf import read_config

        return int(read_config(cfg.model.name).vocab_size)
    if kind not in ("gpt", "llama"):
        return 0
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    preset = (PRESETS if kind == "gpt" else LLAMA_PRESETS)[cfg.model.name]
    need = data_vocab_size(cfg)
    return preset.vocab_size if need <= preset.vocab_size else padded(need)


def data_vocab_size(cfg) -> int:
    """Token ids the data can hold: the tokenizer's vocabulary, or a token array's largest id + 1."""
    from paratrain import sources

    return sources.data_vocab_size(cfg)


def run_shape(cfg) -> Shape | None:
    """The shape of the run's model, vocabulary included."""
    kind = kind_of(cfg.model.name)
    return model_shape(cfg.model.name, vocab_size(cfg) if kind in ("gpt", "llama") else 0)


# ------------------------------------------------------------------ users' models
def user_spec(model: nn.Module, loss_fn, *, tp_plan=None, blocks=None, layers=None, pp_split=None) -> ModelSpec:
    """The spec of a model the user built (`models.spec.module_spec`). A Hugging Face model of a
    family paratrain knows (models/hf.py) is cut by its family's adapter, its decoder layers are
    the blocks, and its own plan (`tp_plan=model.tp_plan`, or "auto") is translated."""
    spec = module_spec(model, loss_fn, tp_plan=tp_plan, blocks=blocks, layers=layers, pp_split=pp_split)
    if not hf.is_hf_model(model):
        return spec
    if tp_plan is not None:
        plan = model.tp_plan if tp_plan == "auto" else tp_plan
        spec.tp_plan = hf.translate_plan(model, plan, vocab_head=False)  # the user's loss sees whole logits
    if layers is None and hf.family_of(model.config) is not None:
        spec.stages = hf.family_stages(model.config)
    spec.blocks = spec.blocks or hf.family_blocks(model.config)
    return spec


# ------------------------------------------------------------------ factories
def load_factory(name: str):
    """The function of `MODULE:FUNCTION` (MODULE importable from the working folder or sys.path)."""
    module, _, function = name.rpartition(":")
    if not module or not function.isidentifier():
        raise ValueError(f"--model: {name!r} is not MODULE:FUNCTION (e.g. mymodels:build)")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # the user's module: any error in it is theirs, named in one line
        raise ValueError(f"--model: cannot import {module!r} ({type(e).__name__}: {' '.join(str(e).split())[:160]})") \
            from None
    fn = getattr(mod, function, None)
    if not callable(fn):
        raise ValueError(f"--model: {module!r} has no function {function!r}")
    return fn


def build_factory(name: str, seed: int):
    """Call the factory with the default generator seeded by `seed` (the same weights on every
    rank); it returns an nn.Module (a Hugging Face model, ours, any) or a ModelSpec."""
    fn = load_factory(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = fn()
    if not isinstance(out, (nn.Module, ModelSpec)):
        raise ValueError(f"--model: {name} returned {type(out).__name__}; it must return a torch.nn.Module "
                         f"(or a paratrain ModelSpec)")
    return out


def factory_spec(name: str, seed: int, seq_len: int, built=None) -> ModelSpec:
    from paratrain.models.hf import hf_spec, is_hf_model, lm_loss

    out = build_factory(name, seed) if built is None else built
    if isinstance(out, ModelSpec):
        return out
    if is_hf_model(out):
        spec = hf_spec(out, seed, seq_len)
    else:  # logits, or an output with .logits; a plan of paratrain's styles in `tp_plan`; pp if sequential
        spec = module_spec(out, lm_loss, tp_plan=getattr(out, "tp_plan", None))
    spec.name = spec.source = name
    return spec


# ------------------------------------------------------------------ specs and identities
def model_spec(cfg) -> ModelSpec:
    """The spec the workers train (the same weights on every rank, from the seed or the folder),
    its identity with the tokenizer's where that is not bytes."""
    spec = _spec(cfg)
    spec.identity = with_tokenizer(spec.identity, cfg)
    return spec


def with_tokenizer(identity: dict, cfg) -> dict:
    """A model trained on other token ids is another model: a checkpoint records the tokenizer
    (a tokenizer.json by its content's hash); byte-level runs keep the identity they had."""
    if cfg.data.tokenizer == "byte":
        return identity
    from paratrain.vocab import tokenizer_identity

    return {**identity, "tokenizer": tokenizer_identity(cfg.data.tokenizer)}


def _spec(cfg) -> ModelSpec:
    m, tr = cfg.model, cfg.train
    kind = kind_of(m.name)
    if kind == "gpt":
        return gpt_spec(m.name, tr.seed, tr.seq_len, m.dropout, m.tie_embeddings, vocab_size(cfg))
    if kind == "llama":
        from paratrain.models.llama import llama_spec

        return llama_spec(m.name, tr.seed, tr.seq_len, m.dropout, vocab_size(cfg))
    if kind == "hf":
        from paratrain.models.hf import hf_spec

        return hf_spec(m.name, tr.seed, tr.seq_len)
    if kind == "factory":
        return factory_spec(m.name, tr.seed, tr.seq_len)
    raise unknown_model(m.name)


def model_identity(cfg) -> dict:
    """What a checkpoint of this run's model must match to load (the spec's identity, computed
    without building the model where the shape is known; a factory's model is built on the meta
    device: no memory, no weights)."""
    return with_tokenizer(_identity(cfg), cfg)


def _identity(cfg) -> dict:
    m, kind = cfg.model, kind_of(cfg.model.name)
    if kind == "gpt":
        return gpt_identity(m.name, m.tie_embeddings, vocab_size(cfg))
    if kind == "llama":
        from paratrain.models.llama import llama_identity

        return llama_identity(m.name, vocab_size(cfg))
    if kind == "hf":
        from paratrain.models.hf import hf_identity, read_config

        return hf_identity(read_config(m.name))
    if kind == "factory":
        with torch.device("meta"):
            out = build_factory(m.name, cfg.train.seed)
        if isinstance(out, ModelSpec):
            return out.identity
        from paratrain.models.hf import hf_identity, is_hf_model

        return hf_identity(out.config) if is_hf_model(out) else module_identity(out)
    raise unknown_model(m.name)


# ------------------------------------------------------------------ before any worker
def check_model(cfg) -> Shape | None:
    """Raise ValueError (one line naming the flag) unless `--model` names a model this run can
    build and its layout can split: a folder's config.json and weights are readable, tp has the
    family's plan, pp its adapter, and the data's ids fit the vocabulary. Returns the run's shape."""
    name, lay = cfg.model.name, cfg.layout
    kind = kind_of(name)
    if kind == "unknown":
        raise unknown_model(name)
    if kind == "factory":
        load_factory(name)
    if kind == "hf":
        _check_folder(name, lay)
    shape = run_shape(cfg)
    model_vocab, need = vocab_size(cfg), data_vocab_size(cfg)
    if model_vocab and need > model_vocab:
        what = f"--tokenizer {cfg.data.tokenizer}" if cfg.data.tokenizer != "byte" else f"--data {cfg.data.path}"
        raise ValueError(f"{what}: the data holds token ids up to {need - 1} but model {name}'s vocabulary has "
                         f"{model_vocab} entries; use a tokenizer of at most {model_vocab} tokens"
                         + (" or a larger model.vocab_size" if kind in ("gpt", "llama") else ""))
    return shape


def _check_folder(path: str, lay) -> None:
    from paratrain.models.hf import FAMILIES, STYLE_OF, family_of, read_config, weight_files

    config = read_config(path)
    if not weight_files(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                      ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ValueError(f"--model: {path!r} holds its weights as pytorch_model.bin; paratrain reads safetensors "
                         f"(save the model with save_pretrained(..., safe_serialization=True))")
    if lay.tp > 1:
        plan = getattr(config, "base_model_tp_plan", None) or {}
        if not plan:
            raise ValueError(f"--tp: transformers gives {config.model_type!r} models no tensor-parallel plan; "
                             f"use --dp, --zero or --pp for them")
        unknown = sorted(set(plan.values()) - set(STYLE_OF))
        if unknown:
            raise ValueError(f"--tp: the {config.model_type!r} plan uses {unknown}, which paratrain does not split")
        kv = getattr(config, "num_key_value_heads", None) or 0
        if kv and kv % lay.tp:
            raise ValueError(f"--tp: model {path} has {kv} key-value heads, not divisible by tp={lay.tp}")
    if lay.pp > 1 and family_of(config) is None:
        raise ValueError(f"--pp: paratrain has no pipeline adapter for the {config.model_type!r} family; it cuts "
                         f"{', '.join(sorted(FAMILIES))}")
