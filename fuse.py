"""Stage 2 of H3Fusion: fuse three aligned models into one top-k MoE and train it with

        L = L_CE + lambda * L_G + L_R(gamma)                          (the paper's equation for L)

    python fuse.py --gamma 0.1,0.3,0.1                            # one process
    torchrun --nproc_per_node=2 fuse.py --gamma 0.1,0.3,0.1       # FSDP2 over 2 ranks (gloo on CPU)

The method is fusion.py's: fuse_state_dicts (expert i := aligned model i's FFN, a new router per
layer), the router's initialisation, and h3fusion_objective (L on one micro-batch; L_CE, L_G and L_R
are losses.py's lm_loss, gating_loss and drift_loss). This file is the run:
  1. fuse_in_memory  the fused model as a student reads it: every checkpoint loaded whole (each
                     file checked first, engineering/checkpoints.py), fusion.fuse_state_dicts,
                     done. What one process runs. Under torchrun (or --lean-build),
                     engineering/lean_fusion.py builds the same tensors, bit for bit, each rank
                     reading only its own rows of the files.
  2. main            the flags (checked before any compute), the model, the loop (trainer.train),
                     then a few lines (rank 0; evaluation/summary.py): where the model went, each
                     expert's drift and whether L_R held it, routing per example, the next command
  3. the flags       their checks are engineering/cli.py's

The order of --experts is the order of --gamma and of the task labels: expert i is the model
aligned on dimension i (0 helpful, 1 harmless, 2 honest), so the gating loss teaches the router to
send an example of dimension i to expert i. Attention, embeddings, norms and the output head are
always frozen, and AdamW's weight decay is 0 here (--weight-decay sets it): decay would pull router
and experts toward zero, against L_R's pull toward W^0.

Extras, not in the paper (each says so in --help): --router-init hidden (mergekit's idea; the
default here, see docs/defaults.md) or random; --balance-coef and --z-coef (Switch / ST-MoE
auxiliary losses, off by default); --reg decay; --trainable router; --allow-foreign-experts; and the
mixture --data pooled, which repeats the smaller datasets to give each dimension equal weight
(data.records.balance_by_task). --lora-rank r (the authors' setting): the experts frozen, a delta
(alpha/r) B A per expert and matrix trains (engineering/lora.py).
"""
import argparse
import os
from dataclasses import replace
from functools import partial

import torch

from data import TASK_NAMES
from data import streams as S
from data.tokenizer import Tokenizer
from engineering.checkpoints import (check_fusion_inputs, check_non_ffn_difference, load_checkpoint,
                                     recover_checkpoint)
from engineering.cli import (add_data_args, add_lora_args, add_train_args, check_balance_coef,
                             check_drift_inputs, check_frozen_experts_gamma, check_fuse_checkpoints,
                             check_gamma, check_held_out, check_lora, check_loss_weights, check_reg,
                             check_top_k, config_from_args, parse_list, run_cli)
from engineering.distributed import setup_distributed, shard_model
from engineering.lean_fusion import build_fused_model
from engineering.lora import add_lora, init_lora, lora_drift_loss
from engineering.rundir import Run, check_run_dir, start_run_dir
from evaluation.summary import fusion_summary, print_summary
from fusion import (fuse_state_dicts, h3fusion_objective, hidden_router_rows, is_ffn_key,
                    router_init_prompts, router_weight, set_trainable)
from losses import drift_loss
from model import model_from_state
from moe import snapshot_expert_weights
from trainer import compute_dtype, seed_everything, train

RUN_DIR = "runs/toy"
DEFAULT_EXPERTS = ",".join(f"{RUN_DIR}/{name}" for name in TASK_NAMES)

# --------------------------------------------------------------------------------------------------
# 1. The fused model, in memory


def fuse_in_memory(base_dir, expert_dirs, top_k=2, router_init="zero", init_prompts=None,
                   tokenizer=None, dtype=None, router_std=0.02, seed=0, verbose=True,
                   max_non_ffn_diff=None):
    """Base model + N aligned models (FFN-only fine-tunes) -> one MoE: (Transformer, ModelArgs).

    Every checkpoint is loaded whole (memory-mapped; `dtype`: the parameters' dtype, None = the
    base's), the aligned models' FFNs become the experts in the order given, and each layer gets a
    new router: "zero" (uniform routing), "random" (N(0, router_std), seeded by `seed`) or "hidden"
    (the base model's mean FFN input per dimension over init_prompts, one list of prompts per
    expert; an extra). Each aligned model's non-FFN weights are compared with the base's and
    reported (verbose); above max_non_ffn_diff (fuse.py: 0) it came from another base: refused."""
    base_args = check_fusion_inputs(base_dir, expert_dirs, router_init, init_prompts)
    base, _ = load_checkpoint(base_dir, dtype=dtype)
    base_state, dtype = base.state_dict(), base.norm.weight.dtype
    aligned = []
    for expert_dir in expert_dirs:
        state = load_checkpoint(expert_dir, dtype=dtype)[0].state_dict()
        max_diff, key = max_non_ffn_difference(base_state, state)
        check_non_ffn_difference(expert_dir, base_dir, max_diff, key, max_non_ffn_diff, verbose)
        aligned.append(state)
    args = replace(base_args, n_experts=len(expert_dirs), top_k=top_k)
    if router_init == "hidden":  # run the base model itself on each dimension's prompts
        tokenizer = tokenizer or Tokenizer(os.path.join(base_dir, "tokenizer.model"))
        routers = [rows.to(dtype)
                   for rows in hidden_router_rows(base, tokenizer, init_prompts)]  # L x [E, D]
    else:
        routers = [router_weight(router_init, layer, args.n_experts, args.dim,
                                 dtype, router_std, seed)
                   for layer in range(args.n_layers)]
    return model_from_state(args, fuse_state_dicts(base_state, aligned, routers)), args


def max_non_ffn_difference(base: dict, aligned: dict) -> tuple:
    """(max |aligned - base| over the non-FFN weights, the first tensor reaching it, or None)."""
    max_diff, max_key = 0.0, None
    for name, t in base.items():
        if not is_ffn_key(name) and t.numel():
            diff = (aligned[name].float() - t.float()).abs().max().item()
            if diff > max_diff:
                max_diff, max_key = diff, name
    return max_diff, max_key


# --------------------------------------------------------------------------------------------------
# 2. The run


def main(argv=None):
    args = parse_args(argv)
    for ckpt in [args.base] + args.expert_dirs:
        recover_checkpoint(ckpt)  # a save_checkpoint that a kill stopped half-way
    check_fuse_checkpoints(args, RUN_DIR)
    cfg = config_from_args(args)  # every flag checked before torchrun's process group starts
    d = setup_distributed(args.device)
    train_dir = check_run_dir(args.out, vars(args), args.resume, args.overwrite, d)
    seed_everything(args.seed)

    tokenizer_path = os.path.join(args.base, "tokenizer.model")
    tokenizer = Tokenizer(tokenizer_path)
    records, stream, val = S.instruction_data(args.data, args.data_dir, tokenizer, args.seq_len,
                                              args.batch_size, args.seed, d, path=args.data_path,
                                              task=args.task)
    check_held_out(args.eval_every, val, args.data)

    def prepare(model):  # what trains (LoRA: a delta per expert and matrix); FSDP2 under torchrun
        model = set_trainable(model, args.trainable)
        model = add_lora(model, args.lora_rank, args.lora_alpha) if args.lora_rank else model
        return shard_model(model, d, torch.bfloat16 if d.device.type == "cuda" else None)

    build = dict(top_k=args.top_k, router_init=args.router_init, tokenizer=tokenizer,
                 seed=args.seed, init_prompts=router_init_prompts(records, len(args.expert_dirs)),
                 verbose=d.is_main,
                 dtype=compute_dtype(d.device) if args.lora_rank else torch.float32,  # LoRA: bf16
                 max_non_ffn_diff=None if args.allow_foreign_experts else 0.0)
    if d.world_size > 1 or args.lean_build:
        # prepared on the meta device, then each rank reads only its share of the checkpoints
        model, margs = build_fused_model(args.base, args.expert_dirs, device=d.device,
                                         shard=prepare, **build)
    else:
        model, margs = fuse_in_memory(args.base, args.expert_dirs, **build)
        model = prepare(model).to(d.device)
        init_lora(model, args.seed)  # (LoRA: A random, B = 0; without deltas it does nothing)
    start_run_dir(train_dir, vars(args), args.resume, args.overwrite, d)  # inputs good: now write
    # W_i^0, a copy of each expert's weights (LoRA: none, the frozen W is W^0)
    initial_experts = {} if args.lora_rank else snapshot_expert_weights(model)
    # what drift_loss trusts: gamma per expert, and W^0 of each expert matrix's shape
    check_drift_inputs(model, initial_experts, args.gamma_values, args.reg)
    if d.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = f", LoRA r={args.lora_rank} alpha={args.lora_alpha:g}" if args.lora_rank else ""
        print(f"{args.out}: {margs.n_experts} experts, top-{margs.top_k}, "
              f"{n_train / 1e6:.2f} M trainable ({args.trainable}{lora}), "
              f"lambda={args.lambda_gate}, gamma={args.gamma_values} ({args.reg}), "
              f"world_size={d.world_size}")

    drift = lora_drift_loss if args.lora_rank else drift_loss  # L_R (LoRA: read from the deltas)
    loss_fn = partial(h3fusion_objective, lam=args.lambda_gate, gamma=args.gamma_values,
                      reg=args.reg, initial_experts=initial_experts, balance_coef=args.balance_coef,
                      z_coef=args.z_coef, drift=drift)
    run = Run(d, args.out, train_dir, tokenizer_path, cfg.steps, cfg.log_every, resume=args.resume)
    train(model, stream, loss_fn, cfg, run, val_batches=val, seq_len=args.seq_len)
    # where the model went, what gamma did to each expert, routing per example, the next command
    held_out = S.held_out_examples(args.data, args.data_dir, tokenizer, args.seq_len)
    print_summary(fusion_summary(model, initial_experts, held_out, args, cfg, d, drift), d)


# --------------------------------------------------------------------------------------------------
# 3. The command line (its checks are engineering/cli.py's)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=f"{RUN_DIR}/base",
                   help="base checkpoint (non-FFN weights come from it)")
    p.add_argument("--experts", default=DEFAULT_EXPERTS,
                   help="aligned checkpoints, comma-separated, in task order")
    p.add_argument("--data", default="pooled",
                   help="training mixture: pooled (the synthetic world's three sets balanced to "
                        "equal weight per dimension, an extra: the paper just mixes the three "
                        "datasets), a dataset name or a file")
    p.add_argument("--data-dir", default=f"{RUN_DIR}/data")
    p.add_argument("--out", default=f"{RUN_DIR}/fused")
    add_data_args(p)
    p.add_argument("--gamma", default="0.1,0.1,0.1", help="L_R weight per expert, e.g. 0.1,0.3,0.1")
    p.add_argument("--lambda-gate", type=float, default=6.0,
                   help="lambda, the weight of L_G (0 = no gating loss)")
    p.add_argument("--reg", default="drift", choices=["drift", "decay"],
                   help="L_R: distance to W^0 (the paper's), or ||W|| (decay: an extra, the "
                        "seed's other reading)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router-init", default="hidden", choices=["zero", "random", "hidden"],
                   help="the new router's start: zero (uniform routing) or random N(0, 0.02); "
                        "hidden (the default, an extra: mergekit's idea) = each dimension's mean "
                        "FFN input in the base")
    p.add_argument("--trainable", default="router+experts", choices=["router", "router+experts"],
                   help="router+experts (the paper's); router (an extra: experts frozen, needs "
                        "--gamma 0,0,0)")
    p.add_argument("--allow-foreign-experts", action="store_true",
                   help="an extra, not H3Fusion: fuse experts whose non-FFN weights or tokenizer "
                        "differ from the base's (the fused model takes attention, embeddings and "
                        "norms from the base; loudly reported)")
    p.add_argument("--balance-coef", type=float, default=0.0,
                   help="Switch load-balancing loss weight (an extra, not in the paper; 0 = off)")
    p.add_argument("--z-coef", type=float, default=0.0,
                   help="router z-loss weight (an extra, not in the paper; 0 = off)")
    p.add_argument("--lean-build", action="store_true",
                   help="build the fused model reading only each rank's rows of the checkpoints "
                        "(engineering/lean_fusion.py; always under torchrun): the same tensors as "
                        "the in-memory build, in a fraction of the host memory "
                        "(bench/bench_fuse_memory.py)")
    add_lora_args(p, "each expert's matrices (one pair per expert and matrix; the router trains "
                     "in full)")
    add_train_args(p, steps=300, batch_size=16, lr=2e-3, warmup=10, seq_len=128, weight_decay=0.0)
    args = p.parse_args(argv)
    args.expert_dirs = [e for e in args.experts.split(",") if e.strip()]
    args.gamma_values = parse_list(args.gamma, "gamma")
    n = len(args.expert_dirs)
    check_gamma(p, args, n)
    check_top_k(p, args, n)
    check_frozen_experts_gamma(p, args, n)
    check_loss_weights(p, args)
    check_reg(p, args)
    check_balance_coef(p, args, n)
    check_lora(p, args, full_training="--trainable router" if args.trainable == "router" else None)
    return args


if __name__ == "__main__":
    run_cli(main, "fuse.py")
