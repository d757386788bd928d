"""The fused model built in a rank's share of the memory: what fuse.py runs under torchrun (or with
--lean-build).

fusion.fuse_state_dicts is the fusion step on state dicts loaded whole: four models in memory at
once. At 7B that is the whole 57 GiB float32 fused model on every rank. This builds exactly the same
tensors (a test holds the two bit for bit) without ever holding more than the rank's share:
  1. CheckpointRows     rows [start, stop) of any tensor of a memory-mapped checkpoint, assembled
                        from its model-parallel shards without reading any other row
  2. fill_*             where each row of each fused parameter comes from: fusion's equation, row by
                        row, each rank only its own rows (distributed.local_rows)
  3. build_fused_model  the model built on the meta device (no memory), sharded by the caller's
                        `shard` (distributed.shard_model under torchrun), given storage, then filled
                        one checkpoint file at a time. Router init "hidden" needs the base model's
                        hidden states: the fused model with expert 0 := the base's FFN and every
                        token forced to expert 0 is exactly the base model, so no second model
                        is built.
bench/bench_fuse_memory.py measures its peak host memory against building the whole model first.
"""
import ctypes
import os
from dataclasses import replace

import torch

from data.tokenizer import Tokenizer
from engineering.checkpoints import (check_fusion_inputs, check_non_ffn_difference,
                                     checkpoint_dtype, merged_shapes, read_checked, read_torch_file)
from engineering.distributed import local_rows
from engineering.hf_checkpoint import is_hf_dir
from engineering.lora import init_lora, is_lora_name
from fusion import hidden_router_rows, router_weight
from model import Transformer, shard_dim
from moe import EXPERT_MATRICES, set_forced_expert

# --------------------------------------------------------------------------------------------------
# 1. Lazy checkpoints: read only the rows a rank needs


class CheckpointRows:
    """A Meta-format checkpoint, memory-mapped: rows(name, start, stop) = full_tensor[start:stop]
    (dim 0), assembled from the model-parallel shards without reading (or paging in) any other row.
    Its files are checked as load_checkpoint checks them (checkpoints.read_checked; a HF directory
    is converted in memory, one "shard": its wq/wk and experts are copies, the rest mapped). Call
    close() to drop the mappings, so the pages read stop counting towards the process's memory, and
    reopen() to map the checked files again."""

    def __init__(self, ckpt_dir: str):
        self.dir = ckpt_dir
        self.args, files = read_checked(ckpt_dir)
        self.paths, self.shards = list(files), list(files.values())
        self.dtype = checkpoint_dtype(files)  # what load_checkpoint would give the model
        for shard in self.shards:
            shard.pop("rope.freqs", None)  # Meta's precomputed rotary table; model.py computes it
        self.shapes = merged_shapes(self.shards)

    def reopen(self):
        if is_hf_dir(self.dir):  # converted in memory: convert again
            self.shards = list(read_checked(self.dir)[1].values())
        else:
            self.shards = [read_torch_file(p) for p in self.paths]
        for shard in self.shards:
            shard.pop("rope.freqs", None)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        parts = [s[name] for s in self.shards]
        dim = shard_dim(name, parts[0].dim())
        if dim is None or len(parts) == 1:
            return parts[0][start:stop]
        if dim != 0:  # split along columns: every shard holds a piece of each row
            return torch.cat([p[start:stop] for p in parts], dim=dim)
        # split along rows: take the overlap of [start, stop) with each shard's rows
        out, offset = [], 0
        for p in parts:
            lo, hi = max(start, offset), min(stop, offset + p.shape[0])
            if lo < hi:
                out.append(p[lo - offset : hi - offset])
            offset += p.shape[0]
        return torch.cat(out) if out else parts[0][:0]

    def close(self):
        self.shards = None


# --------------------------------------------------------------------------------------------------
# 2. The fused tensors: where each row comes from (fusion.fuse_state_dicts, row by row)


@torch.no_grad()
def fill_from_base(model, base: CheckpointRows):
    """Every parameter but the stacked experts and the routers := the base's tensor (this rank's
    rows)."""
    for name, param in model.named_parameters():
        if not is_from_base(name):
            # filled expert by expert (fill_from_expert), by fill_routers; LoRA deltas by init_lora
            continue
        local, start, stop = local_rows(param)
        local.copy_(base.rows(name, start, stop))


@torch.no_grad()
def fill_routers(model, routers: list):
    """Each layer's router W_g[l] [E, dim] := routers[l] (this rank's rows)."""
    for name, param in model.named_parameters():
        if name.endswith("router.weight"):
            local, start, stop = local_rows(param)
            local.copy_(routers[int(name.split(".")[1])][start:stop])  # [rows, dim]


@torch.no_grad()
def fill_from_expert(model, e: int, expert: CheckpointRows):
    """Expert e of every stacked matrix, W1[l][e], W2[l][e], W3[l][e] := aligned model e's
    FeedForward matrices (this rank's rows of them)."""
    for name, param in model.named_parameters():
        *prefix, matrix = name.split(".")
        if matrix not in EXPERT_MATRICES:
            continue
        local, start, stop = local_rows(param)  # local [E, stop - start, ...]
        aligned_name = ".".join(prefix) + f".{matrix}.weight"  # layers.l.feed_forward.w1.weight
        local[e].copy_(expert.rows(aligned_name, start, stop))


@torch.no_grad()
def non_ffn_difference(model, expert: CheckpointRows) -> tuple:
    """(max |expert - base| over the non-FFN weights, its key), on this rank's rows; the fused
    model's non-FFN weights already hold the base's (fill_from_base)."""
    max_diff, max_key = 0.0, None
    for name, param in model.named_parameters():
        if not is_from_base(name):
            continue
        local, start, stop = local_rows(param)
        if stop > start:
            diff = (expert.rows(name, start, stop).float() - local.float()).abs().max().item()
            if diff > max_diff:
                max_diff, max_key = diff, name
    return max_diff, max_key


# --------------------------------------------------------------------------------------------------
# 3. Building the fused model


def empty_model(args, dtype, device, shard=None, seed=0):
    """A Transformer whose parameters exist only on this rank's share: built on the meta device (no
    memory), sharded by `shard` (e.g. distributed.shard_model under torchrun), then given
    uninitialised storage."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    if shard is not None:
        model = shard(model)  # (fuse.py --lora-rank: adds the LoRA deltas first, lora.add_lora)
    model = model.to_empty(device=device)
    # A random, B = 0 (a no-op without deltas): the router init below sees the fused model exactly
    init_lora(model, seed)
    return model


def release_freed_host_memory():
    """glibc keeps freed heap memory for reuse (under FSDP on CPU: the all-gather buffers of a
    forward, ~4 layers' worth); hand it back to the OS, so that it does not add to the peak while
    the experts are read. Does nothing without glibc; on GPUs those buffers were GPU memory
    anyway."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _max_over_ranks(value: float) -> float:
    if not torch.distributed.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def is_from_base(name: str) -> bool:
    """Does this fused parameter come from the base? Not a stacked expert, a router or a LoRA
    factor."""
    return not (name.split(".")[-1] in EXPERT_MATRICES or name.endswith("router.weight")
                or is_lora_name(name))


def build_fused_model(base_dir, expert_dirs, top_k=2, router_init="zero", init_prompts=None,
                      tokenizer=None, device="cpu", dtype=None, router_std=0.02, seed=0,
                      verbose=True, max_non_ffn_diff=None, shard=None):
    """H3Fusion's fusion step: base model + N aligned models (FFN-only fine-tunes) -> one MoE model.

    base_dir, expert_dirs: Meta-format checkpoint directories; expert i of every layer = the
        FeedForward of expert_dirs[i] (order = the order given, e.g. helpful, harmless, honest).
    Every non-FFN tensor of each aligned model is compared with the base's: a different config is
    refused; the max |difference| of the values is reported (0 when stage 1 froze them as it
    should; the fused model always takes the base's). max_non_ffn_diff: refuse an expert whose
    difference is larger (fuse.py passes 0: an expert trained from another base is not an H3Fusion
    expert).
    router_init: "zero"   -> uniform routing (ties: experts 0 .. k-1 win until the router learns),
                 "random" -> N(0, router_std) with torch seed `seed`,
                 "hidden" -> hidden_router_rows() (an extra, mergekit's idea): needs init_prompts =
                             one list of strings per expert (tokenizer: a data.tokenizer.Tokenizer;
                             default base_dir/tokenizer.model).
    dtype: the parameters' dtype (None: the base checkpoint's). shard(model) -> model: applied on
        the meta device before any weight is read (distributed.shard_model: FSDP2), so each rank
        reads only its rows.
    Returns (model.Transformer with n_experts = N, ModelArgs); save it with
    checkpoints.save_checkpoint.
    """
    expert_dirs = list(expert_dirs)
    check_fusion_inputs(base_dir, expert_dirs, router_init, init_prompts)
    n_experts = len(expert_dirs)  # (top_k is checked where it is used: moe.MoE)
    base = CheckpointRows(base_dir)
    dtype = dtype or base.dtype
    args = replace(base.args, n_experts=n_experts, top_k=top_k)

    fused = empty_model(args, dtype, device, shard, seed)
    fill_from_base(fused, base)
    routers = [router_weight(router_init, i, n_experts, args.dim, dtype, router_std, seed)
               for i in range(args.n_layers)]
    # the fused model with expert 0 := the base's FFN, all tokens sent to it, IS the base
    if router_init == "hidden":
        fill_from_expert(fused, 0, base)
        base.close()  # (its pages leave this process's memory before the forward gathers layers)
        set_forced_expert(fused, 0)
        rows = hidden_router_rows(fused,
                                  tokenizer or Tokenizer(os.path.join(base_dir, "tokenizer.model")),
                                  init_prompts)  # L x [E, D]
        set_forced_expert(fused, None)
        routers = [r.to("cpu", dtype) for r in rows]
        release_freed_host_memory()
    fill_routers(fused, routers)
    base.close()  # expert 0's slot (if it held the base's FFN) is overwritten next
    for e, expert_dir in enumerate(expert_dirs):  # one aligned checkpoint mapped at a time
        expert = CheckpointRows(expert_dir)
        local_diff, key = non_ffn_difference(fused, expert)
        # mapped again for the FFN rows: the pages of only one of the two reads count at a time
        expert.close()
        expert.reopen()
        fill_from_expert(fused, e, expert)
        expert.close()
        max_diff = _max_over_ranks(local_diff)
        key = key if local_diff == max_diff else "on another rank"
        check_non_ffn_difference(expert_dir, base_dir, max_diff, key, max_non_ffn_diff, verbose)
    return fused, args
