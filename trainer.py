"""The handwritten training loop shared by train_expert.py (stages 0 and 1) and fuse.py (stage 2).

Read top to bottom:
  1. train()               the loop: accumulate, clip, step, log, evaluate, save
  2. Optimiser, schedule   AdamW (decay on >= 2-D weights only), linear warmup + cosine decay
  3. FLOPs and MFU         model FLOPs/s over the matmul peak in the dtype the matmuls run in
                           (bf16 on CUDA, float32 on CPU), measured at start-up or given
                           (--peak-tflops)
  4. Set-up and checks     seed_everything, compute_dtype; the checks of train()'s inputs
The loop imports nothing of the machinery. What it needs from outside comes in one argument, `run`
(engineering/rundir.py Run): the process group (rank, world_size, device, sum_over_ranks, autocast)
and the run's directory (start: resume or begin, log, save_state, finish: save the model). One
process or FSDP2 over torchrun's ranks, the loop reads the same. What a step reads -- deterministic
example streams, each rank its slice of the global batch -- is data/streams.py.
"""
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from data.format import IGNORE_INDEX

# --------------------------------------------------------------------------------------------------
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
    compile: bool = False  # torch.compile every transformer block (after FSDP's fully_shard)


@dataclass(frozen=True)
class StepCounts:
    """What a loss of one micro-batch is divided by, so that one backward() per micro-batch
    accumulates the gradient of the whole step's loss, however the step's batch is spread over
    micro-batches and ranks (FSDP averages the ranks' gradients: a rank divides its sum by the
    step's count / world_size):
      n_targets   target tokens (targets != IGNORE_INDEX) in all the step's micro-batches, all ranks
      n_examples  examples in all the step's micro-batches, all ranks
      world_size  ranks taking part
      n_micro     micro-batches per step (--grad-accum): a term of the weights alone, which
                  every micro-batch of every rank computes alike, is divided by it, so the step
                  adds it once
    evaluate_loss passes the counts of one held-out batch on one rank."""
    n_targets: int
    n_examples: int
    world_size: int = 1
    n_micro: int = 1

    @property
    def targets_per_rank(self) -> float:
        """Divide a rank's sum over its target tokens by this:
        a per-token mean over the whole step."""
        return self.n_targets / self.world_size

    @property
    def examples_per_rank(self) -> float:
        """Divide a rank's sum over its examples by this: a per-example mean over the whole step."""
        return self.n_examples / self.world_size


def train(model, stream, loss_fn, cfg: TrainConfig, run, val_batches=None, seq_len: int = 128):
    """Train `model` for cfg.steps optimiser steps; run.finish writes it (Meta's format) at the end.

    loss_fn(model, batch, counts: StepCounts) -> (loss, metrics): the whole objective for this
        rank's part of one micro-batch, scaled with `counts` so that one backward() per micro-batch
        accumulates the gradient of the step's loss. It runs under run.autocast(). Every metric is
        scaled the same way: its sum over the step's micro-batches, averaged over ranks, is what the
        log shows.
    """
    check_batch_divides(cfg.batch_size, run.world_size)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    if cfg.compile:  # in place: parameter names, checkpoints and hooks stay as they are
        for block in model.layers:
            block.compile()
    start_step = run.start(model, optimizer)  # 0, or the step a resumed run's saved state holds
    peak = cfg.peak_flops or measure_matmul_peak(run.device, compute_dtype(run.device))  # one rank
    fpt = flops_per_token(model, seq_len)
    window_tokens, window_start, window_first_step = 0, time.perf_counter(), start_step
    for step in range(start_step, cfg.steps):
        lr = lr_at(step, cfg.lr, cfg.warmup, cfg.steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [stream.batch(step * cfg.grad_accum + m, cfg.batch_size, run)
                 for m in range(cfg.grad_accum)]
        counts, n_tokens = step_counts(micro, cfg.grad_accum, run)
        sums = {}
        for batch in micro:
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with run.autocast():
                loss, metrics = loss_fn(model, batch, counts)
            loss.backward()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        trainable = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        metrics = mean_over_ranks(sums, run) | {"grad_norm": full_value(grad_norm)}
        check_finite(metrics, step, run.train_dir)  # stop on NaN: the last good state stays intact
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += n_tokens  # real (non-padding) tokens processed this step, all ranks
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            seconds = time.perf_counter() - window_start
            tokens_per_s = window_tokens / seconds
            record = {"step": step + 1, "lr": lr, **{k: round(v, 5) for k, v in metrics.items()},
                      "tokens_per_s": round(tokens_per_s, 1),  # eta_s: this window's time per step
                      "eta_s": round((cfg.steps - step - 1) * seconds
                                     / (step + 1 - window_first_step), 3),
                      "mfu": round(mfu(tokens_per_s * fpt / run.world_size, peak), 4)}
            peak = max(peak, tokens_per_s * fpt / run.world_size)  # achieved more: a better bound
            if (val_batches is not None
                    and (last or cfg.eval_every and (step + 1) % cfg.eval_every == 0)):
                record["val_loss"] = round(evaluate_loss(model, val_batches, loss_fn, run), 5)
            run.log(record)
            window_tokens, window_start, window_first_step = 0, time.perf_counter(), step + 1
        run.step_done()
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
            run.save_state(model, optimizer, step + 1)
    run.finish(model, optimizer, cfg.steps)  # the model in Meta's format, and the final state
    return model


def step_counts(micro: list, grad_accum: int, run) -> tuple:
    """(StepCounts of one optimiser step's micro-batches over all ranks,
    the real tokens they hold)."""
    local = [sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro),
             sum(len(b["task"]) for b in micro), sum(int(b["mask"].sum()) for b in micro)]
    n_targets, n_examples, n_tokens = (int(n) for n in run.sum_over_ranks(local))
    return StepCounts(n_targets, n_examples, run.world_size, n_micro=grad_accum), n_tokens


def mean_over_ranks(sums: dict, run) -> dict:
    """Every metric's sum over the step's micro-batches, averaged over ranks (see StepCounts)."""
    totals = run.sum_over_ranks([sums[k] for k in sorted(sums)])
    return {k: v / run.world_size for k, v in zip(sorted(sums), totals)}


def full_value(t) -> float:
    """A scalar tensor's value; FSDP2 returns a DTensor
    (its full_tensor() is the value on every rank)."""
    return float(t.full_tensor() if hasattr(t, "full_tensor") else t)


@torch.no_grad()
def evaluate_loss(model, batches: list, loss_fn, run) -> float:
    """Mean response-token loss (loss_fn's "lm" metric) over held-out batches
    (each rank its share)."""
    total = [0.0, 0.0]  # (loss x target tokens, target tokens) summed over this rank's batches
    for batch in batches:
        batch = {k: v.to(run.device) for k, v in batch.items()}
        n = int((batch["targets"] != IGNORE_INDEX).sum())
        with run.autocast():
            _, metrics = loss_fn(model, batch, StepCounts(n, len(batch["task"])))
        total = [total[0] + float(metrics["lm"]) * n, total[1] + n]
    loss_sum, n_targets = run.sum_over_ranks(total)
    return loss_sum / n_targets


# --------------------------------------------------------------------------------------------------
# 2. Optimiser and schedule


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW over the trainable parameters;
    weight decay only on matrices (not norms or 1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    check_trainable(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def lr_at(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to max_lr over `warmup` steps,
    then cosine decay to min_ratio * max_lr at `total`."""
    # --- exercise 10: begin ---
    if step < warmup:
        return max_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    # --- exercise 10: end ---


# --------------------------------------------------------------------------------------------------
# 3. FLOPs and MFU


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 2N forward + 2N backward to the inputs + 2N_trainable weight
    gradients, N = matmul parameters a token passes through (embedding lookup excluded; an MoE layer
    counts its router and top_k of its E experts), plus attention scores 12 * layers * dim * seq_len
    (PaLM's count). With every parameter trainable this is the usual 6N."""
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


def mfu(model_flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak, in (0, 1]. A peak below what
    the model itself achieves was measured in a busy moment (or given too low): train() then raises
    it to the achieved rate, a true lower bound of the machine's peak, so an MFU above 1 is never
    printed."""
    return min(1.0, model_flops_per_s / peak_flops_per_s)


def measure_matmul_peak(device, dtype=torch.float32, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul on this machine in `dtype` (the denominator of MFU): the best of
    the timed matmuls over about a second, so one slow moment does not lower it
    (a busy second still can)."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
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


# --------------------------------------------------------------------------------------------------
# 4. Set-up, and the checks of train()'s inputs


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compute_dtype(device) -> torch.dtype:
    """The dtype the training matmuls run in: bf16 on CUDA (autocast on one GPU, FSDP2's
    MixedPrecisionPolicy under torchrun), else float32."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def check_trainable(params: list):
    if not params:
        raise ValueError("no trainable parameters")


def check_batch_divides(batch_size: int, world_size: int):
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} "
                         f"must be divisible by the world size {world_size}")


def check_finite(metrics: dict, step: int, train_dir: str):
    """Stop on a non-finite loss or gradient of the 0-based step `step`,
    before the optimiser applies it."""
    if not all(math.isfinite(v) for v in metrics.values()):
        raise FloatingPointError(f"step {step + 1}: non-finite loss or gradient ({metrics}); "
                                 f"the last good checkpoint (if any) in {train_dir}/state "
                                 f"is left intact")
