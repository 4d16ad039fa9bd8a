"""Train a Hugging Face GPT-2, built from its config and unchanged, with paratrain's data
parallelism or ZeRO, on the standard library's source as bytes.

    torchrun --standalone --nproc-per-node 2 examples/hf_gpt2.py --zero 3
    torchrun --standalone --nproc-per-node 2 examples/hf_gpt2.py --zero 1 --precision bf16
    python examples/hf_gpt2.py --steps 20            # one process works too
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

import paratrain
from paratrain.data import load_corpus, token_batches


def build(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)  # every rank builds the same weights
    config = GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def loss_fn(output, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.logits.flatten(0, 1).float(), targets.flatten())


def data(seq_len: int = 64, global_batch: int = 16, seed: int = 0):
    """Windows of the standard library's source as bytes: global batch k is a function of (seed, k),
    each data-parallel rank takes its slice."""
    return token_batches(load_corpus(max_bytes=1 << 22), seq_len, global_batch, seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    mesh = paratrain.init()
    source = data()
    trainer = paratrain.Trainer(build(), mesh, loss_fn, data=source, eval_data=source.validation(), zero=args.zero,
                                precision=args.precision, lr=1e-3, steps=args.steps)
    trainer.fit()


if __name__ == "__main__":
    main()
