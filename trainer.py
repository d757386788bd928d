"""The handwritten training loop shared by train_expert.py (stages 0 and 1) and fuse.py (stage 2).

Read top to bottom:
  1. train()               the loop: accumulate, clip, step, log, evaluate, save; stop on NaN (checks.check_finite)
  2. Optimiser, schedule   AdamW (decay on >=2-D weights only), linear warmup + cosine decay
  3. FLOPs and MFU         model FLOPs/s over the matmul peak in the dtype the matmuls run in (bf16 on CUDA,
                           float32 on CPU), measured at start-up or given (--peak-tflops); always in (0, 1]
  4. Set-up                seed_everything; config_from_args (the flags, checked by cli.check_train_args)
What a step reads -- deterministic example streams, each rank its slice of the global batch -- is data/streams.py;
one process or FSDP2 over torchrun's ranks is distributed.py; the run directory OUT/ + OUT.train/ (Meta-format
model, run.json, log.jsonl, resumable state) is runstate.py; the flags are cli.py.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from checks import check_batch_divides, check_finite, check_trainable
from engineering.cli import check_train_args
from data.format import IGNORE_INDEX
from engineering.distributed import Dist, all_reduce_sum, autocast_context
from engineering.rundir import load_train_state, nest, save_model, save_train_state, start_log

# ----------------------------------------------------------------------------------------------------
# 1. The loop


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 16  # global: examples per micro-step summed over ranks
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    save_every: int = 0  # 0 = only at the end
    seed: int = 0
    peak_flops: float = 0.0  # FLOP/s per device for MFU; 0 = measure at start-up
    compile: bool = False  # torch.compile every transformer block (after FSDP's fully_shard under torchrun)


@dataclass(frozen=True)
class StepCounts:
    """What a loss function needs to scale its part of one optimiser step; train() passes one with every batch.

    A rank's loss on one micro-batch must be scaled so that the gradients summed over the step's micro-batches and
    averaged over the ranks (FSDP's reduce-scatter averages) are the gradient of the loss of the whole step:
      n_targets   target tokens (targets != IGNORE_INDEX) in all the step's micro-batches on all ranks, / world size
                  (divide a sum over tokens by it: a global per-token mean)
      n_examples  examples in all the step's micro-batches on all ranks, / world size (the same, per example)
      n_micro     micro-batches per step (--grad-accum): divide a term of the weights alone, which every micro-batch
                  of every rank computes alike, by it, so that the step adds it once
    evaluate_loss passes the counts of one held-out batch, n_micro = 1."""
    n_targets: float
    n_examples: float
    n_micro: int = 1


def train(model, stream, loss_fn, cfg: TrainConfig, d: Dist, out_dir: str, train_dir: str, tokenizer_path: str,
          resume: bool = False, val_batches=None, seq_len: int = 128):
    """Train `model` for cfg.steps optimiser steps and write it to out_dir in Meta's format.

    loss_fn(model, batch, counts: StepCounts) -> (loss, metrics): the whole objective for this rank's part of one
        micro-batch, scaled with `counts` (see StepCounts) so that one backward() per micro-batch accumulates the
        gradient of the step's loss. It runs under autocast_context(d). Every metric is scaled the same way: its
        sum over the step's micro-batches, averaged over ranks, is what the log shows.
    """
    check_batch_divides(cfg.batch_size, d.world_size)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    if cfg.compile:  # in place: parameter names, checkpoints and hooks stay as they are
        for block in model.layers:
            block.compile()
    start_step = load_train_state(model, optimizer, train_dir, d) if resume else 0
    peak = cfg.peak_flops or measure_matmul_peak(d.device, compute_dtype(d))  # FLOP/s of one rank
    fpt = flops_per_token(model, seq_len)
    log_path = start_log(train_dir, start_step, resume, d)
    progress = None
    if d.is_main:
        progress = tqdm(total=cfg.steps, initial=start_step, desc=os.path.basename(out_dir), file=sys.stdout,
                        dynamic_ncols=True, disable=None)
        if resume:
            progress.write(f"resumed from step {start_step}")
    window_tokens, window_start, window_first_step = 0, time.perf_counter(), start_step
    for step in range(start_step, cfg.steps):
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [stream.batch(step * cfg.grad_accum + m, cfg.batch_size, d) for m in range(cfg.grad_accum)]
        totals = torch.tensor([sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro),
                               sum(len(b["task"]) for b in micro),
                               sum(int(b["mask"].sum()) for b in micro)], dtype=torch.float64)
        n_targets, n_examples, n_tokens = (all_reduce_sum(totals, d) / d.world_size).tolist()
        counts = StepCounts(n_targets, n_examples, n_micro=cfg.grad_accum)
        sums = {}
        for batch in micro:
            batch = {k: v.to(d.device) for k, v in batch.items()}
            with autocast_context(d):
                loss, metrics = loss_fn(model, batch, counts)
            loss.backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # every metric, summed over ranks, is world_size x its value for the step (see StepCounts)
        totals = all_reduce_sum(torch.tensor([sums[k] for k in sorted(sums)], dtype=torch.float64), d)
        metrics = {k: v / d.world_size for k, v in zip(sorted(sums), totals.tolist())}
        metrics["grad_norm"] = float(grad_norm)
        check_finite(metrics, step, train_dir)  # stop on NaN: the last good state stays intact
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += n_tokens * d.world_size  # real (non-padding) tokens processed this step, all ranks
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            seconds = time.perf_counter() - window_start
            tokens_per_s = window_tokens / seconds
            record = {"step": step + 1, "lr": lr, **nest({k: round(v, 5) for k, v in metrics.items()}),
                      "tokens_per_s": round(tokens_per_s, 1),  # eta_s: steps left x this window's time per step
                      "eta_s": round((cfg.steps - step - 1) * seconds / (step + 1 - window_first_step), 3),
                      "mfu": round(mfu(tokens_per_s * fpt / d.world_size, peak), 4)}
            peak = max(peak, tokens_per_s * fpt / d.world_size)  # achieved more than "peak": a better bound
            if val_batches is not None and (last or (cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                record["val_loss"] = round(evaluate_loss(model, val_batches, loss_fn, d), 5)
            if d.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                shown = {k: record[k] for k in list(metrics) + ["val_loss", "tokens_per_s", "mfu"]
                         if k in record and "/" not in k}
                progress.set_postfix(shown, refresh=False)
                if progress.disable and ((step + 1) % max(cfg.log_every, cfg.steps // 10) == 0 or last):
                    print(f"step {step + 1}/{cfg.steps} " + " ".join(f"{k}={v}" for k, v in shown.items())
                          + f" eta={tqdm.format_interval(record['eta_s'])}", flush=True)
            window_tokens, window_start, window_first_step = 0, time.perf_counter(), step + 1
        if progress:
            progress.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
            save_train_state(model, optimizer, step + 1, train_dir, d)
    if progress:
        progress.close()
    save_model(model, out_dir, tokenizer_path, d)
    save_train_state(model, optimizer, cfg.steps, train_dir, d)
    return model


@torch.no_grad()
def evaluate_loss(model, batches: list, loss_fn, d: Dist) -> float:
    """Mean response-token loss (loss_fn's "lm" metric) over held-out batches (each rank its share; summed over ranks)."""
    total = torch.zeros(2, dtype=torch.float64)
    for batch in batches:
        batch = {k: v.to(d.device) for k, v in batch.items()}
        n = float((batch["targets"] != IGNORE_INDEX).sum())
        with autocast_context(d):
            _, metrics = loss_fn(model, batch, StepCounts(n, float(len(batch["task"]))))
        total += torch.tensor([metrics["lm"] * n, n], dtype=torch.float64)
    total = all_reduce_sum(total, d)
    return float(total[0] / total[1])


# ----------------------------------------------------------------------------------------------------
# 2. Optimiser and schedule


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW over the trainable parameters; weight decay only on matrices (not norms or 1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    check_trainable(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to max_lr over `warmup` steps, then cosine decay to min_ratio * max_lr at `total`."""
    # --- exercise 10: begin ---
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    # --- exercise 10: end ---


# ----------------------------------------------------------------------------------------------------
# 3. FLOPs and MFU


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 2N forward + 2N backward to the inputs + 2N_trainable weight gradients,
    N = matmul parameters a token passes through (embedding lookup excluded; an MoE layer counts its
    router and top_k of its E experts), plus attention scores 12 * layers * dim * seq_len (PaLM's count).
    With every parameter trainable this is the usual 6N."""
    # --- exercise 10: begin ---
    args = model.params
    active = trainable = 0.0
    for name, p in model.named_parameters():
        if name.startswith("tok_embeddings") or p.dim() < 2:
            continue
        share = args.top_k / args.n_experts if p.dim() == 3 else 1.0  # stacked experts [E, ...]
        active += share * p.numel()
        trainable += share * p.numel() * p.requires_grad
    return 4 * active + 2 * trainable + 12 * args.n_layers * args.dim * seq_len
    # --- exercise 10: end ---


def compute_dtype(d: Dist):
    """The dtype the training matmuls run in: bf16 on CUDA (autocast, or FSDP2's MixedPrecisionPolicy), else float32."""
    return torch.bfloat16 if d.device.type == "cuda" else torch.float32


def mfu(model_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak, in (0, 1]. A peak below what the model
    itself achieves was measured in a busy moment (or given too low): train() then raises it to the achieved
    rate, a true lower bound of the machine's peak, so a busy start-up can never print an MFU above 1."""
    return min(1.0, model_flops_per_s / peak_flops_per_s)


def measure_matmul_peak(device, dtype=torch.float32, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul on this machine in `dtype` (the denominator of MFU): the best of the timed
    matmuls over about a second, so one slow moment does not lower it (a busy whole second still can)."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


# ----------------------------------------------------------------------------------------------------
# 4. Set-up


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of cli.add_train_args' flags, each checked first (cli.check_train_args)."""
    check_train_args(args)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       warmup=min(args.warmup, args.steps), weight_decay=args.weight_decay,
                       grad_clip=args.grad_clip, log_every=args.log_every, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed, peak_flops=args.peak_tflops * 1e12,
                       compile=args.compile)
