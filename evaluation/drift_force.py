"""How hard the rest of H3Fusion's objective pulls each expert off W⁰: the γ at which L_R holds it.

    python -m evaluation.drift_force runs/toy/sweep/gamma_harmless_3 --data-dir runs/toy/data

L_R = Σ_i γ_i Σ_W ‖W − W_i⁰‖_F / n_layers (losses.drift_loss) pulls each matrix W of expert i back
with the same force γ_i / n_layers whatever its distance: the gradient of a norm has length 1. An
expert matrix at W⁰ therefore stays there while that pull is larger than the gradient of the rest of
the objective on it,

    γ_i  >  n_layers · ‖∇_W (L_CE + λ L_G)‖_F        (the "holding γ" of W)

and a larger γ_i changes nothing more. This script prints, for every expert of a fused checkpoint,
the holding γ of its matrices (min / median / max), with ∇ the gradient of fuse.py's objective
(γ = 0: L_R left out) averaged over --batches batches of stage 2's mixture. What it measures is the
pull of the trained model's *other* parts, at the checkpoint's weights: run it on a model trained
with a large γ_i, whose expert i is at W⁰. The average of B batches still carries sampling noise of
order 1/√B, which only inflates the norm: more batches, a tighter (lower) value.
"""
import argparse

import numpy as np
import torch

from engineering.cli import run_cli
from data import TASK_NAMES
from data import streams as S
from data.format import IGNORE_INDEX
from engineering.distributed import setup_distributed
from fusion import h3fusion_objective
from data.tokenizer import Tokenizer
from engineering.checkpoints import load_checkpoint
from moe import expert_parameters, moe_layers
from trainer import StepCounts


def objective_gradients(model, batches: list, lam: float) -> dict:
    """{name: mean over batches of ∇_W (L_CE + λ L_G)} for every expert tensor W ([E, ...]: all
    experts of a layer)."""
    experts = expert_parameters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in experts.values():
        p.requires_grad_(True)
    total = {name: torch.zeros_like(p) for name, p in experts.items()}
    for batch in batches:
        counts = StepCounts(float((batch["targets"] != IGNORE_INDEX).sum()),
                            float(len(batch["task"])))
        loss, _ = h3fusion_objective(model, batch, counts, lam=lam, gamma=[0.0] * len(TASK_NAMES),
                                     reg="drift", initial_experts={})
        grads = torch.autograd.grad(loss, list(experts.values()))
        for name, g in zip(experts, grads):
            total[name] += g / len(batches)
    return total


def holding_gamma(gradients: dict, n_layers: int) -> list:
    """Per expert i, the holding γ of each of its matrices: n_layers · ‖mean gradient of W_i‖_F.
    [E] lists."""
    n_experts = next(iter(gradients.values())).shape[0]
    return [[n_layers * float(g[e].norm()) for g in gradients.values()] for e in range(n_experts)]


def main(argv=None) -> list:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.drift_force", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a fused checkpoint directory (fuse.py's output)")
    p.add_argument("--data-dir", required=True,
                   help="the synthetic world's data (stage 2's mixture: pooled)")
    p.add_argument("--lambda-gate", type=float, default=6.0,
                   help="λ of the objective (fuse.py's default)")
    p.add_argument("--batches", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error(f"--batches {args.batches}: expected >= 1")
    model, margs = load_checkpoint(args.checkpoint)
    if margs.n_experts < 2:
        p.error(f"{args.checkpoint}: a dense model (n_experts {margs.n_experts}); "
                f"expected a fused checkpoint")
    d = setup_distributed("cpu")
    tokenizer = Tokenizer(f"{args.checkpoint}/tokenizer.model")
    _, stream, _ = S.instruction_data("pooled", args.data_dir, tokenizer, args.seq_len,
                                      args.batch_size, 0, d)
    batches = [stream.batch(i, args.batch_size, d) for i in range(args.batches)]
    per_expert = holding_gamma(objective_gradients(model, batches, args.lambda_gate),
                               len(moe_layers(model)))
    print(f"{args.checkpoint}: holding γ = n_layers · ‖∇_W (L_CE + {args.lambda_gate:g} L_G)‖_F "
          f"per expert matrix, gradient averaged over {args.batches} batches of {args.batch_size}")
    names = (TASK_NAMES if len(per_expert) == len(TASK_NAMES) else
             [str(e) for e in range(len(per_expert))])
    for name, values in zip(names, per_expert):
        print(f"  {name:>8}: min {min(values):.3f}  median {float(np.median(values)):.3f}  "
              f"max {max(values):.3f}  ({len(values)} matrices)")
    return per_expert


if __name__ == "__main__":
    run_cli(main, "python -m evaluation.drift_force")
