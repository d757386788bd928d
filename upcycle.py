"""Stage 2, step 1 (H3Fusion §3.2, "upcycling"): a base model and N aligned models -> one MoE model.

Every aligned model is an FFN-only fine-tune of the same base. The fused model takes the base's attention,
norms and embeddings, and in every layer l stacks the N aligned FeedForwards as its experts:

    W1[l] = stack(W1_1[l], ..., W1_N[l])   [E, hidden, dim]   (likewise W3; W2 is [E, dim, hidden])
    W_g[l] = the new router [E, dim]: zero, random, or hidden_router_rows (the base's mean FFN input per task;
             mergekit's idea, an extra: the paper only says the router is new)

Read top to bottom:
  1. The reference      fuse_state_dicts: the equation above on loaded state dicts, in a few lines;
                        fuse_in_memory: load every checkpoint whole, fuse, done. Read this first.
  2. Checks             the aligned models have the base's architecture; is_ffn_key, is_from_base
  3. Lazy checkpoints   CheckpointRows: rows [start, stop) of any tensor of a memory-mapped Meta checkpoint;
                        (distributed.local_rows: which rows of a parameter this rank holds; all without FSDP)
  4. The fused tensors  fill_from_base, fill_routers, fill_from_expert: where each row of each fused parameter
                        comes from (the same equation, row by row; exercise 6); non_ffn_difference
  5. Router init        hidden_router_rows (exercise 7); router_init_prompts picks the prompts it averages over
  6. Building           build_fused_model, what fuse.py runs: the same weights as fuse_in_memory (tests/test_moe.py),
                        in a rank's share of the memory. The model is built on the meta device (no memory), sharded
                        by the caller's `shard` (distributed.shard_model under torchrun), and each rank then reads
                        only its own rows of the checkpoint files, one file at a time. Router init "hidden" needs the
                        base model's hidden states: the fused model with expert 0 := the base's FFN and every token
                        forced to expert 0 is exactly the base model, so no second model is built.
Peak host memory per rank is then about its share of the weights, not the whole 3-expert model (plus, before,
four checkpoints in float32): bench/bench_fuse_memory.py measures both ways side by side.
"""
import ctypes
import os
from dataclasses import replace

import torch
import torch.nn.functional as F

from data.format import format_prompt
from engineering.distributed import local_rows
from engineering.hf_checkpoint import config_path, is_hf_dir, read_hf_checkpoint
from engineering.lora import init_lora, is_lora_name
from data.tokenizer import Tokenizer
from engineering.checkpoints import (check_state_shapes, load_checkpoint, load_shard, meta_model, read_checkpoint_args,
                                     shard_paths)
from model import Transformer, ffn_hidden_dim, shard_dim
from moe import EXPERT_MATRICES, set_forced_expert

FFN_NAMES = ("feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")
ROUTER_INITS = ("zero", "random", "hidden")


# ----------------------------------------------------------------------------------------------------
# 1. The reference: fusion in memory (read this first)


def fuse_state_dicts(base: dict, aligned: list, routers: list) -> dict:
    """The fusion step on loaded state dicts (Meta's names): every non-FFN tensor from the base; in every layer l,
    expert i's w1, w2, w3 := aligned model i's FeedForward matrices, stacked, and the router := routers[l]."""
    fused = {name: t for name, t in base.items() if not is_ffn_key(name)}
    for layer, router in enumerate(routers):
        ffn = f"layers.{layer}.feed_forward"
        for w in EXPERT_MATRICES:  # W[l] = stack(W_1[l], ..., W_N[l]): [E, hidden, dim] (w2: [E, dim, hidden])
            fused[f"{ffn}.{w}"] = torch.stack([sd[f"{ffn}.{w}.weight"] for sd in aligned])
        fused[f"{ffn}.router.weight"] = router  # [E, dim]
    return fused


def fuse_in_memory(base_dir, expert_dirs, top_k=2, router_init="zero", init_prompts=None, tokenizer=None,
                   dtype=None, router_std=0.02, seed=0):
    """build_fused_model's model, the simple way: every checkpoint loaded whole (four models in memory at once),
    fused by fuse_state_dicts. Router init "hidden" runs the base model itself. Returns (Transformer, ModelArgs)."""
    base, base_args = load_checkpoint(base_dir, dtype=dtype)
    aligned = [load_checkpoint(d, dtype=dtype)[0].state_dict() for d in expert_dirs]
    args = replace(base_args, n_experts=len(expert_dirs), top_k=top_k)
    dtype = base.norm.weight.dtype
    if router_init == "hidden":
        tokenizer = tokenizer or Tokenizer(os.path.join(base_dir, "tokenizer.model"))
        routers = [r.to(dtype) for r in hidden_router_rows(base, tokenizer, init_prompts)]  # L x [E, D]
    else:
        routers = [router_weight(router_init, layer, args.n_experts, args.dim, dtype, router_std, seed)
                   for layer in range(args.n_layers)]
    with torch.device("meta"):
        fused = Transformer(args)
    fused.load_state_dict(fuse_state_dicts(base.state_dict(), aligned, routers), assign=True)
    return fused, args


# ----------------------------------------------------------------------------------------------------
# 2. Checks


def is_ffn_key(name: str) -> bool:
    return name.endswith(FFN_NAMES)


def is_from_base(name: str) -> bool:
    """Does this fused parameter come from the base? Not a stacked expert, a router or a LoRA factor."""
    return not (name.split(".")[-1] in EXPERT_MATRICES or name.endswith("router.weight") or is_lora_name(name))


def architecture(args) -> dict:
    """What two checkpoints must share to be one architecture, on resolved values (ModelArgs as
    model.read_checkpoint_args returns it: vocab_size -1 already taken from tokenizer.model): the kv heads and
    the FFN width themselves, however params.json or config.json spells them (n_kv_heads None = n_heads;
    multiple_of and ffn_dim_multiplier only give the width). max_seq_len, a runtime limit, is left out."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "kv_heads": args.kv_heads,
            "vocab_size": args.vocab_size, "ffn_hidden_dim": ffn_hidden_dim(args), "norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta, "n_experts": args.n_experts, "top_k": args.top_k if args.n_experts else None}


def first_difference(args, other_args):
    """(field, value in args, value in other_args) of the first architecture field that differs, or None."""
    a, b = architecture(args), architecture(other_args)
    return next(((k, a[k], b[k]) for k in a if a[k] != b[k]), None)


def _check_args(base_args, args, base_dir, expert_dir):
    diff = first_difference(args, base_args)
    if diff:
        name, b, a = diff
        raise ValueError(f"{config_path(expert_dir)}: {name}={b!r}, but the base {base_dir} has {name}={a!r}; "
                         f"aligned models must have the base's architecture (and be dense, n_experts=0)")


# ----------------------------------------------------------------------------------------------------
# 3. Lazy checkpoints: read only the rows a rank needs


class CheckpointRows:
    """A Meta-format checkpoint, memory-mapped: rows(name, start, stop) = full_tensor[start:stop] (dim 0),
    assembled from the model-parallel shards without reading (or paging in) any other row. (A HF directory is
    converted in memory first, hf_checkpoint.read_hf_checkpoint: its wq/wk and experts are copies, the rest mapped.)
    Call close() to drop the mappings, so the pages read stop counting towards the process's memory."""

    def __init__(self, ckpt_dir: str):
        self.dir, self.args = ckpt_dir, read_checkpoint_args(ckpt_dir)
        if is_hf_dir(ckpt_dir):  # a HF directory, converted in memory: one "shard" holding every tensor
            self.paths, self.shards = [ckpt_dir], [read_hf_checkpoint(ckpt_dir)[1]]
        else:
            self.paths = shard_paths(ckpt_dir)
            self.shards = [load_shard(p) for p in self.paths]
        for shard in self.shards:
            shard.pop("rope.freqs", None)  # Meta's precomputed rotary table; we compute it on the fly
        keys = set(self.shards[0])
        for path, shard in zip(self.paths[1:], self.shards[1:]):
            if set(shard) != keys:
                raise ValueError(f"{path}: keys differ from {self.paths[0]}: {sorted(set(shard) ^ keys)[:5]}")
        self.shapes = {}
        for name in keys:
            parts = [s[name].shape for s in self.shards]
            shape, dim = list(parts[0]), shard_dim(name, len(parts[0]))
            if dim is not None:
                shape[dim] = sum(p[dim] for p in parts)
            self.shapes[name] = torch.Size(shape)
        check_state_shapes(self.shapes, meta_model(self.args).state_dict(), ckpt_dir)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        parts = [s[name] for s in self.shards]
        dim = shard_dim(name, parts[0].dim())
        if dim is None or len(parts) == 1:
            return parts[0][start:stop]
        if dim != 0:  # split along columns: every shard holds a piece of each row
            return torch.cat([p[start:stop] for p in parts], dim=dim)
        out, offset = [], 0  # split along rows: take the overlap of [start, stop) with each shard's rows
        for p in parts:
            lo, hi = max(start, offset), min(stop, offset + p.shape[0])
            if lo < hi:
                out.append(p[lo - offset : hi - offset])
            offset += p.shape[0]
        return torch.cat(out) if out else parts[0][:0]

    def close(self):
        self.shards = None


# ----------------------------------------------------------------------------------------------------
# 4. The fused tensors: where each row comes from (the equation in the docstring)


@torch.no_grad()
def fill_from_base(model, base: CheckpointRows):
    """Every parameter but the stacked experts and the routers := the base's tensor (this rank's rows)."""
    # --- exercise 6: begin ---
    for name, param in model.named_parameters():
        if not is_from_base(name):
            continue  # filled expert by expert (fill_from_expert), by fill_routers; LoRA deltas by init_lora
        local, start, stop = local_rows(param)
        local.copy_(base.rows(name, start, stop))
    # --- exercise 6: end ---


@torch.no_grad()
def fill_routers(model, routers: list):
    """Each layer's router W_g[l] [E, dim] := routers[l] (this rank's rows)."""
    for name, param in model.named_parameters():
        if name.endswith("router.weight"):
            local, start, stop = local_rows(param)
            local.copy_(routers[int(name.split(".")[1])][start:stop])  # [rows, dim]


@torch.no_grad()
def fill_from_expert(model, e: int, expert: CheckpointRows):
    """Expert e of every stacked matrix, W1[l][e], W2[l][e], W3[l][e] := aligned model e's FeedForward matrices
    (this rank's rows of them)."""
    # --- exercise 6: begin ---
    for name, param in model.named_parameters():
        *prefix, matrix = name.split(".")
        if matrix not in EXPERT_MATRICES:
            continue
        local, start, stop = local_rows(param)  # local [E, stop - start, ...]
        aligned_name = ".".join(prefix) + f".{matrix}.weight"  # layers.l.feed_forward.w1.weight
        local[e].copy_(expert.rows(aligned_name, start, stop))
    # --- exercise 6: end ---


@torch.no_grad()
def non_ffn_difference(model, expert: CheckpointRows) -> tuple:
    """(max |expert - base| over the non-FFN weights, its key), on this rank's rows; the fused model's non-FFN
    weights already hold the base's (fill_from_base)."""
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


def router_weight(router_init, layer, n_experts, dim, dtype, std, seed):
    """A [E, dim] router matrix: zeros, or N(0, std) drawn from a generator seeded by (seed, layer)."""
    if router_init == "random":
        gen = torch.Generator().manual_seed(seed * 1000003 + layer)
        return (torch.randn(n_experts, dim, generator=gen) * std).to(dtype)  # [E, D]
    return torch.zeros(n_experts, dim, dtype=dtype)  # [E, D] ("zero", and placeholder for "hidden")


# ----------------------------------------------------------------------------------------------------
# 5. Router initialisation from the base model's hidden states


@torch.no_grad()
def ffn_inputs_by_layer(model, tokenizer, prompts, max_len=None) -> list:
    """Run the base model (here: the fused model with every token forced to expert 0 = the base's FFN) on prompts
    and return, per layer, the FFN inputs (ffn_norm outputs) of all real tokens: list over layers of [n_tokens, D]
    float32. Temporary forward pre-hooks catch the inputs (under FSDP every rank runs the same prompts)."""
    captured = [[] for _ in model.layers]
    handles = [layer.feed_forward.register_forward_pre_hook(lambda mod, inp, i=i: captured[i].append(inp[0]))
               for i, layer in enumerate(model.layers)]
    device = next(model.parameters()).device
    max_len = max_len or model.params.max_seq_len
    try:
        for text in prompts:  # one prompt at a time: no padding to exclude
            tokens = tokenizer.encode(text, bos=True, eos=False)[:max_len]
            model(torch.tensor([tokens], device=device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs]) for xs in captured]  # L x [n, D]


def hidden_router_rows(model, tokenizer, init_prompts) -> list:
    """Router init "hidden" (mergekit's idea, an extra: not in the paper): in each layer, router row i = the mean direction of the
    normalised FFN inputs that dimension i's prompts produce in the base model, scaled by 1 / (mean input
    norm) so that the initial logits are about cos(x, direction_i) in [-1, 1]. A token that looks like
    dimension i's prompts then scores highest for expert i. Returns per layer a [E, D] float32 tensor.
    """
    # --- exercise 7: begin ---
    per_expert = [ffn_inputs_by_layer(model, tokenizer, prompts) for prompts in init_prompts]  # E x L x [n, D]
    rows = []
    for layer in range(len(model.layers)):
        xs = [inputs[layer] for inputs in per_expert]  # E x [n_i, D]
        mean_norm = torch.cat([x.norm(dim=-1) for x in xs]).mean()  # typical |x| at this layer
        directions = torch.stack([F.normalize(x, dim=-1).mean(0) for x in xs])  # [E, D]
        rows.append(F.normalize(directions, dim=-1) / mean_norm)  # [E, D]
    return rows
    # --- exercise 7: end ---


def router_init_prompts(records: list, n_experts: int, per_task: int = 32) -> list:
    """A few formatted prompts per dimension, for router_init='hidden'."""
    prompts = [[] for _ in range(n_experts)]
    for r in records:
        if 0 <= r["task"] < n_experts and len(prompts[r["task"]]) < per_task:
            prompts[r["task"]].append(format_prompt(r["instruction"], r.get("input", "")))
    return prompts


# ----------------------------------------------------------------------------------------------------
# 6. Building the fused model (memory-lean, FSDP-ready)


def empty_model(args, dtype, device, shard=None, seed=0):
    """A Transformer whose parameters exist only on this rank's share: built on the meta device (no memory),
    sharded by `shard` (e.g. distributed.shard_model under torchrun), then given uninitialised storage."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    if shard is not None:
        model = shard(model)  # (fuse.py --lora-rank: adds the LoRA deltas first, lora.add_lora)
    model = model.to_empty(device=device)
    init_lora(model, seed)  # A random, B = 0 (a no-op without deltas): the router init below sees the fused model exactly
    return model


def release_freed_host_memory():
    """glibc keeps freed heap memory for reuse (under FSDP on CPU: the all-gather buffers of a forward, ~4 layers'
    worth); hand it back to the OS, so that it does not add to the peak while the experts are read. Does nothing
    without glibc; on GPUs those buffers were GPU memory anyway."""
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


def build_fused_model(base_dir, expert_dirs, top_k=2, router_init="zero", init_prompts=None, tokenizer=None,
                      device="cpu", dtype=None, router_std=0.02, seed=0, verbose=True, max_non_ffn_diff=None,
                      shard=None):
    """H3Fusion's fusion step: base model + N aligned models (FFN-only fine-tunes) -> one MoE model.

    base_dir, expert_dirs: Meta-format checkpoint directories; expert i of every layer = the FeedForward of
        expert_dirs[i] (order = the order given, e.g. helpful, harmless, honest).
    Every non-FFN tensor of each aligned model is compared with the base's: a different config is refused; the
    max |difference| of the values is reported (0 when stage 1 froze them as it should; the fused model always
    takes the base's). max_non_ffn_diff: refuse an expert whose difference is larger (fuse.py passes 0: an
    expert trained from another base is not an H3Fusion expert).
    router_init: "zero"   -> uniform routing (ties: experts 0 .. k-1 win until the router learns),
                 "random" -> N(0, router_std) with torch seed `seed`,
                 "hidden" -> hidden_router_rows() (an extra, mergekit's idea): needs init_prompts = one list of strings per expert
                             (tokenizer: a data.tokenizer.Tokenizer; default base_dir/tokenizer.model).
    dtype: the parameters' dtype (None: the base checkpoint's). shard(model) -> model: applied on the meta
        device before any weight is read (distributed.shard_model: FSDP2), so each rank reads only its rows.
    Returns (model.Transformer with n_experts = N, ModelArgs); save it with model.save_checkpoint.
    """
    expert_dirs = list(expert_dirs)
    for d in [base_dir] + expert_dirs:
        if not os.path.isdir(d):
            raise FileNotFoundError(f"build_fused_model: checkpoint directory {d} not found")
    if not expert_dirs:
        raise ValueError("build_fused_model: expert_dirs is empty; expected one aligned checkpoint per expert")
    n_experts = len(expert_dirs)  # (top_k is checked where it is used: moe.MoE)
    if router_init not in ROUTER_INITS:
        raise ValueError(f"build_fused_model: router_init={router_init!r}; expected one of {ROUTER_INITS}")
    if router_init == "hidden" and (init_prompts is None or len(init_prompts) != n_experts
                                    or any(len(p) == 0 for p in init_prompts)):
        raise ValueError(f"build_fused_model: router_init='hidden' needs init_prompts = {n_experts} non-empty "
                         f"lists of prompts (one per expert), got {init_prompts!r:.200}")
    base = CheckpointRows(base_dir)
    if base.args.n_experts != 0:
        raise ValueError(f"{base_dir}/params.json: n_experts={base.args.n_experts}; the base must be a dense model")
    for d in expert_dirs:
        _check_args(base.args, read_checkpoint_args(d), base_dir, d)
    dtype = dtype or base.shards[0]["norm.weight"].dtype
    args = replace(base.args, n_experts=n_experts, top_k=top_k)

    fused = empty_model(args, dtype, device, shard, seed)
    fill_from_base(fused, base)
    routers = [router_weight(router_init, i, n_experts, args.dim, dtype, router_std, seed) for i in range(args.n_layers)]
    if router_init == "hidden":  # the fused model with expert 0 := the base's FFN, all tokens sent to it, IS the base
        fill_from_expert(fused, 0, base)
        base.close()  # (its pages leave this process's memory before the forward gathers layers)
        set_forced_expert(fused, 0)
        rows = hidden_router_rows(fused, tokenizer or Tokenizer(os.path.join(base_dir, "tokenizer.model")),
                                  init_prompts)  # L x [E, D]
        set_forced_expert(fused, None)
        routers = [r.to("cpu", dtype) for r in rows]
        release_freed_host_memory()
    fill_routers(fused, routers)
    base.close()  # expert 0's slot (if it held the base's FFN) is overwritten next
    for e, expert_dir in enumerate(expert_dirs):  # one aligned checkpoint mapped at a time
        expert = CheckpointRows(expert_dir)
        local_diff, key = non_ffn_difference(fused, expert)
        expert.close()  # mapped again for the FFN rows: the pages of only one of the two reads count at a time
        expert = CheckpointRows(expert_dir)
        fill_from_expert(fused, e, expert)
        expert.close()
        max_diff = _max_over_ranks(local_diff)
        key = key if local_diff == max_diff else "on another rank"
        if max_non_ffn_diff is not None and max_diff > max_non_ffn_diff:
            raise ValueError(f"{expert_dir}: its non-FFN weights differ from the base's ({base_dir}) by up to "
                             f"{max_diff:.3g} ({key}); an H3Fusion expert is an FFN-only fine-tune of the base "
                             f"(stage 1 freezes everything else), this looks like a model trained from another base")
        if verbose:
            print(f"build_fused_model: {expert_dir}: max |non-FFN - base| = {max_diff:.3g}"
                  + (f" ({key})" if max_diff else "")
                  + (" -- NOT an FFN-only fine-tune of this base; fused anyway, with the base's weights"
                     if max_diff else ""))
    return fused, args
