"""Routing analysis of a fused model, either suite: where did the router send each example's tokens?

routing_stats runs one teacher-forced forward over prompt + generated answer and reads back, for
every MoE layer, the router's full softmax and the experts each token went to. Expert i was aligned
for dimension i, so "routed right" means expert == the example's dimension y_b. It reports (keys of
results.json "routing"):
  routing_acc_example  share of examples b with argmax_e p̄_b[e] == y_b, p̄_b = the router softmax
                       averaged over b's tokens and all layers: the quantity the gating loss L_G
                       trains (losses.mean_router_probs)
  routing_acc          share of (token, layer) pairs whose top-1 expert is y_b (also per layer, per
                       dimension)
  router_entropy       mean entropy of the router's full softmax, in nats (log 3 = 1.10 = uniform
                       over 3)
  usage_top1/_topk     [dimension][layer][expert]: share of tokens whose top-1 expert / top-k set
                       is that expert
and the two accuracies over the prompt tokens alone (*_prompt: what the router saw before the model
answered). routed_right_by_group splits the per-example accuracy by any labelling of the examples
(evaluate.py: the toy suite's kind of prompt, results.json details.by_kind[kind]["routed"]).

(fusion.routing_metrics asks the same of one training batch, for fuse.py's log.)
"""
from typing import Optional

import torch
import torch.nn.functional as F

from data import TASK_NAMES
from data.format import PAD_ID
from moe import moe_layers

# Teacher-forced forward over prompt + answer; for every MoE layer the router's full softmax
# router_probs [B, T, E] and the chosen experts expert_idx [B, T, k] (best first; both kept by
# moe.MoE after each forward) are read back. Reading expert_idx counts exactly the experts the model
# used, with moe.route's tie-break (lower index wins), e.g. for a zero-initialised router.


@torch.inference_mode()
def routing_stats(model, sequences: list, tasks: list, batch_size: int = 32,
                  prompt_lengths: Optional[list] = None) -> dict:
    """Routing accuracy per example and token, expert usage per dimension x layer, router entropy.

    sequences: token ids per example (prompt + answer); tasks: the example's dimension (0 helpful,
    1 harmless, 2 honest) -- expert i was aligned for dimension i, so "correctly routed" means
    expert == task. prompt_lengths: how many of each sequence's first tokens are the prompt
    (default: all of them).

    Two readings of "routed right", each over all real tokens and over the prompt tokens alone (what
    the router has seen before the model answers):
      per example  argmax_e p̄_b[e] == y_b, with p̄_b the router's softmax averaged over the
                   example's tokens and all layers -- the quantity the gating loss L_G trains
                   (losses.mean_router_probs)
      per token    top-1 expert == y_b, counted over (token, layer) pairs
    """
    layers = moe_layers(model)
    if not layers:
        raise ValueError("routing_stats: the model has no MoE layers (expected a fused model)")
    L, E, k = len(layers), model.params.n_experts, model.params.top_k
    n_dims = max(max(tasks) + 1, len(TASK_NAMES))
    prompt_lengths = prompt_lengths or [len(s) for s in sequences]
    top1_counts = torch.zeros(n_dims, L, E, dtype=torch.float64)  # tokens whose top-1 expert is e
    topk_counts = torch.zeros(n_dims, L, E, dtype=torch.float64)  # tokens whose top-k set holds e
    entropy_sum = torch.zeros(n_dims, L, dtype=torch.float64)
    n_tokens = torch.zeros(n_dims, dtype=torch.float64)  # per dimension (the same for every layer)
    prompt_hits = torch.zeros(2, dtype=torch.float64)  # prompt (token, layer) pairs: [right, all]
    # p̄_b over all real tokens and layers, and over the prompt tokens and layers
    mean_probs = torch.zeros(len(sequences), E, dtype=torch.float64)  # [N, E]
    mean_probs_prompt = torch.zeros(len(sequences), E, dtype=torch.float64)  # [N, E]
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        T = max(len(sequences[i]) for i in batch)
        tokens = torch.full((len(batch), T), PAD_ID, dtype=torch.long)  # [B, T]
        mask = torch.zeros(len(batch), T, dtype=torch.float64)  # [B, T], 1 on real tokens
        prompt_mask = torch.zeros(len(batch), T, dtype=torch.float64)  # [B, T], 1 on prompt tokens
        for b, i in enumerate(batch):
            tokens[b, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[b, :len(sequences[i])] = 1
            prompt_mask[b, :min(prompt_lengths[i], len(sequences[i]))] = 1
        task = torch.tensor([tasks[i] for i in batch])  # [B]
        model(tokens.to(device), 0)
        n_tokens.index_add_(0, task, mask.sum(1))
        for l, layer in enumerate(layers):
            probs = layer.router_probs.detach().double().cpu()  # [B, T, E]
            chosen = layer.expert_idx.cpu()  # [B, T, k] the experts each token went to, best first
            top1 = F.one_hot(chosen[..., 0], E).double()  # [B, T, E]
            topk = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)  # [B, T, E]
            entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)  # [B, T]
            top1_counts[:, l].index_add_(0, task, (top1 * mask[..., None]).sum(1))  # [B, E] over T
            topk_counts[:, l].index_add_(0, task, (topk * mask[..., None]).sum(1))
            entropy_sum[:, l].index_add_(0, task, (entropy * mask).sum(1))
            right = (chosen[..., 0] == task[:, None]).double()  # [B, T]
            prompt_hits += torch.stack([(right * prompt_mask).sum(), prompt_mask.sum()])
            mean_probs[batch] += ((probs * mask[..., None]).sum(1)
                                  / (mask.sum(1, keepdim=True) * L))  # [B, E]
            mean_probs_prompt[batch] += ((probs * prompt_mask[..., None]).sum(1)
                                         / (prompt_mask.sum(1, keepdim=True) * L))  # [B, E]
    present = [d for d in range(n_dims) if n_tokens[d] > 0]
    routable = [d for d in present if d < E]  # one with no expert of its own can't be routed right
    per_token = n_tokens[:, None, None].clamp(min=1)
    correct_per_layer = torch.stack([top1_counts[d, :, d] for d in routable]).sum(0)  # [L]
    routable_tokens = sum(n_tokens[d] for d in routable)
    name = lambda d: TASK_NAMES[d] if d < len(TASK_NAMES) else str(d)  # noqa: E731
    all_tasks = torch.tensor(tasks)  # [N]
    example_right = mean_probs.argmax(-1) == all_tasks  # [N]
    example_right_prompt = mean_probs_prompt.argmax(-1) == all_tasks  # [N]
    return {
        "routing_acc_example": example_right.double().mean().item(),
        "routing_acc_example_prompt": example_right_prompt.double().mean().item(),
        "routing_acc_example_per_dimension": {
            name(d): example_right[all_tasks == d].double().mean().item() for d in present},
        "routing_acc":
            (correct_per_layer.sum() / (routable_tokens * L)).item() if routable else None,
        "routing_acc_prompt": (prompt_hits[0] / prompt_hits[1]).item(),
        "routing_acc_per_layer":
            (correct_per_layer / routable_tokens).tolist() if routable else None,
        "routing_acc_per_dimension": {
            name(d): (top1_counts[d, :, d].sum() / (n_tokens[d] * L)).item() for d in routable},
        "router_entropy": (entropy_sum[present].sum() / (n_tokens[present].sum() * L)).item(),
        "usage_top1": {name(d): (top1_counts / per_token)[d].tolist()
                       for d in present},  # [layer][expert]
        "usage_topk": {name(d): (topk_counts / per_token)[d].tolist()
                       for d in present},  # [layer][expert]
        "tokens_per_dimension": {name(d): int(n_tokens[d]) for d in present},
        "mean_router_probs": mean_probs.tolist(),  # p̄_b per example, in input order
        "top_k": k,
    }


def routed_right_by_group(mean_router_probs: list, tasks: list, groups: list) -> dict:
    """{group: share of its examples whose p̄ (routing_stats' mean_router_probs, one row of E per
    example) peaks at the expert of their dimension}: routing_acc_example split by any labelling of
    the examples, e.g. the toy suite's kind of prompt (data/toy_scoring.py kind_group), to see which
    prompts the router sends elsewhere."""
    if not len(mean_router_probs) == len(tasks) == len(groups):
        raise ValueError(f"routed_right_by_group: {len(mean_router_probs)} rows of router "
                         f"probabilities, {len(tasks)} tasks and {len(groups)} groups: "
                         f"expected one of each per example")
    right = torch.tensor(mean_router_probs).argmax(-1) == torch.tensor(tasks)  # [N]
    return {g: right[[i for i, x in enumerate(groups) if x == g]].double().mean().item()
            for g in sorted(set(groups))}
