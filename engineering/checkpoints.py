"""Checkpoint directories are other people's files: read them strictly, write them whole.

model.py reads Meta's layout in a few plain lines. Every command reads through this file instead:
it checks each file first, so that a broken directory ends in one line naming the file, what was
found and what was expected, then builds the model as model.load_checkpoint, the plain Meta reader,
does (model_from_shards; Hugging Face's layout is converted first: engineering/hf_checkpoint.py,
checked by engineering/hf_checks.py). Every file is read once. Reading
writes and deletes nothing. Saving is here too: a checkpoint is written into a temporary directory
and renamed into place, so a kill never leaves half of one.

  load_checkpoint       read_checked, then model.model_from_shards; one dtype (checkpoint_dtype)
  read_checked          a checkpoint's ModelArgs and tensors, every file checked (Meta or HF layout)
  read_checkpoint_args  a checkpoint's ModelArgs (params.json or config.json), vocab_size resolved
  save_checkpoint       params.json + consolidated.NN.pth (+ tokenizer.model), atomically
  recover_checkpoint    finish or roll back a save a kill interrupted (called by what writes)
  architecture, check_fusion_inputs        what checkpoints must share to be fused or merged
  check_*               one per thing a Meta directory can get wrong
"""
import glob
import json
import os
import shutil
from dataclasses import asdict, fields

import torch
import torch.nn as nn

import model as M
from data.tokenizer import Tokenizer
from fusion import ROUTER_INITS
from engineering.fileio import own_leftovers, recover_dir, replace_dir, write_atomic
from engineering.hf_checkpoint import (HF_MARKER, config_path, is_hf_dir, read_hf_checkpoint,
                                       read_hf_params, read_torch_file)

MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what it computes in

# --------------------------------------------------------------------------------------------------
# 1. Reading


def load_checkpoint(ckpt_dir: str, device="cpu", dtype=None):
    """A checkpoint directory -> (model.Transformer, model.ModelArgs), every file checked first
    (read_checked), the model built as model.load_checkpoint builds it (model_from_shards). It has
    one dtype: `dtype`, else checkpoint_dtype's. Reading writes and deletes nothing (an interrupted
    save is finished by the next command that writes: recover_checkpoint)."""
    args, files = read_checked(ckpt_dir)
    dtype = dtype or checkpoint_dtype(files)
    return M.model_from_shards(args, list(files.values()), device, dtype), args


def read_checked(ckpt_dir: str) -> tuple:
    """(ModelArgs, {file: state dict with Meta's names}) of a checkpoint directory, every file
    checked as it is read, each read once, the tensors memory-mapped. Meta's layout:
    read_checkpoint_args, then check_meta_files (one entry per consolidated.NN.pth). A Hugging Face
    Llama / Mixtral directory (config.json): checked file by file (engineering/hf_checks.py) and
    converted to Meta's names in memory (hf_checkpoint.read_hf_checkpoint; one entry)."""
    if not is_hf_dir(ckpt_dir):
        args = read_checkpoint_args(ckpt_dir)
        return args, check_meta_files(ckpt_dir, args)
    params, state = read_hf_checkpoint(ckpt_dir)
    args = with_tokenizer_vocab(M.ModelArgs(**params), ckpt_dir)
    check_state_shapes({name: t.shape for name, t in state.items()}, meta_model(args).state_dict(),
                       f"{ckpt_dir} (Hugging Face layout)", HF_MARKER)
    return args, {ckpt_dir: state}


def checkpoint_dtype(files: dict) -> torch.dtype:
    """The one dtype a model loaded from files {path: state dict} gets when the caller names none:
    the floating dtype that holds most of its numbers. A checkpoint saved in one dtype keeps it
    (bfloat16 stays bfloat16, memory-mapped, not copied). In one that mixes them (a float32 norm
    among bfloat16 matrices, say) the few others are cast to it: the model computes in one dtype,
    and the bulk of the weights keep the precision and size they were saved in. A tensor that is not
    floating point is refused: no weight of this model is an integer."""
    numbers = {}
    for path, state in files.items():
        for name, t in state.items():
            if t.dtype not in MODEL_DTYPES:
                raise ValueError(f"{path}: {name} is {t.dtype}; expected floating-point weights "
                                 f"({', '.join(str(d) for d in MODEL_DTYPES)})")
            numbers[t.dtype] = numbers.get(t.dtype, 0) + t.numel()
    return max(numbers, key=lambda dtype: (numbers[dtype], dtype.itemsize))


def read_checkpoint_args(ckpt_dir: str) -> M.ModelArgs:
    """params.json (or HF's config.json), vocab_size -1 resolved from (and checked against)
    tokenizer.model: the one place a config is read; compare what it returns (architecture). A HF
    config.json is checked against the weights present (hf_checkpoint.read_hf_params)."""
    check_checkpoint_dir(ckpt_dir)
    if is_hf_dir(ckpt_dir):
        return with_tokenizer_vocab(M.ModelArgs(**read_hf_params(ckpt_dir)), ckpt_dir)
    params_path = os.path.join(ckpt_dir, "params.json")
    raw = read_params_json(params_path)
    check_params_keys(raw, {f.name for f in fields(M.ModelArgs)}, params_path)
    return with_tokenizer_vocab(M.ModelArgs(**raw), ckpt_dir)


def with_tokenizer_vocab(args: M.ModelArgs, ckpt_dir: str) -> M.ModelArgs:
    """args with vocab_size -1 resolved from, and any other checked against, the directory's
    tokenizer.model (resolved_vocab_size)."""
    tok_path = os.path.join(ckpt_dir, "tokenizer.model")
    n_words = Tokenizer(tok_path).n_words if os.path.exists(tok_path) else None
    args.vocab_size = resolved_vocab_size(args.vocab_size, n_words, config_path(ckpt_dir),
                                          tok_path)
    return args


def check_meta_files(ckpt_dir: str, args: M.ModelArgs):
    """Everything model.load_checkpoint trusts of a Meta directory whose params.json gave `args`:
    shards named consolidated.00.pth .. NN.pth without a gap, each a whole torch.save file of
    tensors only, the shards agreeing with each other, and their tensors exactly the model's
    parameters. Returns {path: shard} (memory-mapped; rope.freqs kept, model_from_shards drops
    it)."""
    paths = shard_paths(ckpt_dir)
    shards = [read_torch_file(p) for p in paths]
    check_shards(shards, paths, M.shard_dim)
    shapes = merged_shapes(shards)
    shapes.pop("rope.freqs", None)
    where = f"{ckpt_dir} ({len(paths)} shard{'s' * (len(paths) > 1)})"
    check_sizes_present(shapes, args, os.path.join(ckpt_dir, "params.json"), where)
    check_state_shapes(shapes, meta_model(args).state_dict(), where)
    return dict(zip(paths, shards))


def shard_paths(ckpt_dir: str) -> list:
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    check_shard_names(ckpt_dir, paths)  # consolidated.00.pth .. NN.pth, no gap
    return paths


def merged_shapes(shards: list) -> dict:
    """{name: the shape of the merged tensor} of model-parallel shards, without merging them."""
    shapes = {}
    for name, first in shards[0].items():
        shape, dim = list(first.shape), M.shard_dim(name, first.dim())
        if dim is not None:
            shape[dim] = sum(s[name].shape[dim] for s in shards)
        shapes[name] = torch.Size(shape)
    return shapes


def meta_model(args: M.ModelArgs):
    """The Transformer `args` describes, on the meta device (no memory): its parameters' names and
    shapes are what a checkpoint of it must hold."""
    with torch.device("meta"):
        return M.Transformer(args)


# --------------------------------------------------------------------------------------------------
# 2. Writing


def params_json(args: M.ModelArgs) -> dict:
    """Meta's params.json fields of `args`; optional ones only when set, MoE fields only for fused
    models."""
    out = {k: v for k, v in asdict(args).items() if v is not None}
    if args.n_experts == 0:
        out.pop("n_experts"), out.pop("top_k")
    return out


def recover_checkpoint(ckpt_dir: str):
    """Finish or roll back a save_checkpoint (or HF export) that a kill interrupted
    (engineering/fileio.py's recover_dir; params.json or config.json marks a complete copy; only
    replace_dir's own marked leftovers are touched). It writes, so reading never calls it:
    save_checkpoint does, and the commands that write (fuse.py, engineering/rundir.py
    check_run_dir)."""
    recover_dir(ckpt_dir, ("params.json", HF_MARKER))  # (an interrupted HF export: config.json)


def save_checkpoint(model, ckpt_dir: str, tokenizer_path: str = None, n_shards: int = 1,
                    args: M.ModelArgs = None):
    """Write params.json + consolidated.NN.pth (+ tokenizer.model) atomically.

    `model` is a Transformer or a state dict (then pass `args`). Everything is written into a
    temporary directory beside `ckpt_dir`, params.json last, and renamed into place
    (engineering/fileio.py's replace_dir), so an interrupted save leaves no half checkpoint. An
    existing checkpoint at `ckpt_dir` is replaced; its tokenizer.model is kept if none is given.
    """
    state = model.state_dict() if isinstance(model, nn.Module) else model
    args = args or model.params
    ckpt_dir = os.path.abspath(ckpt_dir)
    for name, t in state.items():
        check_splits(name, t.shape, M.shard_dim(name, t.dim()), n_shards)
    shards = M.split_state_dict(state, n_shards)

    def fill(tmp):  # runs after replace_dir has recovered ckpt_dir, so a kept tokenizer is found
        for i, shard in enumerate(shards):
            torch.save(shard, os.path.join(tmp, f"consolidated.{i:02d}.pth"))
        kept = os.path.join(ckpt_dir, "tokenizer.model")
        source = (tokenizer_path if tokenizer_path is not None
                  else kept if os.path.exists(kept) else None)
        if source is not None:
            shutil.copyfile(source, os.path.join(tmp, "tokenizer.model"))
        write_atomic(os.path.join(tmp, "params.json"), json.dumps(params_json(args), indent=2))

    replace_dir(ckpt_dir, fill, marker="params.json", kind="a checkpoint directory")
    return ckpt_dir


# --------------------------------------------------------------------------------------------------
# 3. Two checkpoints of one architecture (stage 2 fuses them, the baselines merge them)


def architecture(args: M.ModelArgs) -> dict:
    """What two checkpoints must share to be one architecture, on resolved values (ModelArgs as
    read_checkpoint_args returns it: vocab_size -1 already taken from tokenizer.model): the kv heads
    and the FFN width themselves, however params.json or config.json spells them (n_kv_heads None =
    n_heads; multiple_of and ffn_dim_multiplier only give the width). max_seq_len, a runtime limit,
    is left out."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
            "kv_heads": args.kv_heads, "vocab_size": args.vocab_size,
            "ffn_hidden_dim": M.ffn_hidden_dim(args), "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "n_experts": args.n_experts,
            "top_k": args.top_k if args.n_experts else None}


def first_difference(args, other_args):
    """(field, value in args, value in other_args) of the first architecture field that differs, or
    None."""
    a, b = architecture(args), architecture(other_args)
    return next(((k, a[k], b[k]) for k in a if a[k] != b[k]), None)


def check_fusion_inputs(base_dir: str, expert_dirs: list, router_init: str,
                        init_prompts) -> M.ModelArgs:
    """Stage 2's inputs, before anything is loaded: the checkpoints are there, one aligned model per
    expert, a known router init ("hidden" needs a non-empty list of prompts per expert), a dense
    base, and every aligned model of the base's architecture. Returns the base's ModelArgs."""
    for d in [base_dir] + list(expert_dirs):
        if not os.path.isdir(d):
            raise FileNotFoundError(f"{d}: checkpoint directory not found "
                                    f"(the base or an aligned model)")
    if not expert_dirs:
        raise ValueError("the list of aligned checkpoints is empty; expected one per expert")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init={router_init!r}; expected one of {ROUTER_INITS}")
    n_experts = len(expert_dirs)
    if router_init == "hidden" and (init_prompts is None or len(init_prompts) != n_experts
                                    or any(len(p) == 0 for p in init_prompts)):
        raise ValueError(f"router_init='hidden' needs init_prompts = {n_experts} non-empty lists "
                         f"of prompts (one per expert), got {init_prompts!r:.200}")
    base_args = read_checkpoint_args(base_dir)
    if base_args.n_experts != 0:
        raise ValueError(f"{config_path(base_dir)}: n_experts={base_args.n_experts}; the base must "
                         f"be a dense model")
    for expert_dir in expert_dirs:
        diff = first_difference(read_checkpoint_args(expert_dir), base_args)
        if diff:
            name, found, expected = diff
            raise ValueError(f"{config_path(expert_dir)}: {name}={found!r}, but the base "
                             f"{base_dir} has {name}={expected!r}; aligned models must have the "
                             f"base's architecture (and be dense, n_experts=0)")
    return base_args


def check_non_ffn_difference(expert_dir: str, base_dir: str, max_diff: float, key, limit,
                             verbose: bool):
    """An aligned model's non-FFN weights against the base's: max |difference| `max_diff` (at
    `key`). Stage 1 freezes them, so it is 0; the fused model takes the base's anyway. Above `limit`
    (fuse.py: 0, unless --allow-foreign-experts; None: no limit) the expert was trained from another
    base: refused. Reported when verbose."""
    if limit is not None and max_diff > limit:
        raise ValueError(f"{expert_dir}: its non-FFN weights differ from the base's ({base_dir}) "
                         f"by up to {max_diff:.3g} ({key}); an H3Fusion expert is an FFN-only "
                         f"fine-tune of the base (stage 1 freezes everything else), this looks "
                         f"like a model trained from another base")
    if verbose:
        print(f"fusion: {expert_dir}: max |non-FFN - base| = {max_diff:.3g}"
              + (f" ({key}) -- NOT an FFN-only fine-tune of this base; fused anyway, with the "
                 f"base's weights" if max_diff else ""))


# --------------------------------------------------------------------------------------------------
# 4. The checks, one per thing a Meta directory can get wrong (each names the file)


def read_params_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found "
                                f"(a checkpoint directory needs params.json)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def check_params_keys(raw: dict, known: set, path: str):
    """params.json names only ModelArgs fields (an unknown key would be silently ignored)."""
    for key in raw:
        if key not in known:
            raise ValueError(f"{path}: unknown key {key!r}; expected some of {sorted(known)}")


def check_shards(shards: list, paths: list, shard_dim):
    """shards[i] read from paths[i] agree: same keys, same shape off the split dim, equal replicas.
    shard_dim(name, ndim) is the dimension a tensor is split along (None = replicated)."""
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
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, {paths[0]} has "
                                 f"{tuple(first.shape)}")
            if dim is None and not torch.equal(t, first):
                raise ValueError(f"{path}: replicated tensor {name} differs from {paths[0]}")


def check_sizes_present(shapes: dict, args, params_path: str, where: str):
    """params.json's n_layers and n_experts against the tensors the shards hold, before a model of
    that size is built (a wrong n_layers of 10^9 would build 10^9 blocks first)."""
    layers = {int(name.split(".")[1]) for name in shapes if name.startswith("layers.")}
    if args.n_layers != len(layers) or layers != set(range(len(layers))):
        raise ValueError(f"{params_path}: n_layers={args.n_layers}, but {where} holds the tensors "
                         f"of layers {sorted(layers)[:5]}{' ...' if len(layers) > 5 else ''} "
                         f"({len(layers)} layers)")
    w1 = shapes.get("layers.0.feed_forward.w1")
    if args.n_experts and (w1 is None or w1[0] != args.n_experts):
        found = "no stacked experts" if w1 is None else f"{w1[0]} experts"
        raise ValueError(f"{params_path}: n_experts={args.n_experts}, but {where} holds {found} "
                         f"(layers.0.feed_forward.w1)")


def check_shard_names(ckpt_dir: str, paths: list):
    """paths: the sorted consolidated.*.pth files found in ckpt_dir."""
    if not paths:
        raise FileNotFoundError(f"{ckpt_dir}: no consolidated.NN.pth files (expected Meta's "
                                f"checkpoint format)")
    expected = [os.path.join(ckpt_dir, f"consolidated.{i:02d}.pth") for i in range(len(paths))]
    if paths != expected:
        raise ValueError(f"{ckpt_dir}: shards must be consolidated.00.pth .. {len(paths) - 1:02d}; "
                         f"found {[os.path.basename(p) for p in paths]}")


def check_checkpoint_dir(ckpt_dir: str):
    if not os.path.isdir(ckpt_dir):
        leftovers = own_leftovers(ckpt_dir, "tmp") + own_leftovers(ckpt_dir, "old")
        hint = (f" (a save to it was interrupted and left {os.path.basename(leftovers[-1])} beside "
                f"it: the next save to this path, or checkpoints.recover_checkpoint, finishes it)"
                if leftovers else "")
        raise FileNotFoundError(f"{ckpt_dir}: checkpoint directory not found{hint}")


def resolved_vocab_size(vocab_size: int, n_words, params_path: str, tok_path: str) -> int:
    """vocab_size as params_path says it (-1 = the tokenizer's), checked against tokenizer.model's
    n_words (None = no tokenizer.model)."""
    if vocab_size == -1:
        if n_words is None:
            raise ValueError(f"{params_path}: vocab_size is -1 and there is no {tok_path} to take "
                             f"it from")
        vocab_size = n_words
    if n_words is not None and n_words != vocab_size:
        raise ValueError(f"{tok_path}: tokenizer has {n_words} pieces but tok_embeddings has "
                         f"{vocab_size} rows")
    return vocab_size


def check_state_shapes(shapes: dict, expected: dict, where: str, config_name: str = "params.json"):
    """shapes {name: shape} read from `where` against expected, the model's state dict (on the meta
    device) as config_name describes it."""
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{where}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]} "
                         f"for {config_name}")
    for name, t in expected.items():
        if tuple(shapes[name]) != tuple(t.shape):
            raise ValueError(f"{where}: {name} has shape {tuple(shapes[name])}, {config_name} "
                             f"implies {tuple(t.shape)}")


def check_splits(name: str, shape, dim, n_shards: int):
    """save_checkpoint(n_shards): every split tensor divides evenly."""
    if dim is not None and shape[dim] % n_shards:
        raise ValueError(f"{name}: size {shape[dim]} along dim {dim} is not divisible by "
                         f"n_shards={n_shards}")
