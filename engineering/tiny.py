"""Write a random tiny LLaMA checkpoint in Meta's format, tokenizer included, for tests and demos.

    python -m engineering.tiny runs/tiny                # dim 64, 2 layers, 1 shard
    python -m engineering.tiny runs/tiny2 --n-shards 2  # the same model in two files, as 13B/70B
    python generate.py runs/tiny --prompt "Once upon a time"

The weights are random (the text it generates is noise); the file layout is exactly what Meta ships:
params.json, consolidated.NN.pth, tokenizer.model.
"""
import argparse
import os
import random
import tempfile

import torch

from data.tokenizer import train_tokenizer
from engineering.checkpoints import save_checkpoint
from model import ModelArgs, Transformer

WORDS = ("the a river mountain small bright tree stone quick brown fox jumps over lazy dog "
         "helpful harmless honest answer question cannot tell you why because water fire seven "
         "2024 café naïve über 東京").split()


def generated_text(n_lines=400, seed=0):
    """Sentences of random words (ASCII, digits, accents, CJK) to train a tokenizer on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "."
            for _ in range(n_lines)]


def make_tiny_checkpoint(out_dir, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320,
                         seed=0, n_shards=1, dtype=torch.float32, n_experts=0, top_k=2,
                         multiple_of=32, max_seq_len=256):
    """Random weights + a tokenizer trained on generated text; returns out_dir.
    Deterministic in `seed`."""
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = train_tokenizer(generated_text(seed=seed), os.path.join(tmp, "tokenizer.model"),
                                   vocab_size)
        args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         vocab_size=vocab_size, multiple_of=multiple_of, max_seq_len=max_seq_len,
                         n_experts=n_experts, top_k=top_k)
        torch.manual_seed(seed)
        model = Transformer(args).to(dtype)
        save_checkpoint(model, out_dir, tokenizer_path=tok_path, n_shards=n_shards)
    return out_dir


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--n-shards", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    a = parser.parse_args()
    make_tiny_checkpoint(a.out_dir, dim=a.dim, n_layers=a.n_layers, n_shards=a.n_shards,
                         seed=a.seed, dtype=getattr(torch, a.dtype))
    print(f"wrote {a.out_dir}: " + ", ".join(sorted(os.listdir(a.out_dir))))
