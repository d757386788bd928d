"""What train_expert.py and fuse.py print when they end: where the model went, in which format,
what to run next, and for a fused model what γ did to each expert and where the router sends the
held-out examples.

Under torchrun every rank computes the numbers together (the weights stay sharded; norms and counts
are reduced across ranks) and rank 0 alone prints them: one process and N ranks print the same.
Read top to bottom:
  1. The saved model   saved_lines; next_after_stage (train_expert.py), next_after_fusion (fuse.py)
  2. What γ did        drift_per_expert (evaluation/baselines.py, evaluate.py's drift column; here
                       on the weights in memory), rms_change_per_weight and verdict: is each
                       expert still at W⁰, within a fraction of one optimiser step?
  3. Routing           routed_right_by_dimension: per example, on the held-out examples
                       (held_out_batches: all of them, under torchrun too)
  4. The summaries     stage_summary (train_expert.py), fusion_summary (fuse.py), print_summary
"""
import math
import os
import shlex

import torch

from data import REAL_NAMES, TASK_IDS, TASK_NAMES, TASK_OF_REAL
from data.format import collate
from data.streams import HELD_OUT_LIMIT
from engineering.distributed import all_reduce_sum, autocast_context
from evaluation.baselines import drift_per_expert
from losses import f32, mean_router_probs, per_expert_norm
from moe import collect_router_probs, expert_parameters, moe_layers
from trainer import lr_at

TOY_SETS = TASK_NAMES + ("pooled", "pooled-natural")
HELD_SHARE = 0.5  # an expert is held at W⁰ while its RMS change per weight < HELD_SHARE x peak lr

# ------------------------------------------------------------------------------------------------
# 1. The saved model, and the next command


def saved_lines(script: str, out: str, what: str) -> list:
    """Where the model went and in which format (engineering/rundir.py save_model), and its log."""
    out = out.rstrip("/")
    return [f"{script}: saved {what} to {out}",
            f"  in Meta's LLaMA format (params.json, consolidated.00.pth, tokenizer.model); "
            f"training log {out}.train/log.jsonl"]


def command(*words) -> str:
    """A shell command line, each word quoted where it needs it."""
    return " ".join(shlex.quote(str(w)) for w in words)


def device_flags(d) -> list:
    """evaluate.py runs on the CPU in float32 unless told: after a GPU run, the next command says
    so."""
    return ["--device", "cuda", "--dtype", "bfloat16"] if d.device.type == "cuda" else []


def task_of(data: str, task: str = None):
    """The dimension a stage-1 dataset aligns (0 helpful, 1 harmless, 2 honest), or None (a mixture,
    the corpus, a file without --task)."""
    if task:
        return TASK_IDS[task]
    if data in TASK_IDS:
        return TASK_IDS[data]
    return TASK_OF_REAL.get(REAL_NAMES.get(data.lower().replace("-", "_"), ""))


def next_after_stage(args, d) -> str:
    """train_expert.py's next step: align the new base (stage 0); fuse the aligned models (stage 1:
    this one in its own slot, the others beside it, named as pipeline.py and the README name them);
    or evaluate (a mixture: the multi-task SFT baseline)."""
    out = args.out.rstrip("/")
    here = os.path.dirname(out) or "."
    if args.data == "corpus":
        return command("python", "train_expert.py", "--init", out, "--data", "helpful",
                       "--data-dir", args.data_dir, "--out", os.path.join(here, "helpful")) \
            + "   (and the same for harmless, honest)"
    task = task_of(args.data, args.task)
    if task is None:
        suite = ["--data", args.data_dir] if args.data in TOY_SETS else ["--suite", "real"]
        return command("python", "evaluate.py", out, *suite, *device_flags(d),
                       "--out", out + ".eval")
    experts = [out if i == task else os.path.join(here, name) for i, name in enumerate(TASK_NAMES)]
    mixture = ["--data-dir", args.data_dir] if args.data in TOY_SETS else ["--data", "real-pooled"]
    return command("python", "fuse.py", "--base", args.init, "--experts", ",".join(experts),
                   *mixture, "--out", os.path.join(here, "fused")) \
        + "   (once all three are aligned)"


def next_after_fusion(args, d) -> str:
    """fuse.py's next step: evaluate.py on the fused model; on the toy suite with the base and the
    aligned models as baselines (which also fills the drift column), on the real one with
    --drift-from."""
    out, experts = args.out.rstrip("/"), ",".join(args.expert_dirs)
    if args.data in TOY_SETS:
        flags = ["--baselines", f"{args.base},{experts}", "--data", args.data_dir]
    else:
        flags = ["--suite", "real", "--drift-from", experts]
    return command("python", "evaluate.py", out, *flags, *device_flags(d), "--out", out + ".eval")


# ------------------------------------------------------------------------------------------------
# 2. What γ did to each expert


def peak_lr(cfg) -> float:
    """The largest learning rate the run's schedule reached (trainer.lr_at)."""
    return max(lr_at(step, cfg.lr, cfg.warmup, cfg.steps) for step in range(cfg.steps))


@torch.no_grad()
def rms_change_per_weight(model, initial_experts: dict) -> list:
    """Per expert, sqrt(sum over its matrices of ||W - W⁰||_F² / its number of weights): how far
    its weights moved from W⁰, per weight. (Collective under FSDP: each sum of squares is reduced
    across ranks.)"""
    squares, n_weights = 0.0, 0
    for name, w in expert_parameters(model).items():  # w [E, ...]: W of one layer, every expert
        squares = squares + per_expert_norm(f32(w) - f32(initial_experts[name])) ** 2  # [E]
        n_weights += math.prod(w.shape[1:])
    return (squares / n_weights).sqrt().tolist()


def verdict(gamma: float, steps: float) -> str:
    """Whether L_R holds one expert at its aligned weights, in words. steps: its RMS change per
    weight in units of the run's peak lr. AdamW moves each weight by up to about lr per step, so
    an expert that L_R pulls back every step stays within a fraction of one step of W⁰ (held:
    under HELD_SHARE), while one it does not hold moves away step after step."""
    if gamma == 0:
        return "not held: γ = 0, L_R does not pull it"
    if steps < HELD_SHARE:
        return f"held at its aligned weights by L_R (moved {steps:.2g} of a step per weight)"
    return f"not held: the data pulls harder than γ (moved {steps:.2g} steps per weight)"


def verdicts(model, initial_experts: dict, args, cfg) -> list:
    """One verdict per expert; a note instead where "held at W⁰" is not the question (frozen
    experts, --reg decay, LoRA deltas)."""
    n = len(args.gamma_values)
    if args.trainable == "router":
        return ["frozen (--trainable router)"] * n
    if args.reg == "decay":
        return ["(--reg decay pulls it toward 0, not toward W⁰)"] * n
    if args.lora_rank:
        return ["(LoRA: W⁰ is the frozen W; the drift is the delta's, held is not judged)"] * n
    lr = peak_lr(cfg)
    moved = [x / lr for x in rms_change_per_weight(model, initial_experts)]  # in peak-lr steps
    return [verdict(g, steps) for g, steps in zip(args.gamma_values, moved)]


def drift_lines(model, initial_experts: dict, args, cfg, drift) -> list:
    """Each expert's γ, its drift (evaluate.py's drift column) and whether L_R holds it at W⁰."""
    drifts = drift_per_expert(model, initial_experts, drift)
    words = verdicts(model, initial_experts, args, cfg)
    lines = ["drift ‖W − W⁰‖ per expert (summed over its matrices, averaged over layers: "
             "evaluate.py's drift column):"]
    for name, gamma, x, word in zip(dimension_names(len(drifts)), args.gamma_values, drifts, words):
        lines.append(f"  {name:>8}  γ {gamma:<5g} drift {x:<7.3g} {word}")
    if any(w.startswith(("held", "not held: the")) for w in words):
        lines.append(f"  (held: its weights moved less than {HELD_SHARE:g} of an AdamW step at the "
                     f"peak lr {peak_lr(cfg):.3g}, RMS; a step moves each weight by up to ~lr)")
    return lines


def dimension_names(n: int) -> list:
    return list(TASK_NAMES) if n == len(TASK_NAMES) else [str(e) for e in range(n)]


# ------------------------------------------------------------------------------------------------
# 3. Routing per example, on the held-out examples


def held_out_batches(examples: list, batch_size: int, d, limit: int = HELD_OUT_LIMIT) -> list:
    """This rank's batches of the first `limit` held-out examples (val_batches_of's), all of them
    whatever the world size: rank r takes every world_size-th example from r, and a rank left one
    short runs a copy of the first with task -1 (not counted), so every rank runs as many forwards
    (FSDP's collectives). One process: exactly val_batches_of's batches."""
    examples = examples[:limit]
    per_rank = math.ceil(len(examples) / d.world_size)
    mine = examples[d.rank::d.world_size]
    mine = mine + [dict(examples[0], task=-1)] * (per_rank - len(mine))
    return [collate(mine[i:i + batch_size]) for i in range(0, per_rank, batch_size)]


@torch.no_grad()
def routed_right_by_dimension(model, batches: list, d) -> tuple:
    """(right [E], examples [E]), summed over ranks: per dimension, its held-out examples and those
    whose p̄ (the router's softmax averaged over the example's tokens and all layers, what L_G
    trains: losses.mean_router_probs) peaks at the expert of that dimension. Collective under FSDP:
    every rank runs as many batches (held_out_batches); examples with task -1 are not counted."""
    n_experts = moe_layers(model)[0].n_experts
    right, total = (torch.zeros(n_experts, dtype=torch.float64) for _ in range(2))
    for batch in batches:
        tokens, mask, task = (batch[k].to(d.device) for k in ("tokens", "mask", "task"))
        with autocast_context(d):
            model(tokens)
        p_bar = mean_router_probs(collect_router_probs(model), mask)  # [B, E]
        known = ((task >= 0) & (task < n_experts) & mask.any(1)).cpu()  # [B]
        hit = (p_bar.argmax(-1) == task).cpu()  # [B]
        task = task.cpu()
        right.index_add_(0, task[known], hit[known].double())
        total.index_add_(0, task[known], torch.ones(int(known.sum()), dtype=torch.float64))
    counts = all_reduce_sum(torch.stack([right, total]).to(d.device), d).cpu()
    return counts[0], counts[1]


def routing_lines(model, held_out: list, args, d) -> list:
    """Routed right per example, per dimension and over all the held-out examples."""
    if not held_out:
        return [f"routed right per example: not measured (--data {args.data} has no held-out "
                f"split)"]
    batches = held_out_batches(held_out, args.batch_size, d)
    right, total = routed_right_by_dimension(model, batches, d)
    shares = [f"{name} {100 * r / n:.1f} %" for name, r, n
              in zip(dimension_names(len(right)), right.tolist(), total.tolist()) if n]
    return [f"routed right per example on the {int(total.sum())} held-out examples of --data "
            f"{args.data} (p̄, the router's softmax averaged over an example's tokens and "
            f"layers, peaks at its dimension's expert):",
            "  " + ", ".join(shares) + f"; all {100 * float(right.sum() / total.sum()):.1f} %"
            f"   (the log's routed_right_per_token counts (token, layer) pairs instead)"]


# ------------------------------------------------------------------------------------------------
# 4. The summaries


def stage_summary(args, d) -> list:
    """train_expert.py's last lines."""
    lora = ", LoRA deltas merged" if args.lora_rank else ""
    what = "the base model" if args.data == "corpus" else f"the model trained on {args.data}{lora}"
    return saved_lines("train_expert.py", args.out, what) + ["next: " + next_after_stage(args, d)]


def fusion_summary(model, initial_experts: dict, held_out, args, cfg, d, drift) -> list:
    """fuse.py's last lines. held_out: the encoded held-out examples (data/streams.py
    held_out_examples), or None. Collective: every rank calls it, print_summary prints rank 0's."""
    lora = ", LoRA deltas merged" if args.lora_rank else ""
    what = f"the fused model ({model.params.n_experts} experts, top-{model.params.top_k}{lora})"
    return (saved_lines("fuse.py", args.out, what)
            + drift_lines(model, initial_experts, args, cfg, drift)
            + routing_lines(model, held_out, args, d)
            + ["next: " + next_after_fusion(args, d)])


def print_summary(lines: list, d):
    """Rank 0 prints; the other ranks computed their share of the numbers."""
    if d.is_main:
        print("\n".join(lines), flush=True)
