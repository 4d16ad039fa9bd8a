"""A vanilla Llama (Touvron et al. 2023), with no parallel code in it.

Pre-norm blocks with RMSNorm (Zhang & Sennrich 2019), rotary position embeddings (Su et al.
2021; the rotate-half pairing of Hugging Face's LlamaForCausalLM), grouped-query attention
(Ainslie et al. 2023: n_kv_head key/value heads shared by groups of query heads) through
`scaled_dot_product_attention`, a SwiGLU MLP (Shazeer 2020: down(silu(gate x) * up x)), no
biases, and an untied head by default. As in gpt.py, q, k and v are separate projections and
the number of heads is read from the weights, so a tensor-parallel rank holding n_head/tp query
heads and n_kv_head/tp key/value heads runs the same code; `embed`, `blocks` and `output` are
the pieces a pipeline stage holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from paratrain.models.gpt import GPT
from paratrain.models.spec import ModelSpec, sample_text, token_cross_entropy, vocab_parallel_loss
from paratrain.parallel.pipeline.measure import gpt_stages_at, gpt_units
from paratrain.parallel.pipeline.partition import build_stages, split_gpt
from paratrain.planner.cost import flops_per_token


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    n_head: int
    n_kv_head: int
    d_model: int
    d_mlp: int
    vocab_size: int = 256
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.d_model % self.n_head or (self.d_model // self.n_head) % 2:
            raise ValueError(f"Llama: d_model {self.d_model} must split into {self.n_head} heads of even size")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"Llama: n_head {self.n_head} is not a multiple of n_kv_head {self.n_kv_head}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    # What the planner and the pipeline split read alike from this and GPTConfig.
    @property
    def bias(self) -> bool:
        return False

    @property
    def gated_mlp(self) -> bool:
        return True

    @property
    def learned_positions(self) -> bool:
        return False


# `llama-tiny` is for tests, `llama-small` a laptop model (3M parameters, byte vocabulary),
# `llama-1b` Llama 3.2 1B's shape (1.24B with its 128,256-token vocabulary, tied head, theta 500,000;
# without its long-context RoPE scaling), `llama-7b` Llama 2 7B's (6.74B, 32,000 tokens).
LLAMA_PRESETS: dict[str, LlamaConfig] = {
    "llama-tiny": LlamaConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=64, d_mlp=176, max_seq_len=128),
    "llama-small": LlamaConfig(n_layer=4, n_head=8, n_kv_head=4, d_model=256, d_mlp=688, max_seq_len=256),
    "llama-1b": LlamaConfig(n_layer=16, n_head=32, n_kv_head=8, d_model=2048, d_mlp=8192, vocab_size=128256,
                            max_seq_len=8192, rope_theta=500000.0, tie_embeddings=True),
    "llama-7b": LlamaConfig(n_layer=32, n_head=32, n_kv_head=32, d_model=4096, d_mlp=11008, vocab_size=32000,
                            max_seq_len=4096),
}

# Megatron's plan for this block: q, k, v (by heads: n_kv_head must be divisible by tp) and gate,
# up (by MLP features) column-parallel, each pair's input entering the region once; o and down
# row-parallel; the vocabulary split in the embedding and the head.
LLAMA_TP_PLAN: dict[str, str] = {
    "wte": "vocab",
    "blocks.0": "sequence_start",
    "blocks.*.attn_norm": "norm",
    "blocks.*.mlp_norm": "norm",
    "blocks.*.attn": "region",
    "blocks.*.attn.[qkv]": "colwise",
    "blocks.*.attn.o": "rowwise",
    "blocks.*.mlp": "region",
    "blocks.*.mlp.gate": "colwise",
    "blocks.*.mlp.up": "colwise",
    "blocks.*.mlp.down": "rowwise",
    "blocks.*.drop": "sequence_dropout",
    "norm": "norm",
    "head": "vocab_head",
}


def rotary(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (T, head_dim), in fp32: frequency i = theta^(-2i/head_dim) on both halves."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, T, head_dim) rotated by position: x cos + rotate_half(x) sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim, self.theta, self.dropout = cfg.head_dim, cfg.rope_theta, cfg.dropout
        kv = cfg.n_kv_head * cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.k = nn.Linear(cfg.d_model, kv, bias=False)
        self.v = nn.Linear(cfg.d_model, kv, bias=False)
        self.o = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # heads read from the weights: a tp rank holds n_head/tp query and n_kv_head/tp kv heads
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        cos, sin = (t.to(q.dtype) for t in rotary(T, self.head_dim, self.theta, x.device))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x)))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Llama(nn.Module):
    # what a pipeline stage holds of the two ends (partition.PipelineStage), under these names
    EMBED_MODULES, OUTPUT_MODULES = ("wte",), ("norm", "head")

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02) for every matrix, the residual projections (o, down) scaled by 1/sqrt(2 * layers)."""
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            else:
                nn.init.ones_(p)  # the norms' gains

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab)."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        return self.wte(idx)  # positions enter in attention (RoPE)

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))

    generate = GPT.generate  # the same sampling loop: reads self.cfg.max_seq_len and self(idx)


def llama_config(name: str, dropout: float = 0.0, vocab_size: int | None = None) -> LlamaConfig:
    """Preset `name`, with the run's dropout and (when given) another vocabulary size."""
    if name not in LLAMA_PRESETS:
        raise ValueError(f"unknown Llama preset {name!r}; choose one of {', '.join(LLAMA_PRESETS)}")
    preset = LLAMA_PRESETS[name]
    return replace(preset, dropout=dropout, vocab_size=vocab_size or preset.vocab_size)


def build_llama(name: str, seed: int, dropout: float = 0.0, vocab_size: int | None = None) -> Llama:
    """Build a preset with weights that depend only on `seed` (same on every rank and layout)."""
    cfg = llama_config(name, dropout, vocab_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Llama(cfg)


def llama_identity(name: str, vocab_size: int | None = None) -> dict:
    """What must match between a checkpoint of a Llama preset and the run that loads it."""
    c = llama_config(name, vocab_size=vocab_size)
    return {"name": name, "n_layer": c.n_layer, "d_model": c.d_model, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
            "d_mlp": c.d_mlp, "vocab_size": c.vocab_size, "tie_embeddings": c.tie_embeddings}


def llama_spec(name: str, seed: int, seq_len: int, dropout: float = 0.0, vocab_size: int | None = None) -> ModelSpec:
    """paratrain's Llama preset `name` as a model spec (as models.spec.gpt_spec for the GPT):
    Megatron's plan, stages balanced by modelled cost, blocks as ZeRO-3's units."""
    cfg = llama_config(name, dropout, vocab_size)
    return ModelSpec(
        name=name,
        build=lambda: build_llama(name, seed, dropout, vocab_size),
        loss=token_cross_entropy,
        tp_loss=vocab_parallel_loss,
        tp_plan=LLAMA_TP_PLAN,
        stages=lambda model, n: build_stages(model, split_gpt(cfg, seq_len, n), 0, 1),
        blocks=None,  # the Llama and its stages hold `blocks`
        identity=llama_identity(name, vocab_size),
        flops_per_token=flops_per_token(cfg, seq_len),
        sample=sample_text,
        pp_units=gpt_units,
        stages_at=gpt_stages_at,
    )
