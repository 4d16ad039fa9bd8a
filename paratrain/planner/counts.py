"""Counts of one layout that need no hardware: parameters (of a model, of one rank), training FLOPs per
token, model-state bytes under ZeRO and activation bytes per layer, as cost.py's docstring derives
them (Kaplan et al. 2020; Narayanan et al. 2021; Rajbhandari et al. 2020; Korthikanti et al. 2022)."""

from __future__ import annotations

from paratrain.models.gpt import GPTConfig
from paratrain.parallel.pipeline.partition import block_weights


# --------------------------------------------------------------------- parameters and FLOPs
def pad_vocab(vocab: int, multiple: int = 128) -> int:
    """Megatron-LM pads the vocabulary to a multiple of 128 so that tp can split it."""
    return -(-vocab // multiple) * multiple


def block_vectors(cfg: GPTConfig) -> tuple[int, int]:
    """(split by tp, replicated) parameters of a block outside its matrices: biases of q, k, v and the
    MLP's input side split; the outputs' biases and the norms replicated. GPT (7h, 6h), Llama (0, 2h)."""
    h, norms = cfg.d_model, 2 * cfg.d_model * (2 if cfg.bias else 1)
    if not cfg.bias:
        return 0, norms
    kv = cfg.n_kv_head * (h // cfg.n_head)
    return h + 2 * kv + (2 if cfg.gated_mlp else 1) * cfg.d_mlp, 2 * h + norms


def block_params(cfg: GPTConfig) -> int:
    return block_weights(cfg) + sum(block_vectors(cfg))


def param_count(cfg: GPTConfig) -> int:
    """Parameters of models/gpt.py's GPT or models/llama.py's Llama: blocks, token (and position)
    tables, final norm, head."""
    h = cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * h
    positions = cfg.max_seq_len * h if cfg.learned_positions else 0
    return cfg.n_layer * block_params(cfg) + cfg.vocab_size * h + positions + (2 * h if cfg.bias else h) + head


def matmul_params(cfg: GPTConfig) -> int:
    """N of the FLOP formula: the weights that take part in matrix products (the head's, not the lookup's)."""
    return cfg.n_layer * block_weights(cfg) + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: GPTConfig, seq_len: int, recompute: bool = False) -> float:
    """Training FLOPs per token: 6N + 12 L T h, plus 2 (L x block weights) + 4 L T h (GPT: 24 L h^2 +
    4 L T h) when blocks are recomputed."""
    L, h = cfg.n_layer, cfg.d_model
    flops = 6 * matmul_params(cfg) + 12 * L * seq_len * h
    if recompute:
        flops += 2 * L * block_weights(cfg) + 4 * L * seq_len * h
    return float(flops)


def rank_params(cfg: GPTConfig, blocks: int, first: bool, last: bool, tp: int, pp: int) -> float:
    """Parameters held by one rank: its blocks' shards, and the embedding (first stage) and the
    head (last stage; with tied embeddings a second copy only when they are on different stages)."""
    h, t, V = cfg.d_model, tp, cfg.vocab_size
    split, replicated = block_vectors(cfg)
    n = blocks * (block_weights(cfg) / t + (split / t + replicated))
    if first:
        n += V * h / t + (cfg.max_seq_len * h if cfg.learned_positions else 0)
    if last:
        n += (2 * h if cfg.bias else h)
        if not cfg.tie_embeddings or (pp > 1 and not first):
            n += V * h / t
    return n


def model_state_bytes(n_params: float, zero: int, dp: int, precision: str) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state for `n_params` on one rank (ZeRO paper's
    accounting as parallel/zero.py implements it: a sharded gradient is kept in fp32, the
    reduction's dtype, 4 bytes where the paper counts 2; stage 3 keeps no 2-byte parameter shard,
    it gathers the fp32 master cast on the way, so its total is the paper's 16)."""
    if precision == "fp32":
        p, g, o = 4.0, 4.0, 8.0  # Adam's two moments; the master is the parameter itself
    else:
        p, g, o = 2.0, 2.0, 12.0  # fp32 master + two moments
    if zero >= 1:
        o /= dp
    if zero >= 2:
        g = 4.0 / dp
    if zero >= 3:
        p = 0.0 if precision != "fp32" else p / dp  # mixed: the master (in `o`) is what is gathered
    return {"params": n_params * p, "grads": n_params * g, "optimizer": n_params * o}


# --------------------------------------------------------------------- activations
def sharded_activations(cfg: GPTConfig) -> float:
    """a: the tensors of sbh elements a block keeps that tp shards (see the module docstring):
    GPT 12; a Llama block 2 + 2g/h + 4f/h."""
    h, g = cfg.d_model, cfg.n_kv_head * (cfg.d_model // cfg.n_head)
    return 2 + 2 * g / h + (4 if cfg.gated_mlp else 2) * cfg.d_mlp / h


def activation_bytes_per_layer(seq: int, micro: int, hidden: int, tp: int, sequence_parallel: bool,
                               elem: int, sharded: float = 12) -> float:
    """Bytes one block keeps for backward for one micro-batch (see the module docstring); `sharded`:
    the block's a (GPT's 12 by default)."""
    sbh = seq * micro * hidden * elem
    if tp == 1:
        return (4 + sharded) * sbh
    if sequence_parallel:
        return sbh * (2 + (2 + sharded) / tp)
    return sbh * (4 + sharded / tp)


def checkpointed_bytes_per_layer(seq: int, micro: int, hidden: int, tp: int, sequence_parallel: bool,
                                 elem: int) -> float:
    return seq * micro * hidden * elem / (tp if sequence_parallel else 1)
