"""LoRA (Hu et al. 2021, arXiv 2106.09685) from scratch: how the H3Fusion authors trained both
stages on one GPU.

A weight W [out, in] stays frozen and learns a low-rank delta instead:

    W' = W + (alpha / r) * B A          A [r, in] random, B [out, r] = 0: step 0 is exactly W
    W' x = W x + (alpha / r) * B (A x)  what the forward computes (lora_linear): W' is never formed

Stage 1 (train_expert.py --lora-rank r): a delta on each of the three FFN matrices of every block
(the authors: r = 8, alpha = 4), nothing else trains. Stage 2 (fuse.py --lora-rank r): a delta on
each expert's stacked matrices W [E, out, in], one low-rank pair per expert and matrix
(A [E, r, in], B [E, out, r]); the router trains in full. Both are ordinary parameters of the block
they sit in, so FSDP2 shards them with it (stacked ones on dim 1, like the experts) and AdamW's
state is that of the deltas alone. Trainable parameters stay float32; frozen ones keep the dtype
the model was loaded in (bf16 on CUDA: they are never copied to float32).

LoRA reaches into the method from outside: a dense FFN's nn.Linear is replaced by LoRALinear, and
an MoE layer by LoRAMoE, a subclass of moe.MoE that takes over its parameters (same tensors, same
names) and overrides only run_experts, where each expert matmul gains its delta. moe.py and
losses.py know nothing of LoRA.

Read top to bottom:
  1. LoRA, lora_linear, LoRALinear   the two factors of one delta; x W'^T without W'; a frozen
                                     nn.Linear + delta
  2. LoRAMoE                         the experts of an MoE layer, each matrix with its delta (the
                                     sorted dispatch)
  3. add_lora, init_lora             put the deltas on a model's FFNs (dense) or experts (fused);
                                     A random, B = 0
  4. merge_lora                      W + (alpha / r) B A in a gathered state dict: saved
                                     checkpoints stay plain
  5. L_R on the delta                lora_drift_loss: losses.drift_loss's equation with
                                     ||W' - W^0|| read from the factors (W - W^0 = the delta, since
                                     W itself is frozen at W^0)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from engineering.distributed import local_rows
from losses import f32, safe_sqrt
from moe import (EXPERT_MATRICES, MoE, expert_parameters, grouped_mm_supported, grouped_linear,
                 matmul_dtype, moe_layers, pick_backend)

# --------------------------------------------------------------------------------------------------
# 1. The parameters of a delta


class LoRA(nn.Module):
    """The trainable factors of the delta (alpha / r) B A of one weight of shape [..., out, in]; a
    stacked expert weight [E, out, in] gets one pair per expert: A [E, r, in], B [E, out, r]."""

    def __init__(self, weight_shape, rank: int, alpha: float, device=None, dtype=torch.float32):
        super().__init__()
        *stack, out_dim, in_dim = weight_shape
        self.A = nn.Parameter(torch.empty(*stack, rank, in_dim,
                                          device=device, dtype=dtype))  # [..., r, in]
        self.B = nn.Parameter(torch.empty(*stack, out_dim, rank,
                                          device=device, dtype=dtype))  # [..., out, r]
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}"


def lora_linear(x, w, A, B, scale: float):
    """x W'^T = x W^T + scale (x A^T) B^T for one weight w [out, in] and its factors A [r, in],
    B [out, r]: the same as x (W + scale B A)^T, without forming the sum. (The float32 factors run
    in x's dtype: a bf16 model outside autocast, as in the router-init forward.)"""
    return (F.linear(x, w)
            + scale * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype)))  # [n, out]


class LoRALinear(nn.Module):
    """A bias-free nn.Linear whose weight is frozen, plus a delta:
    y = x W^T + (alpha / r) (x A^T) B^T. The weight keeps its name (`...w1.weight`), so the model's
    other parameter names do not change."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.weight = linear.weight.requires_grad_(False)  # [out, in], the same tensor (no copy)
        self.lora = LoRA(self.weight.shape, rank, alpha, device=self.weight.device)

    def forward(self, x):
        return lora_linear(x, self.weight, self.lora.A, self.lora.B, self.lora.scale)  # [..., out]


# --------------------------------------------------------------------------------------------------
# 2. An MoE layer whose experts learn deltas


class LoRAMoE(MoE):
    """moe.MoE with every stacked expert matrix frozen and a delta per expert and matrix: expert e
    computes W[e] + scale B[e] A[e] for w1, w2, w3. Routing is MoE's own; only run_experts
    differs."""

    def __init__(self, moe: MoE, rank: int, alpha: float):
        # (its parameters are the MoE's own, taken over below: nothing is allocated)
        with torch.device("meta"):
            super().__init__(moe.dim, moe.hidden_dim, moe.n_experts, moe.top_k)
        self.router, self.w1, self.w2, self.w3 = moe.router, moe.w1, moe.w2, moe.w3
        self.forced_expert, self.backend = moe.forced_expert, moe.backend
        self.lora = nn.ModuleDict({w: LoRA(getattr(moe, w).shape, rank, alpha, moe.w1.device)
                                   for w in EXPERT_MATRICES})
        for w in EXPERT_MATRICES:
            getattr(self, w).requires_grad_(False)

    def deltas(self) -> list:
        """(A [E, r, in], B [E, out, r], scale) of w1, w2, w3."""
        return [(self.lora[w].A, self.lora[w].B, self.lora[w].scale) for w in EXPERT_MATRICES]

    def run_experts(self, x_flat, rows, row_weight, counts):
        weights, deltas = (self.w1, self.w2, self.w3), self.deltas()
        # the deltas' factors: their rank must suit _grouped_mm too
        factors = [t for A, B, _ in deltas for t in (A, B)]
        grouped = pick_backend(x_flat, self.w1, self.w2, self.backend) == "grouped_mm" and (
            self.backend == "grouped_mm" or all(grouped_mm_supported(x_flat, t) for t in factors))
        dispatch = dispatch_grouped_with_deltas if grouped else dispatch_slices_with_deltas
        return dispatch(x_flat, rows, row_weight, counts, weights, deltas)  # [N, D]


def dispatch_slices_with_deltas(x_flat, rows, row_weight, counts, weights, deltas):
    """moe.dispatch_slices with each expert matmul x W[e]^T + scale (x A[e]^T) B[e]^T."""
    sizes = counts.tolist()
    out = torch.zeros_like(x_flat)  # [N, D]
    (w1, w2, w3), ((A1, B1, s1), (A2, B2, s2), (A3, B3, s3)) = weights, deltas
    for e, (rows_e, weight_e) in enumerate(zip(rows.split(sizes), row_weight.split(sizes))):
        x_e = x_flat.index_select(0, rows_e)  # [n_e, D]
        gate, up = (lora_linear(x_e, w1[e], A1[e], B1[e], s1),
                    lora_linear(x_e, w3[e], A3[e], B3[e], s3))  # [n_e, H]
        y = lora_linear(F.silu(gate) * up, w2[e], A2[e], B2[e], s2)  # [n_e, D]
        y = y * weight_e[:, None].to(y.dtype)
        out.index_add_(0, rows_e, y.to(out.dtype))
    return out


def grouped_linear_with_delta(x_sorted, w, A, B, scale, counts):
    """moe.grouped_linear plus each expert's delta: two more grouped matmuls through the rank-r
    space."""
    low = grouped_linear(x_sorted, A.to(x_sorted.dtype), counts)  # [M, r]
    return (grouped_linear(x_sorted, w, counts)
            + scale * grouped_linear(low, B.to(x_sorted.dtype), counts))


def dispatch_grouped_with_deltas(x_flat, rows, row_weight, counts, weights, deltas):
    """moe.dispatch_grouped with each grouped matmul plus its delta
    (grouped_linear_with_delta)."""
    dtype = matmul_dtype(x_flat)
    w1, w2, w3 = (w.to(dtype) for w in weights)  # no-ops unless autocast is on
    (A1, B1, s1), (A2, B2, s2), (A3, B3, s3) = deltas
    x_sorted = x_flat.index_select(0, rows).to(dtype)  # [M, D]
    gate = grouped_linear_with_delta(x_sorted, w1, A1, B1, s1, counts)  # [M, H]
    up = grouped_linear_with_delta(x_sorted, w3, A3, B3, s3, counts)  # [M, H]
    y_sorted = grouped_linear_with_delta(F.silu(gate) * up, w2, A2, B2, s2, counts)  # [M, D]
    y_sorted = y_sorted * row_weight[:, None].to(y_sorted.dtype)
    return torch.zeros_like(x_flat).index_add_(0, rows, y_sorted.to(x_flat.dtype))  # [N, D]


# --------------------------------------------------------------------------------------------------
# 3. Putting deltas on a model


def add_lora(model, rank: int, alpha: float):
    """Give every block's FFN matrices (a dense model: stage 1) or its stacked expert matrices (an
    MoE: stage 2) a LoRA delta and freeze those matrices; returns the model. Whatever else the
    caller left trainable (fuse.py: the router) stays so, in float32 like the deltas. Call it before
    distributed.shard_model (FSDP2 must see the deltas as the block's parameters) and init_lora once
    the model has its storage (on the meta device it has none)."""
    for block in model.layers:
        ffn = block.feed_forward
        if isinstance(ffn, MoE):
            block.feed_forward = LoRAMoE(ffn, rank, alpha)
        else:
            for w in EXPERT_MATRICES:
                setattr(ffn, w, LoRALinear(getattr(ffn, w), rank, alpha))
    for p in model.parameters():
        # (the router of a bf16 model; float32 and float64 stay)
        if p.requires_grad and p.dtype.itemsize < 4:
            p.data = p.data.float()
    return model


def is_lora_name(name: str) -> bool:
    """Is this parameter name one of a delta's factors (`...lora.A`, `...lora.w1.B`)?"""
    return ".lora." in name


def lora_modules(model) -> list:
    return [m for m in model.modules() if isinstance(m, LoRA)]


@torch.no_grad()
def init_lora(model, seed: int = 0):
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's default, as in PEFT), B = 0: the model computes
    exactly what it computes without the deltas. Each A is drawn whole from its own seeded generator
    and each rank keeps its rows of it, so one process and any number of FSDP ranks start from the
    same values. No-op on a model without deltas."""
    for i, lora in enumerate(lora_modules(model)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + i)
        bound = 1 / math.sqrt(lora.A.shape[-1])
        full_A = ((torch.rand(lora.A.shape, generator=generator, dtype=torch.float64) * 2 - 1)
                  * bound)  # [..., r, in]
        local, start, stop = local_rows(lora.A)
        local.copy_(full_A[:, start:stop] if lora.A.dim() == 3 else full_A[start:stop])
        local_rows(lora.B)[0].zero_()


# --------------------------------------------------------------------------------------------------
# 4. Merging: checkpoints stay plain


def lora_targets(model) -> dict:
    """{name of an adapted weight: (name prefix of its A and B, scale)}, in the names of
    model.state_dict()."""
    targets = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            targets[f"{name}.weight"] = (f"{name}.lora", m.lora.scale)
        elif isinstance(m, LoRAMoE):
            targets.update({f"{name}.{w}": (f"{name}.lora.{w}", m.lora[w].scale)
                            for w in EXPERT_MATRICES})
    return targets


def merge_lora(state: dict, targets: dict) -> dict:
    """A gathered state dict (full tensors) with every delta merged: W := W + (alpha / r) B A, in
    float32 (float64 stays float64), stored in W's dtype; the A and B entries are gone, so the
    result is an ordinary dense or fused checkpoint. targets = lora_targets(model); {} leaves the
    state as it is."""
    merged = dict(state)
    for weight_name, (prefix, scale) in targets.items():
        A, B, W = merged.pop(f"{prefix}.A"), merged.pop(f"{prefix}.B"), merged[weight_name]
        dtype = torch.promote_types(W.dtype, torch.float32)
        merged[weight_name] = (W.to(dtype)
                               + scale * (B.to(dtype) @ A.to(dtype))).to(W.dtype)  # [..., out, in]
    return merged


# --------------------------------------------------------------------------------------------------
# 5. L_R on the delta, without forming W


def expert_loras(model) -> dict:
    """{stacked expert weight name (as in moe.expert_parameters): its LoRA} for every MoE layer with
    deltas."""
    return {f"{name}.{w}": m.lora[w] for name, m in model.named_modules()
            if isinstance(m, LoRAMoE) for w in EXPERT_MATRICES}


def lora_drift_loss(model, initial_expert_weights, gamma, kind="drift"):
    """losses.drift_loss for a model whose experts carry LoRA deltas (fuse.py --lora-rank passes it
    to the objective in drift_loss's place): the same
    L_R(gamma) = sum_i gamma_i sum_{W in expert i} ||W' - W_i^0||_F / n_layers, with each norm read
    from the factors (lora_squared_norms; W' never formed). W^0 is the frozen W itself, so
    initial_expert_weights is not read."""
    norms, loras = 0.0, expert_loras(model)
    # w [E, out, in]: the frozen W = W^0 of every expert
    for name, w in expert_parameters(model).items():
        norms = norms + safe_sqrt(lora_squared_norms(loras[name], w, kind))  # [E]
    g = torch.tensor(gamma, dtype=norms.dtype, device=norms.device)  # [E]
    return (g * norms).sum() / len(moe_layers(model))


def lora_squared_norms(lora: LoRA, w, kind: str = "drift"):
    """Per expert e, the squared Frobenius norm L_R takes the root of, from r x r products only:

        drift   ||W'_e - W_e^0||^2 = ||s B_e A_e||^2 = s^2 sum((B_e^T B_e) * (A_e A_e^T))
        decay   ||W'_e||^2 = ||W_e||^2 + 2 s <B_e^T W_e, A_e> + s^2 ||B_e A_e||^2

    (drift: W = W^0 is frozen; decay is an extra.) s = alpha / r; lora.A [E, r, in],
    lora.B [E, out, r], w the frozen W [E, out, in]. The factors are tiny: under FSDP2 they are
    gathered whole (differentiably); W stays sharded. Returns [E], float32 (float64 stays)."""
    A, B = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (lora.A, lora.B))
    A, B = f32(A), f32(B)
    sq = lora.scale ** 2 * ((B.mT @ B) * (A @ A.mT)).sum(dim=(-2, -1))  # [E]
    # (W enters in its own dtype: autograd keeps a reference to it, never a copy)
    if kind == "decay":
        w, dtype = w.detach(), A.dtype
        with torch.no_grad():
            w_sq = torch.linalg.vector_norm(w, dim=(-2, -1), dtype=dtype) ** 2  # [E]
        # <B^T W, A> = <W, B A> from the factors as the parameters hold them: under FSDP2 sharded
        # like W (on dim 1), so every operand is a DTensor and the product stays distributed,
        # forward and backward
        cross = ((lora.B.mT.to(w.dtype) @ w).to(dtype)
                 * lora.A.to(dtype)).sum(dim=(-2, -1))  # [E]
        w_sq, cross = (t.full_tensor() if hasattr(t, "full_tensor") else t for t in (w_sq, cross))
        sq = w_sq + 2 * lora.scale * cross + sq
    return sq
