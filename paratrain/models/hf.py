"""Hugging Face causal language models as model specs, built from a folder or given built.

`--model DIR` reads DIR/config.json with `transformers` (an optional dependency) and builds the
model with the weights of `model.safetensors` (or a sharded safetensors index) when present, else
initialised from the seed. The model stays Hugging Face's own: its tensor-parallel plan
(`model.tp_plan`) is translated to paratrain's styles, with regions around attention and MLP (one
all-reduce for q, k and v together) and, under sequence parallelism (Korthikanti et al. 2022), the
norms on sequence shards; its head becomes vocabulary-parallel with the vocabulary-parallel loss.
Families whose forward is a stack of decoder layers (Llama, Mistral, Qwen2/3; GPT-2) are cut into
pipeline stages by a small adapter (`Family`) that calls the same submodules the model's own
forward calls.
"""

from __future__ import annotations

import fnmatch
import json
import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from paratrain.models.gpt import GPTConfig
from paratrain.models.llama import LlamaConfig
from paratrain.models.spec import ModelSpec, token_cross_entropy, vocab_parallel_loss
from paratrain.parallel.pipeline.partition import balanced_partition
from paratrain.parallel.tensor import under_base_model
from paratrain.planner.cost import flops_per_token

INSTALL = "pip install 'paratrain[hf]'"


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError(f"--model: a Hugging Face model needs the `transformers` package: {INSTALL}") from None
    return transformers


@dataclass(frozen=True)
class Family:
    """Where a family keeps its decoder stack: `base` (the base model's attribute), the `embed`
    modules in it, the `layers` list, the final `norm`, the norms, attention and MLP of a layer,
    and whether positions are rotary (computed per stage) or a learned table."""

    base: str
    embed: tuple[str, ...]
    layers: str
    norm: str
    layer_norms: tuple[str, ...]
    attn: str
    mlp: str
    rotary: bool


DECODER = Family("model", ("embed_tokens",), "layers", "norm", ("input_layernorm", "post_attention_layernorm"),
                 "self_attn", "mlp", rotary=True)
GPT2 = Family("transformer", ("wte", "wpe", "drop"), "h", "ln_f", ("ln_1", "ln_2"), "attn", "mlp", rotary=False)
FAMILIES: dict[str, Family] = {"llama": DECODER, "mistral": DECODER, "qwen2": DECODER, "qwen3": DECODER, "gpt2": GPT2}
# Hugging Face's styles as paratrain's (parallel/tensor.py); the head's is chosen by the spec
STYLE_OF = {"colwise": "colwise", "rowwise": "rowwise", "embedding_rowwise": "vocab",
            "colwise_gather_output": "colwise_gather_output",
            "replicated_with_grad_allreduce": "replicated_with_grad_allreduce"}


def is_model_dir(name: str) -> bool:
    return os.path.isdir(name)


def read_config(path: str):
    """The `PretrainedConfig` of the folder `path` (its config.json), read locally."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"--model: {path!r} is a folder without config.json; give a Hugging Face model folder "
                         f"(config.json, optionally model.safetensors) or a preset")
    transformers = require_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        why = " ".join(str(e).split())[:200]
        raise ValueError(f"--model: cannot read {os.path.join(path, 'config.json')}: {why}") from None


def weight_files(path: str) -> list[str]:
    """The safetensors files of the folder: model.safetensors, or the shards its index names."""
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    return []


def _dtype_arg(transformers) -> str:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def build_hf(path: str, seed: int) -> nn.Module:
    """The model of folder `path` in fp32 with the folder's weights, or from `seed` without them
    (the same weights on every rank either way); no cache, sdpa attention."""
    transformers = require_transformers()
    transformers.utils.logging.disable_progress_bar()  # every rank would draw its "Loading weights" bar
    config = read_config(path)
    config.use_cache = False
    kw = {_dtype_arg(transformers): torch.float32, "attn_implementation": "sdpa"}
    auto = transformers.AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if weight_files(path):
            model = auto.from_pretrained(path, config=config, local_files_only=True, **kw)
        else:
            model = auto.from_config(config, **kw)
    model.config.use_cache = False
    return model


def family_of(config) -> Family | None:
    return FAMILIES.get(getattr(config, "model_type", ""))


def own_plan(model: nn.Module) -> dict[str, str]:
    """The model's tensor-parallel plan as Hugging Face gives it (full module paths)."""
    plan = getattr(model, "tp_plan", None)
    if plan:
        return dict(plan)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model.config, "base_model_tp_plan", None) or {}
    plan = {f"{prefix}.{k}" if prefix else k: v for k, v in base.items()}
    return {**plan, **(getattr(model, "_tp_plan", None) or {})}


def translate_plan(model: nn.Module, plan: dict[str, str] | None = None, vocab_head: bool = True) -> dict[str, str]:
    """A Hugging Face plan (default: the model's own) in paratrain's styles, with regions around
    each layer's attention and MLP (q, k and v enter the region once), the norms (sequence shards
    under SP) and the sequence split before the first layer, for the families paratrain knows.
    `vocab_head`: the head stays vocabulary-sharded for the vocabulary-parallel loss."""
    hf = own_plan(model) if plan is None else dict(plan)
    if not hf:
        raise ValueError(f"--tp: transformers gives {type(model).__name__} no tensor-parallel plan; "
                         f"use --dp/--zero/--pp for it")
    known = {*STYLE_OF, "region", "vocab", "vocab_head", "norm", "sequence_start", "sequence_dropout", "sequence_end"}
    unknown = sorted(set(hf.values()) - known)
    if unknown:
        raise ValueError(f"--tp: {type(model).__name__}'s plan uses {unknown}, which paratrain does not split; "
                         f"it splits {sorted(STYLE_OF)}")
    hf = under_base_model(model, hf, dict(model.named_modules()))  # a base model's plan (`layers.*`) under its prefix
    out = {k: "vocab_head" if vocab_head and v == "colwise_gather_output" else STYLE_OF.get(v, v) for k, v in hf.items()}
    fam = family_of(model.config)
    if fam is not None and hasattr(model, fam.base):
        layers = f"{fam.base}.{fam.layers}"
        extra = {f"{layers}.*.{fam.attn}": "region", f"{layers}.*.{fam.mlp}": "region",
                 f"{layers}.0": "sequence_start", f"{fam.base}.{fam.norm}": "norm",
                 **{f"{layers}.*.{n}": "norm" for n in fam.layer_norms}}
        if not any(fnmatch.fnmatchcase("lm_head", k) for k in out):  # a head the plan leaves whole
            extra["lm_head"] = "sequence_end"
        out.update({k: v for k, v in extra.items() if k not in out})
    return out


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


class DecoderStage(nn.Module):
    """One pipeline stage of a decoder stack: the embedding (first), a range of layers, the final
    norm and head (last), under the full model's names (`model.layers.5.self_attn.q_proj`). Its
    forward calls them as the model's own forward does, with causal attention (no padding mask)."""

    def __init__(self, model: nn.Module, fam: Family, indices: range, first: bool, last: bool):
        super().__init__()
        self.fam, self.first, self.last = fam, first, last
        base, holder = getattr(model, fam.base), nn.Module()
        self.add_module(fam.base, holder)
        for name in fam.embed if first else ():
            holder.add_module(name, getattr(base, name))
        if fam.rotary:  # buffers only: every stage computes the positions' rotations
            holder.add_module("rotary_emb", base.rotary_emb)
        layers = getattr(base, fam.layers)
        holder.add_module(fam.layers, nn.ModuleDict({str(i): layers[i] for i in indices}))
        if last:
            holder.add_module(fam.norm, getattr(base, fam.norm))
            self.lm_head = model.lm_head
        self.blocks = getattr(holder, fam.layers)

    def forward(self, x):
        base = getattr(self, self.fam.base)
        if self.first:
            x = base.embed_tokens(x) if self.fam.rotary else self._embed_gpt2(base, x)
        length = x.shape[1] * (1 if self.first else self._sequence_shards())
        pos = torch.arange(length, device=x.device).unsqueeze(0)
        kw = {"position_embeddings": base.rotary_emb(x, pos), "position_ids": pos} if self.fam.rotary else {}
        for layer in self.blocks.values():
            x = _hidden(layer(x, attention_mask=None, **kw))
        if self.last:
            x = self.lm_head(getattr(base, self.fam.norm)(x))
        return x

    def _sequence_shards(self) -> int:
        """Under sequence parallelism the stages pass sequence shards: the full length is tp times."""
        from paratrain.parallel.tensor import ColumnParallelLinear

        for m in self.modules():
            if isinstance(m, ColumnParallelLinear):
                return m.tp.size if m.sequence_parallel else 1
        return 1

    @staticmethod
    def _embed_gpt2(base: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return base.drop(base.wte(ids) + base.wpe(pos))


def decoder_stages(model: nn.Module, n: int, fam: Family, seq_len: int = 0) -> list[DecoderStage]:
    """The decoder stack cut into n stages, balanced by modelled forward FLOPs per token: a layer
    its matrices (2 per weight) and attention (4 T h), the head 2 h V on the last layer's stage."""
    layers = getattr(getattr(model, fam.base), fam.layers)
    h = model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.n_embd
    costs = [2 * sum(p.numel() for p in layer.parameters() if p.dim() >= 2) + 4 * seq_len * h for layer in layers]
    costs[-1] += 2 * model.lm_head.weight.numel()
    ranges = balanced_partition(costs, n)
    return [DecoderStage(model, fam, r, i == 0, i == n - 1) for i, r in enumerate(ranges)]


def lm_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM's logits (its output object, or the logits)."""
    return token_cross_entropy(getattr(outputs, "logits", outputs), targets)


def lm_tp_loss(outputs, targets: torch.Tensor, tp) -> torch.Tensor:
    return vocab_parallel_loss(getattr(outputs, "logits", outputs), targets, tp)


def hf_identity(config) -> dict:
    """What a checkpoint must match: the family and a digest of the architecture's settings."""
    keep = {k: v for k, v in sorted(config.to_dict().items())
            if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "architectures", "_attn_implementation_autoset")}
    digest = zlib.crc32(json.dumps(keep, sort_keys=True, default=str).encode())
    return {"name": f"hf:{config.model_type}", "vocab_size": config.vocab_size, "config_crc32": digest}


def hf_spec(model_or_path, seed: int, seq_len: int) -> ModelSpec:
    """A Hugging Face causal LM (a folder, or the model built) as a ModelSpec: its own plan, the
    vocabulary-parallel loss, its decoder layers as blocks and the family's pipeline adapter."""
    if isinstance(model_or_path, str):
        path = model_or_path
        config = read_config(path)
        build = lambda: build_hf(path, seed)  # noqa: E731
        name = os.path.basename(os.path.normpath(path))
    else:
        model = model_or_path
        config, build, name = model.config, lambda: model, type(model).__name__
    return ModelSpec(name=name, build=build, loss=lm_loss, tp_loss=lm_tp_loss, tp_plan=translate_plan,
                     stages=family_stages(config, seq_len), blocks=family_blocks(config), identity=hf_identity(config),
                     flops_per_token=hf_flops_per_token(config, seq_len),
                     source=os.path.abspath(model_or_path) if isinstance(model_or_path, str) else None)


def family_stages(config, seq_len: int = 0):
    """`stages(model, n)` of the model's family, or one that says why it cannot be cut."""
    fam = family_of(config)

    def stages(m: nn.Module, n: int):
        if fam is None:
            raise ValueError(f"--pp: paratrain has no pipeline adapter for the {config.model_type!r} family; "
                             f"it cuts {', '.join(sorted(FAMILIES))}")
        return decoder_stages(m, n, fam, seq_len)
    return stages


def family_blocks(config):
    """`blocks(module)`: the decoder layers of the model or of one of its stages (ZeRO-3's units)."""
    fam = family_of(config)

    def blocks(m: nn.Module):
        if isinstance(m, DecoderStage):
            return list(m.blocks.values())
        return list(getattr(getattr(m, fam.base), fam.layers)) if fam and hasattr(m, fam.base) else None
    return blocks


def is_hf_model(model: nn.Module) -> bool:
    """A transformers model (a `PreTrainedModel` with its config)."""
    return type(model).__module__.startswith("transformers.") and hasattr(getattr(model, "config", None),
                                                                          "model_type")


def hf_flops_per_token(config, seq_len: int) -> float | None:
    """6 N + 12 L T h (planner/cost.py) from the model's shape, where paratrain models it."""
    shape = shape_of_config(config)
    return None if shape is None else flops_per_token(shape, seq_len)


def shape_of_config(config) -> GPTConfig | LlamaConfig | None:
    """The sizes of a Hugging Face config as one of our shapes (GPT-2 as GPTConfig, the Llama
    family as LlamaConfig); None for a family whose shape paratrain does not model."""
    c, kind = config, getattr(config, "model_type", "")
    if kind == "gpt2":
        return GPTConfig(n_layer=c.n_layer, n_head=c.n_head, d_model=c.n_embd, vocab_size=c.vocab_size,
                         max_seq_len=c.n_positions, tie_embeddings=bool(getattr(c, "tie_word_embeddings", True)))
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        return LlamaConfig(n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                           n_kv_head=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                           d_model=c.hidden_size, d_mlp=c.intermediate_size, vocab_size=c.vocab_size,
                           max_seq_len=c.max_position_embeddings,
                           tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
    return None
