"""The H3Fusion training objective, one function per equation:

    L = L_CE + lambda * L_G + L_R(gamma)              (H3Fusion, arXiv 2411.17792)

    lm_loss            L_CE   next-token cross-entropy on response tokens only
    gating_loss        L_G    -log of the layer- and token-averaged router probability of the
                              example's alignment dimension (steers helpful data to the helpful
                              expert, ...)
    drift_loss         L_R    sum_i gamma_i * sum_{W in expert i} ||W - W_i^0||_F / n_layers
                              (kind="decay", an extra:
                               sum_i gamma_i * sum_{W in expert i} ||W||_F / n_layers)
Extras from the MoE literature (not in H3Fusion, off unless a trainer adds them):
    load_balance_loss  Switch Transformer's  E * sum_e f_e * P_e
    router_z_loss      ST-MoE's              mean (logsumexp of router logits)^2
Helpers after them: f32, per_expert_norm (FSDP2-sharded experts too), safe_sqrt;
then the input checks.

Shapes: B examples, T positions, V vocabulary, E experts.
Every loss is computed in float32 (float64 inputs stay float64).
"""
import torch
import torch.nn.functional as F

from data.format import IGNORE_INDEX  # the target of prompt and padding positions: no loss
from moe import at_least_float32, expert_parameters, moe_layers

# --------------------------------------------------------------------------------------------------
# 1. The paper's losses


def lm_loss(logits, targets, normalizer=None):
    """L_CE: cross-entropy of logits [B, T, V] against targets [B, T] (targets[b, t] = label of
    logits[b, t]; IGNORE_INDEX (-100) on prompt and padding positions, which do not count).

    normalizer: what the summed loss is divided by. None = the number of target tokens in this batch
    (a plain mean). A data-parallel trainer passes the step's target tokens over all ranks divided
    by the world size (trainer.StepCounts), and FSDP averages the ranks' gradients: the result is
    the gradient of the global mean (every token weighs the same, however the tokens are spread over
    ranks). A batch with no target token gives 0 (not NaN).
    """
    check_logits_and_targets(logits, targets)
    total = F.cross_entropy(f32(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")  # scalar
    if normalizer is None:
        normalizer = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / normalizer


def mean_router_probs(router_probs_per_layer, mask):
    """p_bar [B, E]: each example's router distribution averaged over its real tokens (mask [B, T]
    True) and over all MoE layers. Examples with no real token get all-zero rows.
    (Its inputs: check_router_probs, section 4.)"""
    # --- exercise 4: begin ---
    check_router_probs(router_probs_per_layer, mask)
    probs = torch.stack([f32(p) for p in router_probs_per_layer])  # [L, B, T, E]
    m = mask.to(probs.dtype)  # [B, T]
    summed = (probs * m[None, :, :, None]).sum(dim=(0, 2))  # [B, E]
    n_tokens = m.sum(dim=1) * probs.shape[0]  # [B] real tokens x layers
    return summed / n_tokens.clamp(min=1)[:, None]  # [B, E]
    # --- exercise 4: end ---


def gating_loss(router_probs_per_layer, mask, task, normalizer=None):
    """L_G: for every example b, p_bar_b = its router probabilities averaged over its real
    (non-padding) tokens and over all MoE layers; L_G = mean_b -log p_bar_b[y_b], y_b = its
    dimension (task) label.

    router_probs_per_layer: list over layers of [B, T, E] (MoE.router_probs of every layer, after
    the forward); mask [B, T] bool (True on real tokens); task [B] long in 0 .. E-1
    (check_task_labels).
    This is the negative log-likelihood of the averaged distribution: NOT cross-entropy applied to
    probabilities (a second softmax) and NOT averaged over padding. Examples without real tokens are
    left out. normalizer: divide the sum by this instead of the number of examples (data parallel).
    """
    # --- exercise 4: begin ---
    p_bar = mean_router_probs(router_probs_per_layer, mask)  # [B, E]
    task = task.to(p_bar.device).long()
    check_task_labels(task, p_bar)
    has_tokens = mask.any(dim=1)  # [B]
    p_task = p_bar.gather(1, task[:, None]).squeeze(1)  # [B]
    nll = -torch.log(p_task.clamp(min=torch.finfo(p_task.dtype).tiny))  # [B]
    total = (nll * has_tokens).sum()  # scalar
    if normalizer is None:
        normalizer = has_tokens.sum().clamp(min=1)
    return total / normalizer
    # --- exercise 4: end ---


def drift_loss(model, initial_expert_weights, gamma, kind="drift"):
    """L_R(gamma) = sum_i gamma_i * sum_{W in expert i} ||W - W_i^0||_F / n_layers  (kind="drift")
                    sum_i gamma_i * sum_{W in expert i} ||W||_F / n_layers  (kind="decay", an extra)

    W runs over the expert's three matrices (w1, w2, w3) in every MoE layer; ||.||_F is the
    Frobenius norm, not squared. W_i^0 = initial_expert_weights (moe.snapshot_expert_weights, taken
    when the fused model was built = the aligned model i's FFN). gamma: one non-negative value per
    expert, in expert order (helpful, harmless, honest). A larger gamma_i keeps expert i closer to
    aligned model i; the decay reading shrinks the weights themselves (too large a gamma collapses
    the expert to zero).
    It trusts its inputs: fuse.py checks them once, before training (engineering/cli.py check_gamma
    and check_drift_inputs). Under FSDP2 the experts and W^0 are sharded alike, and per_expert_norm
    gathers the E norms. Returns a float32 scalar.
    """
    # --- exercise 5: begin ---
    norms = 0.0
    for name, w in expert_parameters(model).items():  # w [E, ...]: W of every expert, stacked
        if kind == "drift":
            w = w - initial_expert_weights[name].detach()  # W - W_i^0
        norms = norms + per_expert_norm(f32(w))  # [E]: sum over matrices of ||.||_F, per expert
    g = torch.tensor(gamma, dtype=norms.dtype, device=norms.device)  # [E]
    return (g * norms).sum() / len(moe_layers(model))
    # --- exercise 5: end ---


# --------------------------------------------------------------------------------------------------
# 2. Extras from the MoE literature (not in H3Fusion)


def load_balance_loss(router_probs_per_layer, expert_idx_per_layer, mask=None):
    """Switch Transformer's auxiliary loss (Fedus et al. 2021), averaged over layers:
    E * sum_e f_e * P_e, with f_e = the share of (token, slot) assignments that went to expert e and
    P_e = the mean router probability of e, both over real tokens (mask [B, T], None = all).
    router_probs_per_layer: L x [B, T, E] (MoE.router_probs); expert_idx_per_layer: L x [B, T, k]
    (MoE.expert_idx, the experts actually used). 1 for perfectly uniform routing, up to E when it
    collapses onto one expert; only P carries gradient. An extra, not part of H3Fusion (which wants
    routing by task; fuse.py --balance-coef, off by default).
    """
    losses = []
    for probs, expert_idx in zip(router_probs_per_layer, expert_idx_per_layer, strict=True):
        E, k = probs.shape[-1], expert_idx.shape[-1]
        flat = f32(probs.reshape(-1, E))  # [N, E]
        m = (torch.ones(flat.shape[0], device=flat.device) if mask is None
             else mask.reshape(-1).to(flat.dtype))  # [N]
        # assigned[n, e] = 1 where token n was routed to expert e
        assigned = torch.zeros_like(flat).scatter(1, expert_idx.reshape(-1, k), 1.0)  # [N, E]
        n = m.sum().clamp(min=1)
        f = (assigned * m[:, None]).sum(0) / (n * k)  # [E] share of assignments
        P = (flat * m[:, None]).sum(0) / n  # [E] mean probability
        losses.append(E * (f * P).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits_per_layer, mask=None):
    """ST-MoE's router z-loss (Zoph et al. 2022): mean over real tokens and layers of
    logsumexp(logits)^2. Keeps router logits small (numerically stable softmax); does not change
    which expert wins. An extra, not part of H3Fusion (fuse.py --z-coef, off by default)."""
    losses = []
    for logits in router_logits_per_layer:  # [B, T, E]
        z = torch.logsumexp(f32(logits), dim=-1).pow(2)  # [B, T]
        if mask is None:
            losses.append(z.mean())
        else:
            m = mask.to(z.dtype)  # [B, T]
            losses.append((z * m).sum() / m.sum().clamp(min=1))
    return torch.stack(losses).mean()


# --------------------------------------------------------------------------------------------------
# 3. Helpers


def f32(t):
    """t in float32 (float64 stays float64, for gradcheck)."""
    return t.to(at_least_float32(t.dtype))


def per_expert_norm(t):
    """||t[e]||_F of every expert's slice of a stacked [E, ...] tensor -> [E] (a plain tensor), with
    gradient 0 (not NaN) at 0: d||W - W0||/dW is undefined at W = W0, the start of training.

    When t is an FSDP2 DTensor (sharded along any dim) the squared sums are DTensors too, and
    full_tensor() all-gathers or all-reduces the E values (differentiably)."""
    sq = t.pow(2).sum(dim=tuple(range(1, t.dim())))  # [E]
    return safe_sqrt(sq.full_tensor() if hasattr(sq, "full_tensor") else sq)


def safe_sqrt(sq):
    """sqrt of squared norms [E], with gradient 0 (not NaN) where they are 0."""
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))),
                       torch.zeros_like(sq))


# --------------------------------------------------------------------------------------------------
# 4. Input checks (one per input; each names the function, what it found and what it expected)


def check_logits_and_targets(logits, targets):
    """lm_loss: logits [B, T, V] and targets [B, T] agree on [B, T]."""
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"lm_loss: logits {tuple(logits.shape)} "
                         f"and targets {tuple(targets.shape)} disagree on [B, T]")


def check_router_probs(router_probs_per_layer, mask):
    """mean_router_probs: some MoE layer, router probs [B, T, E] against mask [B, T]."""
    if not router_probs_per_layer:
        raise ValueError("mean_router_probs: router_probs_per_layer is empty; "
                         "the model has no MoE layer")
    shape = (len(router_probs_per_layer), *router_probs_per_layer[0].shape)  # [L, B, T, E]
    if shape[1:3] != tuple(mask.shape):
        raise ValueError(f"mean_router_probs: router probs are [L, B, T, E] = {shape}, mask is "
                         f"{tuple(mask.shape)}; expected mask [B, T]")


def check_task_labels(task, p_bar):
    """gating_loss: one label per example (task [B] against p_bar [B, E]), each an expert index."""
    if task.shape != p_bar.shape[:1]:
        raise ValueError(f"gating_loss: task has shape {tuple(task.shape)}, "
                         f"expected [B] = [{p_bar.shape[0]}]")
    E = p_bar.shape[1]
    if task.numel() and (task.min() < 0 or task.max() >= E):
        raise ValueError(f"gating_loss: task labels {task.tolist()} "
                         f"must lie in 0 .. {E - 1} (one per expert)")
