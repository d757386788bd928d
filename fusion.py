"""Stage 2 of H3Fusion, the method: three aligned models -> one MoE and its training objective.

Every aligned model is an FFN-only fine-tune of the same base (train_expert.py). The fused model
takes the base's attention, norms, embeddings and output head, and in every layer l stacks the N
aligned FeedForwards as its experts, with a new router:

    W1[l] = stack(W1_1[l], ..., W1_N[l])   [E, hidden, dim]   (likewise W3; W2 is [E, dim, hidden])
    W_g[l] = the new router [E, dim]                         (zero, random, or hidden_router_rows)

It then trains on the mixture of the three alignment datasets with

    L = L_CE + lambda * L_G + L_R(gamma)                      (the paper's equation for L)

Read top to bottom:
  1. Fusion          fuse_state_dicts: the equation above on loaded state dicts (exercise 6)
  2. The new router  zero or random (router_weight); hidden_router_rows: each dimension's mean FFN
                     input in the base model (mergekit's idea, an extra; exercise 7)
  3. The objective   h3fusion_objective: L on one micro-batch, each loss from losses.py
                     (lm_loss = L_CE, gating_loss = L_G, drift_loss = L_R); the literature's extras;
                     set_trainable (router and experts train, nothing else); routing_metrics
                     for the log (routed right per example and per token)

fuse.py is the command that runs it: it loads the checkpoints (every file checked), builds the model
with fuse_state_dicts in one process (under torchrun, engineering/lean_fusion.py builds the same
tensors reading each rank's rows only), and trains it with trainer.train.
"""
import torch
import torch.nn.functional as F

from data.format import format_prompt
from losses import (drift_loss, gating_loss, lm_loss, load_balance_loss, mean_router_probs,
                    router_z_loss)
from moe import EXPERT_MATRICES, moe_layers

FFN_NAMES = ("feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")
ROUTER_INITS = ("zero", "random", "hidden")

# --------------------------------------------------------------------------------------------------
# 1. Fusion


def fuse_state_dicts(base: dict, aligned: list, routers: list) -> dict:
    """The fusion step on loaded state dicts (Meta's names): every non-FFN tensor from the base; in
    every layer l, expert i's w1, w2, w3 := aligned model i's FeedForward matrices, stacked, and the
    router := routers[l] [E, dim]."""
    # --- exercise 6: begin ---
    fused = {name: t for name, t in base.items() if not is_ffn_key(name)}
    for layer, router in enumerate(routers):
        ffn = f"layers.{layer}.feed_forward"
        # W[l] = stack(W_1[l], ..., W_N[l]): [E, hidden, dim] (w2: [E, dim, hidden])
        for w in EXPERT_MATRICES:
            fused[f"{ffn}.{w}"] = torch.stack([sd[f"{ffn}.{w}.weight"] for sd in aligned])
        fused[f"{ffn}.router.weight"] = router  # [E, dim]
    return fused
    # --- exercise 6: end ---


def is_ffn_key(name: str) -> bool:
    """Is this a dense FeedForward matrix (layers.N.feed_forward.w1.weight, ...)?"""
    return name.endswith(FFN_NAMES)


# --------------------------------------------------------------------------------------------------
# 2. The new router


def router_weight(router_init: str, layer: int, n_experts: int, dim: int,
                  dtype, std: float, seed: int):
    """A [E, dim] router matrix: zeros (uniform routing: ties go to experts 0 .. k-1 until it
    learns), or N(0, std) drawn from a generator seeded by (seed, layer)."""
    if router_init == "random":
        gen = torch.Generator().manual_seed(seed * 1000003 + layer)
        return (torch.randn(n_experts, dim, generator=gen) * std).to(dtype)  # [E, D]
    return torch.zeros(n_experts, dim, dtype=dtype)  # [E, D] ("zero"; the placeholder for "hidden")


@torch.no_grad()
def ffn_inputs_by_layer(model, tokenizer, prompts, max_len=None) -> list:
    """Run a model on prompts and return, per layer, the FFN inputs (ffn_norm outputs) of all real
    tokens: list over layers of [n_tokens, D] float32. Temporary forward pre-hooks catch them (under
    FSDP every rank runs the same prompts)."""
    captured = [[] for _ in model.layers]
    handles = [layer.feed_forward.register_forward_pre_hook(
                   lambda mod, inp, i=i: captured[i].append(inp[0]))
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
    return [torch.cat([x.reshape(-1, x.shape[-1]).float() for x in xs])
            for xs in captured]  # L x [n, D]


def hidden_router_rows(model, tokenizer, init_prompts) -> list:
    """Router init "hidden" (mergekit's idea, an extra: the paper only says the router is new): in
    each layer, router row i = the mean direction of the normalised FFN inputs that dimension i's
    prompts produce in the base model, scaled by 1 / (mean input norm) so that the initial logits
    are about cos(x, direction_i) in [-1, 1]. A token that looks like dimension i's prompts then
    scores highest for expert i. `model` is the base model (or anything that computes it). Returns
    per layer a [E, D] float32 tensor."""
    # --- exercise 7: begin ---
    per_expert = [ffn_inputs_by_layer(model, tokenizer, prompts)
                  for prompts in init_prompts]  # E x L x [n, D]
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


# --------------------------------------------------------------------------------------------------
# 3. The objective


def h3fusion_objective(model, batch, counts, lam: float, gamma: list, reg: str,
                       initial_experts: dict, balance_coef: float = 0.0, z_coef: float = 0.0,
                       drift=drift_loss):
    """The H3Fusion objective (the paper's equation for L) on this rank's part of one micro-batch:

        L = L_CE + lambda * L_G + L_R(gamma)     (+ router_extras' optional extras, off by default)

    scaled with the step's counts (trainer.StepCounts) so that the gradients summed over the step's
    micro-batches, and averaged over ranks by FSDP, are the gradient of L on the whole step's batch:
        L_CE  summed over this micro-batch's target tokens / the step's target tokens per rank
        L_G   summed over its examples / the step's examples per rank
        L_R   a function of the weights alone, the same on every rank and micro-batch, divided by
              counts.n_micro so that the step adds it once (skipped, not logged, if all gamma_i = 0)
    drift: losses.drift_loss, or what computes the same L_R another way (engineering/lora.py's
    lora_drift_loss, for experts with LoRA deltas). Returns (loss, metrics): each term as it
    enters L (before its weight) and the routing metrics, scaled alike, so that the trainer's sums
    over the step's micro-batches are the step's values."""
    logits = model(batch["tokens"])  # [B, T, V]
    router_probs = [m.router_probs for m in moe_layers(model)]  # L x [B, T, E]
    l_ce = lm_loss(logits, batch["targets"], normalizer=counts.targets_per_rank)
    l_gate = gating_loss(router_probs, batch["mask"], batch["task"],
                         normalizer=counts.examples_per_rank)
    l_reg = drift(model, initial_experts, gamma, kind=reg) if any(gamma) else 0.0
    loss = l_ce + lam * l_gate + l_reg / counts.n_micro
    terms = {"lm": l_ce, "gate": l_gate} | ({"reg": l_reg / counts.n_micro} if any(gamma) else {})
    l_extra, extra_terms = router_extras(model, batch, counts, balance_coef, z_coef)
    metrics = {k: v.detach() for k, v in (terms | extra_terms).items()}
    return loss + l_extra, metrics | routing_metrics(model, batch, counts.examples_per_rank)


def router_extras(model, batch, counts, balance_coef: float, z_coef: float):
    """Extras from the MoE literature, not in H3Fusion (off at coefficient 0, the default):
    balance_coef * Switch's load-balancing loss + z_coef * ST-MoE's router z-loss, each a mean over
    this rank's micro-batch weighted by its share of the step's examples. Returns (weighted sum,
    {"balance": ..., "z": ...} for the terms in use)."""
    layers, share = moe_layers(model), len(batch["task"]) / counts.examples_per_rank
    loss, terms = 0.0, {}
    if balance_coef:
        terms["balance"] = load_balance_loss([m.router_probs for m in layers],
                                             [m.expert_idx for m in layers], batch["mask"]) * share
        loss = loss + balance_coef * terms["balance"]
    if z_coef:
        terms["z"] = router_z_loss([m.router_logits for m in layers], batch["mask"]) * share
        loss = loss + z_coef * terms["z"]
    return loss, terms


def set_trainable(model, trainable: str):
    """Router always; expert weights with router+experts (the paper's; --trainable router, an extra,
    freezes them); attention, embeddings, norms, output never."""
    for name, p in model.named_parameters():
        is_router = name.endswith("feed_forward.router.weight")
        is_expert = ".feed_forward.w" in name
        p.requires_grad = is_router or (trainable == "router+experts" and is_expert)
    return model


@torch.no_grad()
def routing_metrics(model, batch, examples_per_rank: float) -> dict:
    """For the training log, evaluate.py's two readings of "routed right" (expert i = dimension i):
      routed_right_per_example  share of examples whose p_bar (the router's softmax averaged over
                                the example's real tokens and all layers, what L_G trains) peaks
                                at the expert of their dimension
      routed_right_per_token    share of (real token, layer) pairs whose top-1 expert is the
                                example's dimension (a mean over each example's pairs, then over
                                examples)
      load/layerL/expertE       each expert's share of the top-k slots in layer L
    each summed over this rank's examples / examples_per_rank (trainer.StepCounts)."""
    mask, task = batch["mask"], batch["task"]  # [B, T], [B]
    layers = moe_layers(model)
    tokens_per_example = mask.sum(1).clamp(min=1)  # [B]
    metrics, correct = {}, 0.0
    for layer_idx, moe in enumerate(layers):
        top1 = moe.router_probs.argmax(-1)  # [B, T]
        correct = correct + ((top1 == task[:, None]) & mask).sum(1) / tokens_per_example  # [B]
        chosen = moe.expert_idx[mask]  # [n_real, k]
        load = torch.bincount(chosen.flatten(),
                              minlength=moe.n_experts).float() / chosen.numel()  # [E]
        for e, share in enumerate(load.tolist()):
            metrics[f"load/layer{layer_idx}/expert{e}"] = share * len(task) / examples_per_rank
    p_bar = mean_router_probs([m.router_probs for m in layers], mask)  # [B, E]
    example_right = (p_bar.argmax(-1) == task) & mask.any(1)  # [B]
    metrics["routed_right_per_example"] = float(example_right.sum()) / examples_per_rank
    metrics["routed_right_per_token"] = float((correct / len(layers)).sum()) / examples_per_rank
    return metrics
