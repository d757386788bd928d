"""H3Fusion's Mixture-of-Experts layer:
a router, top-k gating, and the experts run as one batched dispatch.

H3Fusion (Tekin et al., arXiv 2411.17792) fine-tunes three copies of one base LLaMA, each on one
alignment dimension (helpful, harmless, honest), training only their feed-forward (FFN) weights. The
three models therefore differ only in their FFNs, so they can be fused into one model: embeddings,
attention, norms and output head from the base, and in every block an MoE layer whose expert i is
the FFN of aligned model i, chosen per token by a new linear router.

Paper equation -> code:
    router          g(x) = softmax(W_g x)                     route()         [N, E] float32
    top-k gate      G(x) = renormalised top-k of g(x)         select_top_k()  [N, k]
    MoE output      y = sum_{i in top-k} G_i(x) * E_i(x)      MoE.forward     [B, T, D]
    expert          E_i(x) = W2_i (silu(W1_i x) * W3_i x)     swiglu()        (SwiGLU, as LLaMA)
    same, densely   every expert on every token, masked by G  dense_moe_reference() (tests, bench)
    fusion          E_i := FFN of aligned model i             fusion.py fuse_state_dicts
    W_i^0 for L_R   expert weights as loaded                  snapshot_expert_weights()
The losses L_CE, L_G and L_R live in losses.py; they read `MoE.router_probs` of every layer.

How a batch flows through MoE.forward (N = B*T tokens, k experts per token, D model dim, H hidden):

    x [N, D] --router--> probs [N, E] --top-k--> expert_idx [N, k], expert_weight [N, k]
    (token, slot) pairs, N*k of them, sorted by expert:   sort_by_expert()
        rows [N*k] = which token each sorted row came from, counts [E] = rows per expert
    x_sorted = x[rows]                                    [N*k, D]  rows of expert 0, then 1, ...
    h = silu(x_sorted @ W1[e]^T) * (x_sorted @ W3[e]^T)   [N*k, H]  one grouped matmul each
    y_sorted = h @ W2[e]^T * weight                       [N*k, D]
    out = zeros[N, D].index_add(rows, y_sorted)           [N, D]    each token sums its k rows

No token is ever dropped (no capacity factor): an expert gets however many rows the router sends it,
possibly none. "Grouped matmul" = for every expert e, the block of rows that belongs to e
times W[e]^T.
Two interchangeable implementations (same numbers, tested against each other):
    dispatch_grouped  the whole sorted buffer through torch._grouped_mm (one call per weight matrix)
    dispatch_slices   one expert at a time on its slice of the sorted rows (plain PyTorch,
                      any dtype)
MoE.backend = "auto" picks per device which one runs (see pick_backend()).

Read top to bottom: 1. routing, 2. dispatch (the plain version), 3. the MoE layer, 4. helpers the
losses and the evaluation use, 5. the fast path (torch._grouped_mm), which a first reading can skip.
This file imports nothing from the project: model.py builds its blocks from it.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# 1. Routing: softmax over all experts, top-k, renormalise


def select_top_k(probs, top_k: int):
    """probs [N, E] -> (expert_idx [N, k], expert_weight [N, k]): the k most probable experts of
    each token and their probabilities renormalised to sum to 1. Ties go to the lower expert index
    (a stable sort), so routing is deterministic: with a zero router every token goes to experts
    0 .. k-1."""
    # --- exercise 2: begin ---
    sorted_probs, sorted_idx = torch.sort(probs, dim=-1, descending=True, stable=True)  # [N, E]
    top_probs, expert_idx = sorted_probs[:, :top_k], sorted_idx[:, :top_k]  # [N, k]
    expert_weight = top_probs / top_probs.sum(dim=-1, keepdim=True)  # [N, k], rows sum to 1
    return expert_idx, expert_weight
    # --- exercise 2: end ---


def route(router_logits, top_k: int, forced_expert=None):
    """Router logits [N, E] -> (probs [N, E], expert_idx [N, k] long, expert_weight [N, k]),
    float32 (float64 in).

    probs is the full softmax over all E experts (what the gating loss L_G and the analysis read).
    The k largest probabilities are kept and renormalised to sum to 1 (select_top_k), so an MoE of E
    identical experts computes exactly that expert, whatever the router says.
    forced_expert = i sends every token to expert i alone with weight 1.0 (probs are still the
    router's).
    """
    # --- exercise 2: begin ---
    probs = torch.softmax(router_logits.to(at_least_float32(router_logits.dtype)), dim=-1)  # [N, E]
    if forced_expert is not None:
        N = probs.shape[0]
        expert_idx = torch.full((N, 1), forced_expert, dtype=torch.long,
                                device=probs.device)  # [N, 1]
        expert_weight = torch.ones(N, 1, dtype=probs.dtype, device=probs.device)  # [N, 1]
        return probs, expert_idx, expert_weight
    expert_idx, expert_weight = select_top_k(probs, top_k)  # [N, k] [N, k]
    return probs, expert_idx, expert_weight
    # --- exercise 2: end ---


# --------------------------------------------------------------------------------------------------
# 2. Dispatch: group the (token, slot) pairs by expert


def sort_by_expert(expert_idx, n_experts: int):
    """expert_idx [N, k] -> (order [N*k], rows [N*k], counts [E]).

    The N*k (token, slot) pairs are flattened token-major (pair p = token p // k, slot p % k) and
    sorted by expert with a stable sort, so inside each expert's block the tokens stay in their
    original order.
    order[j] = which pair sits in sorted row j; rows[j] = the token it came from;
    counts[e] = rows of e.
    """
    # --- exercise 3: begin ---
    k = expert_idx.shape[1]
    flat_expert = expert_idx.reshape(-1)  # [N*k]
    order = torch.argsort(flat_expert, stable=True)  # [N*k]
    rows = order // k  # [N*k] token index of each sorted row
    counts = torch.bincount(flat_expert, minlength=n_experts)  # [E]
    return order, rows, counts
    # --- exercise 3: end ---


def swiglu(x, w1, w2, w3):
    """One expert, LLaMA's SwiGLU FFN: W2 (silu(W1 x) * W3 x).
    x [n, D], w1/w3 [H, D], w2 [D, H] -> [n, D]"""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)  # [n, D]


def dispatch_slices(x_flat, rows, row_weight, counts, w1, w2, w3):
    """Run the experts on the sorted rows and add each row back to its token: expert e takes its
    slice of the sorted rows (counts[e] of them), computes SwiGLU, weights each row by its gate
    value, and scatter-adds the result. Plain PyTorch, any dtype and device. unbind(0) hands out the
    E expert matrices as views whose gradients are stacked back in one piece. (dispatch_grouped,
    section 5, does the same in one call.)"""
    # --- exercise 3: begin ---
    sizes = counts.tolist()  # E python ints (a host sync on GPUs)
    out = torch.zeros_like(x_flat)  # [N, D]
    per_expert = zip(rows.split(sizes), row_weight.split(sizes),
                     w1.unbind(0), w2.unbind(0), w3.unbind(0))
    for rows_e, weight_e, w1_e, w2_e, w3_e in per_expert:  # [n_e] [n_e] [H, D] [D, H] [H, D]
        y = swiglu(x_flat.index_select(0, rows_e), w1_e, w2_e, w3_e)  # [n_e, D]
        y = y * weight_e[:, None].to(y.dtype)  # [n_e, D]
        out.index_add_(0, rows_e, y.to(out.dtype))  # [N, D] in x's dtype (float32 under autocast)
    return out
    # --- exercise 3: end ---


# --------------------------------------------------------------------------------------------------
# 3. The MoE layer


class MoE(nn.Module):
    """Top-k mixture of E SwiGLU experts; takes the place of model.FeedForward in a
    TransformerBlock.

    Parameters (names = keys in the fused checkpoint, under layers.N.feed_forward.):
        router.weight  [E, dim]           W_g (no bias)
        w1, w3         [E, hidden, dim]   expert e's FeedForward.w1 / w3 weights, stacked
        w2             [E, dim, hidden]   expert e's FeedForward.w2 weight, stacked

    Why stacked parameters rather than a ModuleList of FeedForwards: under data parallelism
    (FSDP/DDP) every rank must take part in the gradient reduction of every parameter. With one
    module per expert, a rank whose batch routes no token to expert e never uses e's parameters,
    skips their reduction (or reduces a None) and the ranks silently end up with different, wrong
    gradients. A stacked parameter is always used, its gradient always exists (zero rows for idle
    experts), and it is reduced like any other tensor. It also lets all experts run as one grouped
    matmul.

    After every forward the layer keeps, for the losses and for analysis (no hooks needed):
        router_logits  [B, T, E] float32   W_g x   (float64 when x is float64)
        router_probs   [B, T, E] float32   softmax over all E experts (still in the autograd graph)
        expert_idx     [B, T, k] long      the experts each token was sent to (detached)
    forced_expert: None, or i to send every token to expert i with weight 1.0.
    backend: "auto" | "grouped_mm" | "slices" -- how the experts run
             (dispatch_grouped / dispatch_slices).
    """

    def __init__(self, dim: int, hidden_dim: int, n_experts: int, top_k: int):
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"MoE: n_experts={n_experts}; expected >= 1")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"MoE: top_k={top_k}; expected 1 <= top_k <= n_experts={n_experts}")
        self.dim, self.hidden_dim, self.n_experts, self.top_k = dim, hidden_dim, n_experts, top_k
        self.router = nn.Linear(dim, n_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden_dim, dim))
        self.forced_expert = None
        self.backend = "auto"
        self.router_logits = self.router_probs = self.expert_idx = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Each expert initialised like an nn.Linear of its shape; the router at zero (uniform
        routing). (Transformer.init_weights re-initialises everything; fused models load their
        weights.)"""
        if self.w1.device.type == "meta":
            return
        for w in (self.w1, self.w2, self.w3):
            # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            bound = 1 / math.sqrt(w.shape[2])
            nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.router.weight)

    def extra_repr(self):
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"n_experts={self.n_experts}, top_k={self.top_k}")

    def forward(self, x):
        # --- exercise 3: begin ---
        B, T, D = x.shape
        x_flat = x.reshape(B * T, D)  # [N, D]
        # router in float32 (autocast off): E is tiny, and bf16 logits would make near-ties and
        # routing flips common
        router_dtype = at_least_float32(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x_flat.to(router_dtype),
                              self.router.weight.to(router_dtype))  # [N, E]
        probs, expert_idx, expert_weight = route(logits, self.top_k,
                                                 self.forced_expert)  # [N,E] [N,k] [N,k]
        self.router_logits = logits.view(B, T, -1)  # [B, T, E]
        self.router_probs = probs.view(B, T, -1)  # [B, T, E]
        self.expert_idx = expert_idx.detach().view(B, T, -1)  # [B, T, k]

        order, rows, counts = sort_by_expert(expert_idx, self.n_experts)  # [N*k] [N*k] [E]
        row_weight = expert_weight.reshape(-1).index_select(0, order)  # [N*k], one per sorted row
        out = self.run_experts(x_flat, rows, row_weight, counts)  # [N, D]
        return out.view(B, T, D)  # [B, T, D]
        # --- exercise 3: end ---

    def run_experts(self, x_flat, rows, row_weight, counts):
        """[N, D]: every expert on its block of the sorted rows, each row weighted by its gate value
        and added back to its token, by dispatch_grouped or dispatch_slices (pick_backend).
        (engineering/lora.py's LoRAMoE overrides this method: there every expert matrix also has a
        low-rank delta.)"""
        if pick_backend(x_flat, self.w1, self.w2, self.backend) == "grouped_mm":
            return dispatch_grouped(x_flat, rows, row_weight, counts, self.w1, self.w2, self.w3)
        return dispatch_slices(x_flat, rows, row_weight, counts, self.w1, self.w2, self.w3)

    @property
    def forced_expert(self):
        """None (the router's top-k), or i: every token to expert i with weight 1.0.
        Checked once, when set."""
        return self._forced_expert

    @forced_expert.setter
    def forced_expert(self, expert):
        if expert is not None and not 0 <= expert < self.n_experts:
            raise ValueError(f"MoE.forced_expert={expert}; "
                             f"expected None or 0..{self.n_experts - 1}")
        self._forced_expert = expert


# --------------------------------------------------------------------------------------------------
# 4. The same layer computed densely (the reference); helpers (dtypes, a model's MoE layers)


def dense_moe_reference(moe: MoE, x):
    """The same function as MoE.forward, computed the slow, obvious way: every expert on every
    token, then a dense gate [N, E] that is zero outside each token's top-k. E/k times the FLOPs of
    the sparse dispatch (1.5x for E=3, k=2). Used by the tests (as an independent check of the
    sorted dispatch) and by the benchmark. Does not store router_probs on the module.
    """
    B, T, D = x.shape
    x_flat = x.reshape(B * T, D)  # [N, D]
    router_dtype = at_least_float32(x.dtype)
    logits = F.linear(x_flat.to(router_dtype), moe.router.weight.to(router_dtype))  # [N, E]
    _, expert_idx, expert_weight = route(logits, moe.top_k, moe.forced_expert)  # [N, k] [N, k]
    gate = torch.zeros_like(logits).scatter(1, expert_idx, expert_weight)  # [N, E], k nonzeros/row
    h = (F.silu(torch.einsum("nd,ehd->enh", x_flat, moe.w1))
         * torch.einsum("nd,ehd->enh", x_flat, moe.w3))  # [E, N, H]
    y = torch.einsum("enh,edh->end", h, moe.w2)  # [E, N, D] every expert's output for every token
    out = torch.einsum("ne,end->nd", gate.to(y.dtype), y)  # [N, D]
    return out.view(B, T, D)  # [B, T, D]


def at_least_float32(dtype):
    """float32 for bf16/fp16/fp32, float64 stays float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def moe_layers(model) -> list:
    """All MoE layers of a model, in forward order (layer 0 first)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def collect_router_probs(model) -> list:
    """router_probs [B, T, E] of every MoE layer from the last forward
    (the input of losses.gating_loss)."""
    layers = moe_layers(model)
    if not layers or any(m.router_probs is None for m in layers):
        raise RuntimeError("collect_router_probs: "
                           "run a forward through a model with MoE layers first")
    return [m.router_probs for m in layers]


def set_forced_expert(model, expert):
    """Force every MoE layer of `model` to route all tokens to `expert` with weight 1 (None restores
    the router's top-k routing); returns `model`. A dense model (no MoE layer) or an expert out of
    range (MoE.forced_expert checks it) is a ValueError."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError("set_forced_expert: the model has no MoE layers "
                         "(it is dense; expected a fused checkpoint)")
    for m in layers:
        m.forced_expert = expert
    return model


EXPERT_MATRICES = ("w1", "w2", "w3")


def expert_parameters(model) -> dict:
    """{parameter name: stacked expert tensor} for every MoE layer
    (names as in model.named_parameters)."""
    return {f"{name}.{w}": getattr(m, w) for name, m in model.named_modules() if isinstance(m, MoE)
            for w in EXPERT_MATRICES}


@torch.no_grad()
def snapshot_expert_weights(model) -> dict:
    """W_i^0 for the drift loss L_R: a detached copy of every stacked expert weight, keyed by
    parameter name. Take it right after build_fused_model (before training moves the experts). Taken
    after FSDP's fully_shard it holds the local shards as DTensors; losses.drift_loss accepts
    either."""
    return {name: p.detach().clone() for name, p in expert_parameters(model).items()}


# --------------------------------------------------------------------------------------------------
# 5. The fast path: all experts in one torch._grouped_mm call per weight matrix


def matmul_dtype(x):
    """The dtype the expert matmuls run in: autocast's (bf16 on one GPU, where weights and the
    residual stream stay float32) when autocast is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x, w) -> bool:
    """Can torch._grouped_mm compute x [M, in] times w[e]^T (w [E, out, in])
    here, in matmul_dtype(x)?

    Checked on torch 2.13: on CPU it supports float32, bfloat16 and float16 (not float64), forward
    and backward, empty groups included, but every row stride must be a multiple of 16 bytes (so
    `in` and `out` must be multiples of 4 in float32, of 8 in bf16), and offsets must be int32.
    (Its backward also rejects a gradient with zero strides, e.g. from out.sum(); inside MoE.forward
    it never sees one.)
    On CUDA its kernels are for bfloat16 on compute capability 8.0+.
    """
    dtype = matmul_dtype(x)
    if (not hasattr(torch, "_grouped_mm")
            or (x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type))):
        return False
    if x.device.type == "cpu":
        ok_dtype = dtype in (torch.float32, torch.bfloat16, torch.float16)
    elif x.device.type == "cuda":
        ok_dtype = dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    else:
        ok_dtype = False
    align = 16 // dtype.itemsize
    return ok_dtype and w.shape[1] % align == 0 and w.shape[2] % align == 0


def grouped_linear(x_sorted, w, counts):
    """The grouped matmul, one torch._grouped_mm call. x_sorted [M, in] holds counts[0] rows for
    expert 0, then counts[1] rows for expert 1, ...; w [E, out, in]. Row j of the result [M, out] =
    x_sorted[j] @ w[e]^T for the expert e whose block holds row j. No host sync: the offsets stay on
    the device."""
    offsets = torch.cumsum(counts, dim=0).to(torch.int32)  # [E] end row of each expert's block
    return torch._grouped_mm(x_sorted, w.transpose(-2, -1), offs=offsets)  # [M, out]


def dispatch_grouped(x_flat, rows, row_weight, counts, w1, w2, w3):
    """All experts at once: gather the sorted rows, three grouped matmuls, weight, scatter-add back.
    The matmuls run in matmul_dtype(x_flat): autocast does not cover torch._grouped_mm, so we
    cast."""
    # --- exercise 3: begin ---
    dtype = matmul_dtype(x_flat)
    w1, w2, w3 = w1.to(dtype), w2.to(dtype), w3.to(dtype)  # no-ops unless autocast is on
    x_sorted = x_flat.index_select(0, rows).to(dtype)  # [M, D] expert 0's rows, then 1's, ...
    gate = grouped_linear(x_sorted, w1, counts)  # [M, H]
    up = grouped_linear(x_sorted, w3, counts)  # [M, H]
    y_sorted = grouped_linear(F.silu(gate) * up, w2, counts)  # [M, D]
    y_sorted = y_sorted * row_weight[:, None].to(y_sorted.dtype)  # [M, D]
    # accumulate in x's dtype: under bf16 autocast x (the residual stream) is float32, the experts'
    # output bf16; each token sums its k rows
    return torch.zeros_like(x_flat).index_add_(0, rows, y_sorted.to(x_flat.dtype))  # [N, D]
    # --- exercise 3: end ---


# How "auto" runs the experts. Measured with bench/bench_moe.py on this project's shared 2-core CPU
# (torch 2.13, T=4096, dim 512, hidden 1376, E=3, k=2, float32, forward+backward, CPU time of 1
# thread, median of 15): dispatch_slices 1.03x the "ideal" pre-grouped expert matmuls,
# dispatch_grouped 1.11x (its silu/mul run on one [N*k, H] buffer, three times an expert's), the
# HF-style per-expert loop 1.01x. On CUDA, _grouped_mm is one kernel and needs no host sync. So:
# _grouped_mm on CUDA where supported, slices elsewhere.
BACKENDS = ("auto", "grouped_mm", "slices")


def pick_backend(x, w1, w2, backend="auto"):
    """"grouped_mm" or "slices": how MoE.backend ("auto" picks by device and dtype)
    runs the experts."""
    if backend not in BACKENDS:
        raise ValueError(f"MoE.backend={backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        fast = x.device.type == "cuda" and all(grouped_mm_supported(x, w) for w in (w1, w2))
        return "grouped_mm" if fast else "slices"
    return backend
