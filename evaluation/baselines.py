"""Which models a results table compares, and the paper's baselines, built from checkpoints alone.

A row of the table is a ModelSpec: a name, a kind, and build() -> (model, tokenizer), called only
when the row is evaluated, so at most one model (or one ensemble) is in memory at a time. Read top
to bottom:
  1. Which models        CKPT or NAME=CKPT arguments -> checkpoint_specs; --baselines
                         BASE,ALIGNED_1,... -> baseline_specs (base, each aligned model, soup,
                         task_arith, ties, ensemble, oracle)
  2. Weight merging      pure functions on state dicts, arithmetic in float32:
       merge_soup             theta = (1/N) sum_i theta_i
       merge_task_arithmetic  theta = theta_base + alpha * sum_i (theta_i - theta_base)
       merge_ties             trim each tau_i = theta_i - theta_base to its top `density`
                              magnitudes (trim_top_magnitude), elect a sign per weight by
                              sum_i tau_i, theta = theta_base + lam * (mean of the agreeing)
  3. Output ensemble     OutputEnsemble: log p(next | prefix) = log (1/N) sum_i p_i(next | prefix),
                         behind the Transformer interface, so generation and likelihood scoring
                         run on it unchanged
  4. Forced expert       moe.set_forced_expert: every MoE layer's `forced_expert` = i ("route all
                         to expert i"); ByDimension: the oracle rows, each prompt answered by the
                         model (or expert) of its dimension
  5. Expert drift        expert_drift: per expert i, sum_W ||W_i - W_i^0||_F / n_layers (L_R's
                         distance, losses.drift_loss with gamma = e_i)
"""
import dataclasses
import hashlib
import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses import drift_loss
from engineering.hf_checkpoint import config_path
from data.tokenizer import Tokenizer
from engineering.checkpoints import (first_difference, load_checkpoint, read_checkpoint_args,
                                     recover_checkpoint)
from model import model_from_state
from moe import EXPERT_MATRICES, MoE, moe_layers, set_forced_expert

# --------------------------------------------------------------------------------------------------
# 1. Which models: checkpoints from the command line, and the baselines built from base + aligned
#    models


@dataclass
class ModelSpec:
    """One row of the results table. `build()` returns (model, tokenizer) and is called only when
    the row is evaluated, so at most one model (or one ensemble) is in memory at a time."""

    name: str
    kind: str  # dense | fused | merge | ensemble | forced | oracle
    source: str  # what it was built from, in words
    build: Callable = field(repr=False)


def parse_model_arg(arg: str):
    """'runs/toy/fused' -> ('fused', 'runs/toy/fused');
    'h3=runs/toy/fused' -> ('h3', 'runs/toy/fused')."""
    name, sep, path = arg.partition("=")
    if not sep or not name or os.path.exists(arg):
        name, path = os.path.basename(os.path.normpath(arg)), arg
    return name, path


def check_checkpoint_dir(path: str, what: str):
    """Fail early, before any compute, with a message that names the argument."""
    recover_checkpoint(path)  # a save_checkpoint that a kill stopped half-way
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path}: checkpoint directory not found "
                                f"(expected a directory with params.json, consolidated.00.pth, "
                                f"tokenizer.model)")
    for needed in (os.path.basename(config_path(path)), "tokenizer.model"):
        if not os.path.isfile(os.path.join(path, needed)):
            raise FileNotFoundError(f"{what} {path}: no {needed} in it (expected a Meta-format "
                                    f"checkpoint directory: params.json, consolidated.NN.pth, "
                                    f"tokenizer.model; or a HF one: config.json, *.safetensors, "
                                    f"tokenizer.model)")


def load_model(path: str, device="cpu", dtype=None):
    """(model in eval mode, Tokenizer) from a checkpoint directory."""
    model, _ = load_checkpoint(path, device=device, dtype=dtype)
    return model.eval(), Tokenizer(os.path.join(path, "tokenizer.model"))


def file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def check_compatible(paths: list, what: str = "--baselines"):
    """Merging and ensembling need identical architectures and tokenizers: compare every config,
    resolved (engineering/checkpoints.py read_checkpoint_args: Meta's vocab_size -1 is the
    tokenizer's size) and compared by architecture, and every tokenizer.model, with the first one's
    (the base's); name the first difference."""
    first = paths[0]
    first_args = read_checkpoint_args(first)
    first_tok = file_digest(os.path.join(first, "tokenizer.model"))
    for path in paths[1:]:
        diff = first_difference(read_checkpoint_args(path), first_args)
        if diff:
            key, value, first_value = diff
            raise ValueError(f"{what}: {config_path(path)} has {key}={value!r} but {first} has "
                             f"{key}={first_value!r}; merged and ensembled models need identical "
                             f"configs")
        if file_digest(os.path.join(path, "tokenizer.model")) != first_tok:
            raise ValueError(f"{what}: {path}/tokenizer.model differs from "
                             f"{first}/tokenizer.model; "
                             f"merged and ensembled models need the same tokenizer")


def baseline_specs(paths: list, alpha=0.5, ties_density=0.2, ties_lambda=1.0, device="cpu",
                   dtype=None, oracle=False) -> list:
    """paths = [base, aligned_1, ..., aligned_N] -> rows: base, each aligned, soup, task_arith,
    ties, ensemble (+ with oracle=True: each prompt answered by the aligned model of its
    dimension)."""
    if len(paths) < 2:
        raise ValueError(f"--baselines: got {len(paths)} checkpoint(s); "
                         f"expected BASE,ALIGNED_1[,ALIGNED_2,...]")
    for p in paths:
        check_checkpoint_dir(p, "--baselines")
    check_compatible(paths)
    names = [os.path.basename(os.path.normpath(p)) for p in paths]
    aligned = ", ".join(names[1:])
    specs = [ModelSpec(name, "dense", path, partial(load_model, path, device, dtype))
             for name, path in zip(names, paths)]
    specs += [
        ModelSpec("soup", "merge", f"uniform average of {aligned}",
                  partial(load_merged, paths, lambda base, states: merge_soup(states),
                          device, dtype)),
        ModelSpec("task_arith", "merge", f"{names[0]} + {alpha} * sum of task vectors of {aligned}",
                  partial(load_merged, paths, partial(merge_task_arithmetic, alpha=alpha),
                          device, dtype)),
        ModelSpec("ties", "merge",
                  f"TIES (density {ties_density}, lambda {ties_lambda}) of {aligned} on {names[0]}",
                  partial(load_merged, paths,
                          partial(merge_ties, density=ties_density, lam=ties_lambda),
                          device, dtype)),
        ModelSpec("ensemble", "ensemble", f"mean next-token probabilities of {aligned}",
                  partial(load_ensemble, paths[1:], device, dtype)),
    ]
    if oracle:
        specs.append(ModelSpec("oracle", "oracle",
                               f"each prompt answered by the model of its dimension: {aligned}",
                               partial(load_oracle_aligned, paths[1:], device, dtype)))
    return specs


def load_merged(paths: list, merge: Callable, device="cpu", dtype=None):
    """paths = [base, aligned...] -> (the Transformer with weights
    merge(base_state, aligned_states), tokenizer)."""
    loaded = [load_checkpoint(p, device=device, dtype=dtype) for p in paths]
    base_state, *aligned_states = [model.state_dict() for model, _ in loaded]
    args = loaded[0][1]
    return (model_from_state(args, merge(base_state, aligned_states)).eval(),
            Tokenizer(os.path.join(paths[0], "tokenizer.model")))


def load_ensemble(paths: list, device="cpu", dtype=None):
    """The output-level ensemble of the models at `paths` (section 3), with the first one's
    tokenizer."""
    models = [load_model(p, device, dtype)[0] for p in paths]
    return OutputEnsemble(models), Tokenizer(os.path.join(paths[0], "tokenizer.model"))


def checkpoint_specs(args_list: list, forced_experts=False, device="cpu", dtype=None,
                     oracle=False) -> list:
    """CKPT / name=CKPT arguments -> rows (+ one 'NAME[expert=i]' row per expert of a fused model if
    asked, and with oracle=True 'NAME[oracle]': each prompt sent entirely to the expert of its
    dimension)."""
    specs = []
    for arg in args_list:
        name, path = parse_model_arg(arg)
        check_checkpoint_dir(path, "CKPT")
        params = read_checkpoint_args(path)
        kind = "fused" if params.n_experts > 0 else "dense"
        specs.append(ModelSpec(name, kind, path, partial(load_model, path, device, dtype)))
        if forced_experts and kind == "fused":
            for i in range(params.n_experts):
                specs.append(ModelSpec(f"{name}[expert={i}]", "forced",
                                       f"{path}, every token to expert {i}",
                                       partial(load_forced, path, i, device, dtype)))
            if oracle:
                specs.append(ModelSpec(f"{name}[oracle]", "oracle",
                                       f"{path}, each prompt to the expert of its dimension",
                                       partial(load_oracle_fused, path, device, dtype)))
    return specs


def load_forced(path: str, expert: int, device="cpu", dtype=None):
    """A fused checkpoint with every token routed to `expert` (section 4)."""
    model, tokenizer = load_model(path, device, dtype)
    return set_forced_expert(model, expert), tokenizer


# --------------------------------------------------------------------------------------------------
# 2. Weight merging: pure functions on state dicts {name: tensor}. Arithmetic in float32, result in
#    the input's dtype. Aligned models differ from the base only in their FFNs (stage 1 trains only
#    those), so the task vectors of every other tensor are zero and every merge leaves those tensors
#    equal to the base.


def _check_same_keys(states: list, what: str = "merge"):
    for i, s in enumerate(states[1:], 1):
        if set(s) != set(states[0]):
            raise ValueError(f"{what}: state dict {i} has keys "
                             f"{sorted(set(s) ^ set(states[0]))[:5]} that "
                             f"state dict 0 lacks or has; expected identical architectures")
        for k, t in s.items():
            if t.shape != states[0][k].shape:
                raise ValueError(f"{what}: {k} has shape {tuple(t.shape)} in state dict {i} but "
                                 f"{tuple(states[0][k].shape)} in state dict 0")


def merge_soup(states: list) -> dict:
    """Uniform model soup (Wortsman et al. 2022):  theta = (1/N) sum_i theta_i."""
    _check_same_keys(states, "merge_soup")
    return {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype)
            for k in states[0]}


def merge_task_arithmetic(base: dict, states: list, alpha: float = 0.5) -> dict:
    """Task arithmetic (Ilharco et al. 2023):

        theta = theta_base + alpha * sum_i (theta_i - theta_base)

    alpha = 1/N gives exactly the soup (all models share the base); alpha = 1 adds every task vector
    in full. Ilharco et al. pick alpha on held-out data; we have none to tune on, and take 0.5,
    between the soup of three (1/3) and the full sum (1).
    """
    _check_same_keys([base] + states, "merge_task_arithmetic")
    merged = {}
    for k, b in base.items():
        task_sum = sum(s[k].float() - b.float() for s in states)  # same shape as b
        merged[k] = (b.float() + alpha * task_sum).to(b.dtype)
    return merged


def trim_top_magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1 (trim): keep the ceil(density * n) entries of largest |value| of one tensor, zero
    the rest. Entries tied with the smallest kept magnitude are kept too (so the result does not
    depend on sort order)."""
    # --- exercise 8: begin ---
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density={density}: expected a fraction in (0, 1]")
    flat = task_vector.abs().flatten()  # [n]
    k = math.ceil(density * flat.numel())
    if k >= flat.numel():
        return task_vector.clone()
    threshold = flat.topk(k).values[-1]  # the k-th largest magnitude
    return torch.where(task_vector.abs() >= threshold, task_vector, torch.zeros_like(task_vector))
    # --- exercise 8: end ---


def merge_ties(base: dict, states: list, density: float = 0.2, lam: float = 1.0) -> dict:
    """TIES merging (Yadav et al. 2023), per tensor:

        tau_i    = theta_i - theta_base                 task vectors
        trimmed  = the top `density` share of |tau_i|   (trim_top_magnitude; the paper's k = 20 %)
        sign     = sign(sum_i trimmed_i)                one sign per weight: the larger total mass
        tau_m    = mean of the trimmed_i that are       (disjoint mean)
                   non-zero and of the elected sign
        theta    = theta_base + lam * tau_m             (lam = 1: the paper's default without
                                                        validation)

    The TIES paper keeps the top k % of each whole flattened task vector; we keep the top k % of
    each tensor (as mergekit does): one tensor in memory at a time, and every FFN matrix keeps the
    same share of entries. Tensors that no aligned model changed (attention, norms, embeddings) have
    zero task vectors: they stay the base's.
    """
    # --- exercise 8: begin ---
    _check_same_keys([base] + states, "merge_ties")
    merged = {}
    for k, b in base.items():
        taus = torch.stack([trim_top_magnitude(s[k].float() - b.float(), density)
                            for s in states])  # [N, *shape]
        elected = torch.sign(taus.sum(dim=0))  # [*shape], 0 where the trimmed values cancel exactly
        agrees = (torch.sign(taus) == elected) & (taus != 0)  # [N, *shape]
        tau_merged = (taus * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)  # [*shape]
        merged[k] = (b.float() + lam * tau_merged).to(b.dtype)
    return merged
    # --- exercise 8: end ---


# --------------------------------------------------------------------------------------------------
# 3. Output-level ensemble: p(next | prefix) = (1/N) sum_i p_i(next | prefix), at every decoding
#    step. It looks like a Transformer to model.generate_tokens (forward / setup_cache / clear_cache
#    / params / parameters()), so greedy decoding and log-likelihood scoring work on it unchanged.


class OutputEnsemble(nn.Module):
    def __init__(self, members: list):
        """members: models with one shared vocabulary (else ValueError), kept as an nn.ModuleList;
        `params` = the first member's ModelArgs with the smallest max_seq_len of all (what
        generate_tokens reads)."""
        # --- exercise 9: begin ---
        super().__init__()
        if not members:
            raise ValueError("OutputEnsemble: needs at least one model")
        vocab = {m.params.vocab_size for m in members}
        if len(vocab) != 1:
            raise ValueError(f"OutputEnsemble: members have vocab sizes {sorted(vocab)}; "
                             f"expected one shared vocabulary")
        self.members = nn.ModuleList(members)
        self.params = dataclasses.replace(members[0].params,
                                          max_seq_len=min(m.params.max_seq_len for m in members))
        # --- exercise 9: end ---

    def forward(self, tokens, start_pos: int = 0):
        """tokens [B, T] -> log of the averaged probabilities [B, T, V] (argmax = the ensemble's
        greedy token; log_softmax of it is itself, so it also scores log-likelihoods)."""
        # --- exercise 9: begin ---
        log_probs = torch.stack([F.log_softmax(m(tokens, start_pos).float(), dim=-1)
                                 for m in self.members])  # [N, B, T, V]
        # log mean_i p_i = logsumexp_i log p_i - log N
        return torch.logsumexp(log_probs, dim=0) - math.log(len(self.members))  # [B, T, V]
        # --- exercise 9: end ---

    def setup_cache(self, batch_size: int, max_len: int):
        # --- exercise 9: begin ---
        for m in self.members:
            m.setup_cache(batch_size, max_len)
        # --- exercise 9: end ---

    def clear_cache(self):
        # --- exercise 9: begin ---
        for m in self.members:
            m.clear_cache()
        # --- exercise 9: end ---


# --------------------------------------------------------------------------------------------------
# 4. "Route everything to expert i": moe.set_forced_expert, the forced_expert switch of moe.MoE.
#    With it, a fused model computes the same logits as aligned model i (the invariant
#    tests/test_moe.py checks) -- unless fusion training moved the experts or the shared weights,
#    which is exactly what this row shows.


# "Route each example to the expert of its own dimension" (the oracle rows): the score a perfect
# router reaches with these experts. Toy suite only (toy_suite.evaluate_toy reads each record's
# dimension, `task`).


@dataclass
class ByDimension:
    """model_for(i) answers the records of dimension i: aligned model i, or a fused model forced to
    expert i."""

    model_for: Callable
    n: int
    models: list  # the distinct models behind model_for (what parameters() counts)

    def parameters(self):
        return (p for m in self.models for p in m.parameters())


def load_oracle_aligned(paths: list, device="cpu", dtype=None):
    """Aligned model i answers dimension i's prompts (the ceiling of a perfect router over the
    unfused experts)."""
    models = [load_model(p, device, dtype)[0] for p in paths]
    return (ByDimension(models.__getitem__, len(models), models),
            Tokenizer(os.path.join(paths[0], "tokenizer.model")))


def load_oracle_fused(path: str, device="cpu", dtype=None):
    """The fused model with every token of a dimension-i prompt sent to expert i (its trained
    experts)."""
    model, tokenizer = load_model(path, device, dtype)
    return (ByDimension(partial(set_forced_expert, model), model.params.n_experts, [model]),
            tokenizer)


# --------------------------------------------------------------------------------------------------
# 5. Drift of each expert from the aligned model it came from, measured by L_R itself
#    (losses.drift_loss with gamma = e_i and W_i^0 = aligned model i's FFN).


@torch.no_grad()
def expert_drift(model, aligned_states: list) -> list:
    """One float per expert: sum over its matrices (w1, w2, w3) of ||W_i - W_i^0||_F, averaged over
    layers. model: a fused Transformer; aligned_states[i]: the state dict of dense aligned model i
    (its FFN suffices)."""
    moe_modules = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not moe_modules:
        raise ValueError("expert_drift: not a fused model (no MoE layer)")
    initial = {f"{name}.{w}": torch.stack([a[f"{name}.{w}.weight"]
                                           for a in aligned_states])  # [E, ...]
               for name, _ in moe_modules for w in EXPERT_MATRICES}
    return drift_per_expert(model, initial)


@torch.no_grad()
def drift_per_expert(model, initial_experts: dict, drift=drift_loss) -> list:
    """[d_1, ..., d_E], d_i = L_R with gamma = e_i (1 for expert i, 0 for the others): expert i's
    sum over its matrices of ||W_i - W_i^0||_F, averaged over layers. fuse.py's summary calls it on
    the weights in memory: under FSDP sharded (drift_loss reduces the norms across ranks), with LoRA
    deltas through drift = engineering/lora.py lora_drift_loss (W^0 = the frozen W)."""
    n = moe_layers(model)[0].n_experts
    unit = [[float(j == i) for j in range(n)] for i in range(n)]  # gamma = e_i
    return [float(drift(model, initial_experts, gamma)) for gamma in unit]
