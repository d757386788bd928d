"""The handwritten training loop shared by train_expert.py (stages 0 and 1) and fuse.py (stage 2).

Read top to bottom:
  (The data a step reads -- deterministic example streams, each rank its slice of the global batch -- is
  data/streams.py.)
  1. Distributed setup     `python x.py` = one process; `torchrun --nproc_per_node=N x.py` = FSDP2 over N ranks
  2. FSDP2 sharding        fully_shard(each block), then fully_shard(root); bf16 params + fp32 reduce on CUDA
  3. Optimiser, schedule   AdamW (decay on >=2-D weights only), linear warmup + cosine decay
  4. FLOPs and MFU         model FLOPs/s over the matmul peak in the dtype the matmuls run in (bf16 on CUDA,
                           float32 on CPU), measured at start-up or given (--peak-tflops); always in (0, 1]
  5. Checkpoints           Meta-format model (model.save_checkpoint) + resumable state (torch.distributed.checkpoint)
  6. train()               the loop: accumulate, clip, step, log, evaluate, save; stop on NaN

Run layout for an output directory OUT:
  OUT/            the model, in Meta's format (params.json, consolidated.00.pth, tokenizer.model)
  OUT.train/      run.json (the arguments), log.jsonl (one JSON line per log step), state/ (for --resume)
"""
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

import model as M
from data import TASK_NAMES
from data.format import IGNORE_INDEX
from fileio import read_dcp_metadata, safe_dcp_reader_and_planner, write_atomic

# ----------------------------------------------------------------------------------------------------
# 1. Distributed setup


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed(device: str = "auto") -> Dist:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; gloo on CPU, nccl on CUDA."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return Dist(0, 1, torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(rank, world_size, dev)


def all_reduce_sum(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def barrier(d: Dist):
    if d.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# 2. FSDP2


def shard_model(model, d: Dist, param_dtype=None):
    """FSDP2: shard every transformer block, then the root (embeddings, final norm, output).

    MoE experts are stacked parameters [E, ...], so every rank reduces every expert's gradient even
    when it routed no token to it (a zero gradient), which keeps the gradients exact.
    """
    if d.world_size == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": mp} if mp else {}
    for layer in model.layers:
        fully_shard(layer, shard_placement_fn=expert_stack_on_dim_1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def expert_stack_on_dim_1(param):
    """Stacked experts [E, ...] are sharded along dim 1: FSDP pads the sharded dim to ceil(n / world) rows per
    rank, and E = 3 experts on dim 0 would give every rank of 2 the memory of 2 experts (of 8: 1 each)."""
    return Shard(1) if param.dim() == 3 else None


def full_state_dict(model, d: Dist) -> dict:
    """Every parameter gathered to full size on CPU (collective: all ranks call it, in the same order)."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        out[name] = t.detach().cpu()
    return out


# ----------------------------------------------------------------------------------------------------
# 3. Optimiser and schedule


def build_optimizer(model, lr: float, weight_decay: float, betas=(0.9, 0.95)):
    """AdamW over the trainable parameters; weight decay only on matrices (not norms or 1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
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
# 4. FLOPs and MFU


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


def compute_dtype(d: "Dist"):
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
# 5. Run directory, checkpoints, resumable state


def check_run_dir(out_dir: str, run_args: dict, resume: bool, overwrite: bool, d: Dist) -> str:
    """Before any compute and before anything is written: refuse to clobber a different run, or a directory
    this project did not write (even with --overwrite, which replaces only our own output). Returns OUT.train."""
    train_dir = out_dir.rstrip("/") + ".train"
    run_json = os.path.join(train_dir, "run.json")
    if d.is_main:
        M.recover_checkpoint(out_dir)  # a model save that a kill stopped half-way
    barrier(d)
    M.refuse_foreign_dir(out_dir, "params.json", "a checkpoint written by this project (--out)")
    M.refuse_foreign_dir(train_dir, "run.json", "a training run written by this project (--out)")
    if resume:
        if d.is_main:
            recover_train_state(train_dir)  # a save a kill interrupted: finish or roll it back
        barrier(d)
        if not os.path.exists(os.path.join(train_dir, "state")):
            raise FileNotFoundError(f"--resume: no saved state in {train_dir}/state (nothing to resume)")
        with open(run_json) as f:
            saved = json.load(f)
        changed = {k: (saved.get(k), v) for k, v in run_args.items()
                   if saved.get(k) != v and k not in ("resume", "overwrite", "steps")}
        if changed:
            raise ValueError(f"--resume: {run_json} was written with different arguments: {changed}")
    elif os.path.exists(os.path.join(out_dir, "params.json")) or os.path.exists(run_json):
        if not overwrite:
            raise FileExistsError(f"{out_dir}: holds an earlier run; pass --resume to continue it or "
                                  f"--overwrite to replace it")
    return train_dir


def start_run_dir(train_dir: str, run_args: dict, resume: bool, overwrite: bool, d: Dist):
    """Write OUT.train/run.json (after check_run_dir, once the data and the model have loaded: a start that
    fails on bad input leaves nothing behind)."""
    run_json = os.path.join(train_dir, "run.json")
    barrier(d)
    if d.is_main:
        if overwrite and not resume:
            shutil.rmtree(train_dir, ignore_errors=True)
        os.makedirs(train_dir, exist_ok=True)
        write_atomic(run_json, json.dumps(run_args, indent=2))
    barrier(d)


def save_model(model, out_dir: str, tokenizer_path: str, d: Dist):
    """Gather the full weights to rank 0 and write them in Meta's format (loadable by model.py)."""
    state = full_state_dict(model, d)
    if d.is_main:
        M.save_checkpoint(state, out_dir, tokenizer_path=tokenizer_path, args=model.params)
    barrier(d)


# The resumable state lives in OUT.train/state. A save writes state.tmp, marks it COMPLETE once every rank has
# written, then swaps: state -> state.old, state.tmp -> state, delete state.old. A kill can stop it between any
# two of these; recover_train_state (run before every save and every resume) finishes or rolls back the swap,
# so the newest complete state is always found and a stale directory never blocks a later save.
COMPLETE = "COMPLETE"


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def recover_train_state(train_dir: str):
    """Finish or roll back a save that a kill interrupted (rank 0 only; call between barriers).

    state.tmp complete and no state   -> it is the newest state: rename it into place
    state.tmp incomplete              -> a save that never finished: delete it
    state missing, state.old present  -> the swap stopped half-way: state.old back into place
    state and state.old both present  -> the swap had finished: delete state.old"""
    final, tmp, old = (os.path.join(train_dir, name) for name in ("state", "state.tmp", "state.old"))
    if os.path.isdir(tmp) and is_complete(tmp) and not os.path.isdir(final):
        os.replace(tmp, final)
    shutil.rmtree(tmp, ignore_errors=True)
    if os.path.isdir(old):
        if not os.path.isdir(final):
            os.replace(old, final)
        else:
            shutil.rmtree(old)


def save_train_state(model, optimizer, step: int, train_dir: str, d: Dist):
    """Optimizer state, step and RNG, sharded as the model is (torch.distributed.checkpoint), written to a
    temporary directory and renamed into place by rank 0 after every rank has finished writing."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final, tmp, old = (os.path.join(train_dir, name) for name in ("state", "state.tmp", "state.old"))
    if d.is_main:
        recover_train_state(train_dir)  # also clears a state.tmp a killed save left behind
    barrier(d)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # one process: expected
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    torch.save({"step": step, "torch_rng": torch.get_rng_state()}, os.path.join(tmp, f"rank{d.rank}.pt"))
    barrier(d)
    if d.is_main:
        open(os.path.join(tmp, COMPLETE), "w").close()  # every rank has written its part
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    barrier(d)


def load_train_state(model, optimizer, train_dir: str, d: Dist) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = os.path.join(train_dir, "state")
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    read_dcp_metadata(os.path.join(path, ".metadata"))  # a clear error here, before DCP wraps it in its own
    reader, planner = safe_dcp_reader_and_planner(path)
    dcp.load(state, storage_reader=reader, planner=planner)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rank_file = os.path.join(path, f"rank{d.rank}.pt")
    if not os.path.exists(rank_file):
        raise ValueError(f"{path}: written by a run with a different world size (no {os.path.basename(rank_file)})")
    extra = torch.load(rank_file, weights_only=True)
    torch.set_rng_state(extra["torch_rng"])
    return extra["step"]


# ----------------------------------------------------------------------------------------------------
# 6. The loop


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
    compile: bool = False  # torch.compile every transformer block (one process only)


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
    if cfg.batch_size % d.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by the world size {d.world_size}")
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    if cfg.compile:  # in place: parameter names, checkpoints and hooks stay as they are
        for block in model.layers:
            block.compile()
    start_step = load_train_state(model, optimizer, train_dir, d) if resume else 0
    peak = cfg.peak_flops or measure_matmul_peak(d.device, compute_dtype(d))  # FLOP/s of one rank
    fpt = flops_per_token(model, seq_len)
    log_path = os.path.join(train_dir, "log.jsonl")
    if d.is_main:  # a fresh log, or on --resume the log up to the step the saved state holds
        kept = [] if not resume or not os.path.exists(log_path) else [
            line for line in open(log_path) if logged_step(line) <= start_step]
        write_atomic(log_path, "".join(kept))
    progress = None
    if d.is_main:
        from tqdm import tqdm

        progress = tqdm(total=cfg.steps, initial=start_step, desc=os.path.basename(out_dir), file=sys.stdout,
                        dynamic_ncols=True, disable=None)
        if resume:
            progress.write(f"resumed from step {start_step}")
    window_tokens, window_start = 0, time.perf_counter()
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
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"step {step + 1}: non-finite loss or gradient ({metrics}); the last good "
                                     f"checkpoint (if any) in {train_dir}/state is left intact")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window_tokens += n_tokens * d.world_size  # real (non-padding) tokens processed this step, all ranks
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            seconds = time.perf_counter() - window_start
            tokens_per_s = window_tokens / seconds
            record = {"step": step + 1, "lr": lr, **nest({k: round(v, 5) for k, v in metrics.items()}),
                      "tokens_per_s": round(tokens_per_s, 1),
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
                    print(f"step {step + 1}/{cfg.steps} " + " ".join(f"{k}={v}" for k, v in shown.items()), flush=True)
            window_tokens, window_start = 0, time.perf_counter()
        if progress:
            progress.update(1)
        if cfg.save_every and (step + 1) % cfg.save_every == 0 and not last:
            save_train_state(model, optimizer, step + 1, train_dir, d)
    if progress:
        progress.close()
    save_model(model, out_dir, tokenizer_path, d)
    save_train_state(model, optimizer, cfg.steps, train_dir, d)
    return model


def logged_step(line: str) -> float:
    """The step of one log.jsonl line; inf for a line a kill cut short (it is dropped on --resume)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


def nest(metrics: dict) -> dict:
    """{"load/layer0/expert1": x} -> {"load": {"layer0": {"expert1": x}}} for a readable log line."""
    out = {}
    for key, value in metrics.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


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


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# Command-line pieces shared by train_expert.py and fuse.py


def add_data_args(parser):
    """--data-path and --task, for real datasets and local files (shared by train_expert.py and fuse.py)."""
    parser.add_argument("--data-path", default=None, help="a local copy of the --data dataset (file or directory: "
                        "e.g. alpaca_data.json, a BeaverTails download, TruthfulQA.csv); for --data real-pooled: "
                        "alpaca-small=PATH,beavertails=PATH,truthfulqa=PATH")
    parser.add_argument("--task", default=None, choices=TASK_NAMES,
                        help="with --data FILE: the dimension of every record that has no 'task' field")


def add_train_args(parser, steps, batch_size, lr, warmup, seq_len, weight_decay=0.1):
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=batch_size, help="examples per micro-step, all ranks together")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"AdamW decoupled weight decay on matrices (default {weight_decay})")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training sequence (max_len)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0 = at the end)")
    g.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (0 = at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak matmul TFLOP/s of one device, the denominator of MFU (default: measured at start-up "
                        "in the dtype the matmuls run in: bf16 on CUDA, float32 on CPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer block (one process; on an H100 the dense training step "
                        "went from 38 %% to 61 %% MFU: bench/gpu_check.py --compile); the first steps compile")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT.train/state")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in OUT")


def config_from_args(args) -> TrainConfig:
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: expected > 0")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay {args.weight_decay}: expected >= 0")
    if not 0 <= args.peak_tflops < float("inf"):
        raise ValueError(f"--peak-tflops {args.peak_tflops}: expected a positive number (0 = measure it)")
    for name in ("warmup", "eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 0")
    if not args.grad_clip > 0:  # 0 would zero every gradient, a negative value flip it (gradient ascent)
        raise ValueError(f"--grad-clip {args.grad_clip}: expected > 0 (the largest gradient norm; inf = no clipping)")
    if args.compile and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise ValueError("--compile under torchrun: compiling FSDP-sharded blocks is not supported here yet (it was "
                         "measured and tested in one process only); leave --compile out")
    if args.resume and args.overwrite:
        raise ValueError("--resume with --overwrite: --resume continues the run in --out, --overwrite replaces it; "
                         "pass one of them")
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       warmup=min(args.warmup, args.steps), weight_decay=args.weight_decay,
                       grad_clip=args.grad_clip, log_every=args.log_every, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed, peak_flops=args.peak_tflops * 1e12,
                       compile=args.compile)


def check_held_out(eval_every: int, val_batches, data: str):
    """--eval-every needs held-out batches; only the synthetic world (its sets, pooled, the corpus) has a val split."""
    if eval_every and val_batches is None:
        raise ValueError(f"--eval-every {eval_every}: --data {data} has no held-out split (only the synthetic world's "
                         f"sets have one), so there is nothing to evaluate; leave --eval-every out")


def autocast_context(d: Dist):
    """bf16 autocast for single-GPU runs (FSDP runs get bf16 through the MixedPrecisionPolicy instead)."""
    if d.device.type == "cuda" and d.world_size == 1:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def finish(d: Dist):
    if d.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
