"""A vanilla decoder-only GPT (Radford et al. 2019), with no parallel code in it.

Pre-norm blocks, causal self-attention through `scaled_dot_product_attention`, a GELU MLP,
and a tied or untied output head. Query, key and value are separate projections so that
tensor parallelism can split them by heads and checkpoints stay independent of the layout.
Strategies in `paratrain.parallel` transform this model from outside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    n_head: int
    d_model: int
    vocab_size: int = 256
    max_seq_len: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True
    bias: bool = True

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    # What the planner and the pipeline split read alike from GPTConfig and models/llama.py's LlamaConfig.
    @property
    def n_kv_head(self) -> int:
        return self.n_head  # multi-head attention: every query head has its own keys and values

    @property
    def gated_mlp(self) -> bool:
        return False

    @property
    def learned_positions(self) -> bool:
        return True


# `tiny` is for tests, `small` is the laptop default (a few million parameters),
# `gpt2` is GPT-2 small's shape (124M with its 50257-token vocabulary, padded to 50304 as
# is usual for GPU efficiency; the byte tokenizer uses only the first 256 ids).
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=8, n_head=4, d_model=64, max_seq_len=128),
    "small": GPTConfig(n_layer=4, n_head=8, d_model=256, max_seq_len=256),
    "gpt2": GPTConfig(n_layer=12, n_head=12, d_model=768, vocab_size=50304, max_seq_len=1024),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, d_model=1024, vocab_size=50304, max_seq_len=1024),
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        assert cfg.d_model % cfg.n_head == 0, "d_model must be divisible by n_head"
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.q = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.v = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        # The number of heads is read from the weights, so a tensor-parallel rank that holds
        # n_head / tp heads runs this same code unchanged.
        q, k, v = (lin(x).view(B, T, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.wte.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * layers)."""
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layer))
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif "ln" in name and name.endswith("weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab)."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    # The two ends of forward, apart so that a pipeline stage holding `wte`, `wpe`, `drop` (or
    # `ln_f`, `head`) under the same names can run them.
    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def output(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n_new: int, temperature: float = 0.8, generator=None) -> torch.Tensor:
        """Sample `n_new` tokens after the prompt `idx` (B, T)."""
        for _ in range(n_new):
            logits = self(idx[:, -self.cfg.max_seq_len :])[:, -1, :] / temperature
            nxt = torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def build_model(name: str, seed: int, dropout: float = 0.0, tie_embeddings: bool = True,
                vocab_size: int | None = None) -> GPT:
    """Build a preset with weights that depend only on `seed` (same on every rank and layout);
    `vocab_size` replaces the preset's vocabulary (a tokenizer's)."""
    cfg = PRESETS[name]
    cfg = GPTConfig(**{**cfg.__dict__, "dropout": dropout, "tie_embeddings": tie_embeddings,
                       "vocab_size": vocab_size or cfg.vocab_size})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(cfg)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
