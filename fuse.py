"""Stage 2 of H3Fusion: fuse three aligned models into one top-k MoE and train it with

        L = L_CE + lambda * L_G + L_R(gamma)                                   (the paper's Eq. for L)

    torchrun --nproc_per_node=2 fuse.py --gamma 0.1,0.3,0.1     # FSDP over 2 ranks (gloo on CPU)
    python fuse.py --gamma 0.1,0.3,0.1 --lambda-gate 1          # one process

Where each piece lives:
    fused model (experts = aligned FFNs, new router)   upcycle.build_fused_model
    L_CE  next-token loss on response tokens          losses.lm_loss
    L_G   gating loss: -log p̄_b[y_b], p̄ = router probs averaged over tokens and layers   losses.gating_loss
    L_R   drift loss: sum_i gamma_i sum_W ||W - W_i^0||_F / n_layers   losses.drift_loss (--reg drift)
          or the "decay" reading sum_i gamma_i sum_W ||W||_F / n_layers  losses.drift_loss (--reg decay, an extra)
    the objective L on one micro-batch, with its normalisers            h3fusion_objective (first below)
    the loop (AdamW, schedule, FSDP, checkpoints, resume)               trainer.train
    the flags' checks, one per input, before any compute                cli.py (check_gamma, check_top_k, ...)
    --lora-rank r (the authors' setting): experts frozen, a delta (alpha/r) B A per expert and matrix   lora.py

Extras, not in the paper (each says so in --help): --router-init hidden (mergekit's idea; the default here,
see the README), random; --balance-coef and --z-coef (Switch / ST-MoE auxiliary losses, off by default);
--reg decay; --trainable router; --allow-foreign-experts; and the mixture --data pooled, which repeats the
smaller datasets to give each dimension equal weight (data.records.balance_by_task; the paper fine-tunes on the
mixture of the three datasets and says nothing of balancing them).

Nothing else is in the loss: AdamW's weight decay is 0 here (--weight-decay sets it), since decay would pull
router and experts toward zero against L_R's pull toward W^0.

The order of --experts is the order of --gamma and of the task labels: expert i is the model aligned on
dimension i (0 helpful, 1 harmless, 2 honest), so the gating loss teaches the router to send an example
of dimension i to expert i. Attention, embeddings, norms and the output head are always frozen.
"""
import argparse
import os
from functools import partial

import torch

from checks import check_drift_inputs
from engineering.cli import (add_data_args, add_lora_args, add_train_args, check_balance_coef, check_frozen_experts_gamma,
                 check_fuse_checkpoints, check_gamma, check_held_out, check_lora, check_loss_weights, check_reg,
                 check_top_k, parse_list, run_cli)
from data import TASK_NAMES
from data import streams as S
from engineering.distributed import setup_distributed, shard_model
from evaluation.routing import routing_metrics
from engineering.lora import add_lora
from losses import drift_loss, gating_loss, lm_loss, load_balance_loss, router_z_loss
from data.tokenizer import Tokenizer
from engineering.checkpoints import recover_checkpoint
from moe import moe_layers, snapshot_expert_weights
from engineering.rundir import check_run_dir, start_run_dir
from trainer import StepCounts, compute_dtype, config_from_args, seed_everything, train
from upcycle import build_fused_model, router_init_prompts

RUN_DIR = "runs/toy"
DEFAULT_EXPERTS = ",".join(f"{RUN_DIR}/{name}" for name in TASK_NAMES)

# ----------------------------------------------------------------------------------------------------
# 1. The objective


def h3fusion_objective(model, batch, counts: StepCounts, lam: float, gamma: list, reg: str, initial_experts: dict,
                       balance_coef: float = 0.0, z_coef: float = 0.0):
    """The H3Fusion objective (the paper's equation for L) on this rank's part of one micro-batch:

        L = L_CE + lambda * L_G + L_R(gamma)     (+ the optional extras of router_extras, off by default)

    scaled with the step's counts (trainer.StepCounts) so that the gradients summed over the step's micro-batches,
    and averaged over ranks by FSDP, are the gradient of L on the whole step's batch:
        L_CE  summed over this micro-batch's target tokens / counts.n_targets (the step's target tokens, per rank)
        L_G   summed over its examples / counts.n_examples (the step's examples, per rank)
        L_R   a function of the weights alone, the same on every rank and micro-batch: / counts.n_micro, so that
              the step adds it once (skipped, and not logged, when every gamma_i is 0)
    Returns (loss, metrics): each term as it enters L (before its weight) and the routing metrics, scaled alike,
    so that the trainer's sums over the step's micro-batches are the step's values."""
    logits = model(batch["tokens"])  # [B, T, V]
    router_probs = [m.router_probs for m in moe_layers(model)]  # L x [B, T, E]
    l_ce = lm_loss(logits, batch["targets"], normalizer=counts.n_targets)
    l_gate = gating_loss(router_probs, batch["mask"], batch["task"], normalizer=counts.n_examples)
    l_reg = drift_loss(model, initial_experts, gamma, kind=reg) if any(gamma) else 0.0
    loss = l_ce + lam * l_gate + l_reg / counts.n_micro
    terms = {"lm": l_ce, "gate": l_gate} | ({"reg": l_reg / counts.n_micro} if any(gamma) else {})
    l_extra, extra_terms = router_extras(model, batch, counts, balance_coef, z_coef)
    metrics = {k: v.detach() for k, v in (terms | extra_terms).items()}
    return loss + l_extra, metrics | routing_metrics(model, batch, counts.n_examples)


def router_extras(model, batch, counts: StepCounts, balance_coef: float, z_coef: float):
    """Extras from the MoE literature, not in H3Fusion (off at coefficient 0, the default): balance_coef * Switch's
    load-balancing loss + z_coef * ST-MoE's router z-loss, each a mean over this rank's micro-batch weighted by
    its share of the step's examples. Returns (weighted sum, {"balance": ..., "z": ...} for the terms in use)."""
    layers, share = moe_layers(model), len(batch["task"]) / counts.n_examples
    loss, terms = 0.0, {}
    if balance_coef:
        terms["balance"] = load_balance_loss([m.router_probs for m in layers], [m.expert_idx for m in layers],
                                             batch["mask"]) * share
        loss = loss + balance_coef * terms["balance"]
    if z_coef:
        terms["z"] = router_z_loss([m.router_logits for m in layers], batch["mask"]) * share
        loss = loss + z_coef * terms["z"]
    return loss, terms


# ----------------------------------------------------------------------------------------------------
# 2. The run


def set_trainable(model, trainable: str):
    """Router always; expert weights with router+experts (the paper's; --trainable router, an extra, freezes
    them); attention, embeddings, norms, output never."""
    for name, p in model.named_parameters():
        is_router = name.endswith("feed_forward.router.weight")
        is_expert = ".feed_forward.w" in name
        p.requires_grad = is_router or (trainable == "router+experts" and is_expert)
    return model


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
    records, stream, val = S.instruction_data(args.data, args.data_dir, tokenizer, args.seq_len, args.batch_size,
                                              args.seed, d, path=args.data_path, task=args.task)
    check_held_out(args.eval_every, val, args.data)

    def shard(model):  # on the meta device, before any weight is read: each rank then reads only its share
        param_dtype = torch.bfloat16 if d.device.type == "cuda" else None
        model = set_trainable(model, args.trainable)  # LoRA: the experts freeze, a delta per expert and matrix trains
        return shard_model(add_lora(model, args.lora_rank, args.lora_alpha) if args.lora_rank else model, d,
                           param_dtype)

    weights_dtype = compute_dtype(d) if args.lora_rank else torch.float32  # LoRA: frozen weights never in float32
    model, margs = build_fused_model(args.base, args.expert_dirs, top_k=args.top_k, router_init=args.router_init,
                                     init_prompts=router_init_prompts(records, len(args.expert_dirs)),
                                     tokenizer=tokenizer, device=d.device, dtype=weights_dtype, seed=args.seed,
                                     verbose=d.is_main, shard=shard,
                                     max_non_ffn_diff=None if args.allow_foreign_experts else 0.0)
    start_run_dir(train_dir, vars(args), args.resume, args.overwrite, d)  # inputs are good: now write
    initial_experts = {} if args.lora_rank else snapshot_expert_weights(model)  # W_i^0 of L_R (LoRA: the frozen W)
    check_drift_inputs(model, initial_experts, args.gamma_values, args.reg)  # what drift_loss trusts, once
    if d.is_main:
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = f", LoRA r={args.lora_rank} alpha={args.lora_alpha:g}" if args.lora_rank else ""
        print(f"{args.out}: {margs.n_experts} experts, top-{margs.top_k}, {n_train / 1e6:.2f} M trainable "
              f"({args.trainable}{lora}), lambda={args.lambda_gate}, gamma={args.gamma_values} ({args.reg}), "
              f"world_size={d.world_size}")

    loss_fn = partial(h3fusion_objective, lam=args.lambda_gate, gamma=args.gamma_values, reg=args.reg,
                      initial_experts=initial_experts, balance_coef=args.balance_coef, z_coef=args.z_coef)
    train(model, stream, loss_fn, cfg, d, args.out, train_dir, tokenizer_path, resume=args.resume,
          val_batches=val, seq_len=args.seq_len)


# ----------------------------------------------------------------------------------------------------
# 3. The command line (its checks are cli.py's)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=f"{RUN_DIR}/base", help="base checkpoint (non-FFN weights come from it)")
    p.add_argument("--experts", default=DEFAULT_EXPERTS, help="aligned checkpoints, comma-separated, in task order")
    p.add_argument("--data", default="pooled", help="training mixture: pooled (the synthetic world's three sets "
                   "balanced to equal weight per dimension, an extra: the paper just mixes the three datasets), a "
                   "dataset name or a file")
    p.add_argument("--data-dir", default=f"{RUN_DIR}/data")
    p.add_argument("--out", default=f"{RUN_DIR}/fused")
    add_data_args(p)
    p.add_argument("--gamma", default="0.1,0.1,0.1", help="L_R weight per expert, e.g. 0.1,0.3,0.1")
    p.add_argument("--lambda-gate", type=float, default=6.0, help="lambda, the weight of L_G (0 = no gating loss)")
    p.add_argument("--reg", default="drift", choices=["drift", "decay"],
                   help="L_R: distance to W^0 (the paper's), or ||W|| (decay: an extra, the seed's other reading)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--router-init", default="hidden", choices=["zero", "random", "hidden"],
                   help="the new router's start: zero (uniform routing) or random N(0, 0.02); hidden (the default, "
                        "an extra: mergekit's idea) = each dimension's mean FFN input in the base model")
    p.add_argument("--trainable", default="router+experts", choices=["router", "router+experts"],
                   help="router+experts (the paper's); router (an extra: experts frozen, needs --gamma 0,0,0)")
    p.add_argument("--allow-foreign-experts", action="store_true",
                   help="an extra, not H3Fusion: fuse experts whose non-FFN weights or tokenizer differ from the "
                        "base's (the fused model takes attention, embeddings and norms from the base; loudly reported)")
    p.add_argument("--balance-coef", type=float, default=0.0,
                   help="Switch load-balancing loss weight (an extra, not in the paper; 0 = off)")
    p.add_argument("--z-coef", type=float, default=0.0, help="router z-loss weight (an extra, not in the paper; 0 = off)")
    add_lora_args(p, "each expert's matrices (one pair per expert and matrix; the router trains in full)")
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
