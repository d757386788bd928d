"""The H3Fusion training objective, one function per equation:

    L = L_CE + lambda * L_G + L_R(gamma)              (H3Fusion, arXiv 2411.17792)

    lm_loss            L_CE   next-token cross-entropy on response tokens only
    gating_loss        L_G    -log of the layer- and token-averaged router probability of the example's
                              alignment dimension (steers helpful data to the helpful expert, ...)
    drift_loss         L_R    sum_i gamma_i * sum_{W in expert i} ||W - W_i^0||_F / n_layers
                              (kind="decay": sum_i gamma_i * sum_{W in expert i} ||W||_F / n_layers)
Optional extras from the MoE literature (not in H3Fusion, off unless a trainer adds them):
    load_balance_loss  Switch Transformer's  E * sum_e f_e * P_e
    router_z_loss      ST-MoE's              mean (logsumexp of router logits)^2

Shapes: B examples, T positions, V vocabulary, E experts. Every loss is computed in float32 (float64 inputs stay float64).
"""
import torch
import torch.nn.functional as F

from data.format import IGNORE_INDEX  # the target of prompt and padding positions: no loss
from moe import EXPERT_MATRICES, MoE, at_least_float32


def f32(t):
    """t in float32 (float64 stays float64, for gradcheck)."""
    return t.to(at_least_float32(t.dtype))


def lm_loss(logits, targets, normalizer=None):
    """L_CE: cross-entropy of logits [B, T, V] against targets [B, T] (targets[b, t] = label of logits[b, t];
    IGNORE_INDEX (-100) on prompt and padding positions, which do not count).

    normalizer: what the summed loss is divided by. None = the number of target tokens in this batch (a
    plain mean). A data-parallel trainer passes the number of target tokens over ALL ranks, so that
    summing the ranks' gradients gives the gradient of the global mean (every token weighs the same,
    however the tokens are spread over ranks). A batch with no target token gives 0 (not NaN).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"lm_loss: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on [B, T]")
    total = F.cross_entropy(f32(logits).reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")  # scalar
    if normalizer is None:
        normalizer = (targets != IGNORE_INDEX).sum().clamp(min=1)
    return total / normalizer


def mean_router_probs(router_probs_per_layer, mask):
    """p_bar [B, E]: each example's router distribution averaged over its real tokens (mask [B, T] True)
    and over all MoE layers. Examples with no real token get all-zero rows."""
    # --- exercise 4: begin ---
    if not router_probs_per_layer:
        raise ValueError("gating_loss: router_probs_per_layer is empty; the model has no MoE layer")
    probs = torch.stack([f32(p) for p in router_probs_per_layer])  # [L, B, T, E]
    if probs.shape[1:3] != mask.shape:
        raise ValueError(f"gating_loss: router probs are [L, B, T, E] = {tuple(probs.shape)}, mask is "
                         f"{tuple(mask.shape)}; expected mask [B, T]")
    m = mask.to(probs.dtype)  # [B, T]
    summed = (probs * m[None, :, :, None]).sum(dim=(0, 2))  # [B, E]
    n_tokens = m.sum(dim=1) * probs.shape[0]  # [B] real tokens x layers
    return summed / n_tokens.clamp(min=1)[:, None]  # [B, E]
    # --- exercise 4: end ---


def gating_loss(router_probs_per_layer, mask, task, normalizer=None):
    """L_G: for every example b, p_bar_b = its router probabilities averaged over its real (non-padding)
    tokens and over all MoE layers; L_G = mean_b -log p_bar_b[y_b], y_b = its dimension (task) label.

    router_probs_per_layer: list over layers of [B, T, E] (moe.collect_router_probs(model));
    mask [B, T] bool (True on real tokens); task [B] long in 0 .. E-1.
    This is the negative log-likelihood of the averaged distribution: NOT cross-entropy applied to
    probabilities (a second softmax) and NOT averaged over padding. Examples without real tokens are
    left out. normalizer: divide the sum by this instead of the number of examples (data parallel).
    """
    # --- exercise 4: begin ---
    p_bar = mean_router_probs(router_probs_per_layer, mask)  # [B, E]
    task = task.to(p_bar.device).long()
    if task.shape != p_bar.shape[:1]:
        raise ValueError(f"gating_loss: task has shape {tuple(task.shape)}, expected [B] = [{p_bar.shape[0]}]")
    E = p_bar.shape[1]
    if task.numel() and (task.min() < 0 or task.max() >= E):
        raise ValueError(f"gating_loss: task labels {task.tolist()} must lie in 0 .. {E - 1} (one per expert)")
    has_tokens = mask.any(dim=1)  # [B]
    p_task = p_bar.gather(1, task[:, None]).squeeze(1)  # [B]
    nll = -torch.log(p_task.clamp(min=torch.finfo(p_task.dtype).tiny))  # [B]
    total = (nll * has_tokens).sum()  # scalar
    if normalizer is None:
        normalizer = has_tokens.sum().clamp(min=1)
    return total / normalizer
    # --- exercise 4: end ---


def _check_gamma(gamma, n_experts):
    gamma = [float(g) for g in gamma]
    if len(gamma) != n_experts:
        raise ValueError(f"drift_loss: gamma has {len(gamma)} values {gamma}, expected one per expert ({n_experts})")
    if any(g < 0 or g != g for g in gamma):
        raise ValueError(f"drift_loss: gamma {gamma} must be non-negative")
    return gamma


def _per_expert_sq_norm(t):
    """Squared Frobenius norm of every expert's slice of a stacked [E, ...] tensor -> [E] (plain tensor).

    Works when t is an FSDP2 DTensor sharded on dim 0 (each rank holds some experts, maybe unevenly):
    the per-expert sums are local, and full_tensor() all-gathers the E values (differentiably)."""
    sq = t.pow(2).sum(dim=tuple(range(1, t.dim())))  # [E]
    return sq.full_tensor() if hasattr(sq, "full_tensor") else sq


def _like(w0, w):
    """W0 as a tensor that can be subtracted from parameter w (a DTensor under FSDP2, or the plain
    unsharded tensor FSDP2 shows between forward and backward when it does not reshard)."""
    if hasattr(w0, "device_mesh") and not hasattr(w, "device_mesh"):
        return w0.full_tensor()
    if hasattr(w, "device_mesh") and not hasattr(w0, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        # every rank holds the same full W0 (same checkpoints): each keeps its own shard, no communication
        return distribute_tensor(w0.to(w.dtype), w.device_mesh, w.placements, src_data_rank=None)
    return w0


def _sqrt_safe(sq):
    """sqrt with gradient 0 (not NaN) at 0: d||W - W0||/dW is undefined at W = W0, the start of training."""
    positive = sq > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, sq, torch.ones_like(sq))), torch.zeros_like(sq))


def drift_loss(model, initial_expert_weights, gamma, kind="drift"):
    """L_R(gamma) = sum_i gamma_i * sum_{W in expert i} ||W - W_i^0||_F / n_layers       (kind="drift")
                    sum_i gamma_i * sum_{W in expert i} ||W||_F / n_layers             (kind="decay")

    W runs over the expert's three matrices (w1, w2, w3) in every MoE layer; ||.||_F is the Frobenius
    norm, not squared. W_i^0 = initial_expert_weights (moe.snapshot_expert_weights, taken when the fused
    model was built = the aligned model i's FFN). gamma: one non-negative value per expert, in expert
    order (helpful, harmless, honest). A larger gamma_i keeps expert i closer to aligned model i; the
    decay reading shrinks the weights themselves (too large a gamma collapses the expert to zero).
    Works unchanged with FSDP2-sharded experts (see _per_expert_sq_norm). Returns a float32 scalar.
    """
    # --- exercise 5: begin ---
    if kind not in ("drift", "decay"):
        raise ValueError(f"drift_loss: kind={kind!r}; expected 'drift' or 'decay'")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("drift_loss: the model has no MoE layer")
    gamma = _check_gamma(gamma, layers[0][1].n_experts)
    norms = 0.0
    for name, m in layers:
        for w_name in EXPERT_MATRICES:
            w = getattr(m, w_name)  # [E, ...]
            if kind == "drift":
                key = f"{name}.{w_name}"
                if key not in initial_expert_weights:
                    raise KeyError(f"drift_loss: no initial weight for {key}; take moe.snapshot_expert_weights(model) "
                                   f"of this model right after building it")
                w0 = _like(initial_expert_weights[key], w)
                if tuple(w0.shape) != tuple(w.shape):
                    raise ValueError(f"drift_loss: {key} is {tuple(w.shape)} but its initial weight is {tuple(w0.shape)}")
                w = w - w0.detach()
            norms = norms + _sqrt_safe(_per_expert_sq_norm(f32(w)))  # [E]
    g = torch.tensor(gamma, dtype=norms.dtype, device=norms.device)  # [E]
    return (g * norms).sum() / len(layers)
    # --- exercise 5: end ---


def load_balance_loss(router_probs_per_layer, expert_idx_per_layer, mask=None):
    """Switch Transformer's auxiliary loss (Fedus et al. 2021), averaged over layers:
    E * sum_e f_e * P_e, with f_e = the share of (token, slot) assignments that went to expert e and
    P_e = the mean router probability of e, both over real tokens (mask [B, T], None = all).
    router_probs_per_layer: L x [B, T, E] (MoE.router_probs); expert_idx_per_layer: L x [B, T, k]
    (MoE.expert_idx, the experts actually used). 1 for perfectly uniform routing, up to E when it
    collapses onto one expert; only P carries gradient. Not part of H3Fusion (which wants routing by task).
    """
    losses = []
    for probs, expert_idx in zip(router_probs_per_layer, expert_idx_per_layer, strict=True):
        E, k = probs.shape[-1], expert_idx.shape[-1]
        flat = f32(probs.reshape(-1, E))  # [N, E]
        m = torch.ones(flat.shape[0], device=flat.device) if mask is None else mask.reshape(-1).to(flat.dtype)  # [N]
        assigned = torch.zeros_like(flat).scatter(1, expert_idx.reshape(-1, k), 1.0)  # [N, E] 1 where routed
        n = m.sum().clamp(min=1)
        f = (assigned * m[:, None]).sum(0) / (n * k)  # [E] share of assignments
        P = (flat * m[:, None]).sum(0) / n  # [E] mean probability
        losses.append(E * (f * P).sum())
    return torch.stack(losses).mean()


def router_z_loss(router_logits_per_layer, mask=None):
    """ST-MoE's router z-loss (Zoph et al. 2022): mean over real tokens and layers of logsumexp(logits)^2.
    Keeps router logits small (numerically stable softmax); does not change which expert wins."""
    losses = []
    for logits in router_logits_per_layer:  # [B, T, E]
        z = torch.logsumexp(f32(logits), dim=-1).pow(2)  # [B, T]
        if mask is None:
            losses.append(z.mean())
        else:
            m = mask.to(z.dtype)  # [B, T]
            losses.append((z * m).sum() / m.sum().clamp(min=1))
    return torch.stack(losses).mean()
