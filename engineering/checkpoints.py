"""The checks model.py's Meta-checkpoint reader and writer apply, kept out of the single-file LLaMA a student reads.

Each raises the error model.py raised before the checks moved here (the message names the file, what was found
and what was expected); model.py calls each in one line. It imports nothing from the project: what a check needs
to know about the model (its fields, its parameters' shapes, how a tensor is split) model.py passes in.
A tensor file cut short is hf_checkpoint.read_torch_file's to name (model.load_shard).

  read_params_json       params.json -> dict: the file is there and is JSON
  check_params_keys      params.json names only ModelArgs fields (an unknown key would be silently ignored)
  check_shards           model-parallel shards agree: same keys, same shape off the split dim, equal replicas
  check_shard_names      consolidated.00.pth .. NN.pth, numbered without a gap
  check_checkpoint_dir   the checkpoint directory exists
  resolved_vocab_size    vocab_size -1 taken from tokenizer.model, and the two agree
  check_state_shapes     a checkpoint's tensors are exactly the parameters params.json implies
  check_splits           save_checkpoint(n_shards): every split tensor divides evenly
"""
import json
import os

import torch


def read_params_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (a checkpoint directory needs params.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def check_params_keys(raw: dict, known: set, path: str):
    for key in raw:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r}; expected some of {sorted(known)}")


def check_shards(shards: list, paths: list, shard_dim):
    """shards[i] read from paths[i]; shard_dim(name, ndim) is the dimension a tensor is split along (None =
    replicated)."""
    for shard, path in zip(shards[1:], paths[1:]):
        if set(shard) != set(shards[0]):
            diff = sorted(set(shard) ^ set(shards[0]))[:5]
            raise ValueError(f"{path}: keys differ from {paths[0]}: {diff}")
    for name, first in shards[0].items() if len(shards) > 1 else ():
        dim = shard_dim(name, first.dim())
        for shard, path in zip(shards[1:], paths[1:]):
            t = shard[name]
            same = [i for i in range(first.dim()) if i != dim]
            if t.dim() != first.dim() or any(t.shape[i] != first.shape[i] for i in same):
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, {paths[0]} has {tuple(first.shape)}")
            if dim is None and not torch.equal(t, first):
                raise ValueError(f"{path}: replicated tensor {name} differs from {paths[0]}")


def check_shard_names(ckpt_dir: str, paths: list):
    """paths: the sorted consolidated.*.pth files found in ckpt_dir."""
    if not paths:
        raise FileNotFoundError(f"{ckpt_dir}: no consolidated.NN.pth files (expected Meta's checkpoint format)")
    expected = [os.path.join(ckpt_dir, f"consolidated.{i:02d}.pth") for i in range(len(paths))]
    if paths != expected:
        raise ValueError(f"{ckpt_dir}: shards must be consolidated.00.pth .. {len(paths) - 1:02d}; found "
                         f"{[os.path.basename(p) for p in paths]}")


def check_checkpoint_dir(ckpt_dir: str):
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint directory not found")


def resolved_vocab_size(vocab_size: int, n_words, params_path: str, tok_path: str) -> int:
    """vocab_size as params_path says it (-1 = the tokenizer's), checked against tokenizer.model's n_words (None =
    no tokenizer.model)."""
    if vocab_size == -1:
        if n_words is None:
            raise ValueError(f"{params_path}: vocab_size is -1 and there is no {tok_path} to take it from")
        vocab_size = n_words
    if n_words is not None and n_words != vocab_size:
        raise ValueError(f"{tok_path}: tokenizer has {n_words} pieces but tok_embeddings has {vocab_size} rows")
    return vocab_size


def check_state_shapes(shapes: dict, expected: dict, where: str):
    """shapes {name: shape} read from `where` against expected, the model's state dict (on the meta device)."""
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} for params.json")
    for name, t in expected.items():
        if tuple(shapes[name]) != tuple(t.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(shapes[name])}, params.json implies {tuple(t.shape)}")


def check_splits(name: str, shape, dim, n_shards: int):
    if dim is not None and shape[dim] % n_shards:
        raise ValueError(f"{name}: size {shape[dim]} along dim {dim} is not divisible by n_shards={n_shards}")
