"""Memory per GPU for H3Fusion's stages, by formula: weights, grads, AdamW state, activations, peak.

    python bench/bench_memory.py --preset llama-2-7b --nproc 1,8      # the table (nothing is run)
    python bench/bench_memory.py --dim 512 --n-layers 4 --vocab 8000  # any shape (see --help)
    python bench/bench_memory.py --validate                           # the formula vs CPU peaks

For stage 1 (FFN-only fine-tune of a dense LLaMA), stage 2 (the fused top-k MoE trained on
L_CE + lambda L_G + L_R) and evaluation (bf16 generation with the KV cache), full fine-tune vs LoRA,
one process vs FSDP2 over N ranks, it prints per GPU (GiB): the weights (resident, plus the bf16
working copies of the matmuls), gradients, optimizer state, activations (what autograd saves, plus
the loss's [B, T, V] buffers) and the modelled peak. The peak is not the sum of the columns:
gradients are allocated while the backward frees activations, so the peak is the largest of the
moments walked through in `training_peak` (each layer's backward, the AdamW step).

Every term is one small function below with a docstring saying which tensors it counts. The tensors
autograd saves were found with torch.autograd.graph.saved_tensors_hooks on this project's forward
(model.py, moe.py, losses.py); --validate checks the whole formula against the peak resident memory
(VmHWM) of real training steps on CPU (float32: the code's CPU path), each configuration in a fresh
subprocess, as bench/bench_fuse_memory.py does. The GPU dtypes (bf16 matmuls, float32 master
weights, gradients and moments) are the formula's only; this bench cannot measure them on a CPU
machine.
"""
import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
from bench_fuse_memory import status_kib  # noqa: E402  (VmRSS / VmHWM of this process, in KiB)
from model import ModelArgs, ffn_hidden_dim  # noqa: E402

GIB = 2**30
PRESETS = {"llama-2-7b": dict(dim=4096, n_layers=32, n_heads=32, vocab=32000, multiple_of=256)}
# Default micro-batch: the README's recipe is a global batch of 64 at seq-len 300; FSDP over 8 GPUs
# = 8 per GPU. One GPU would run the same step as 8 micro-steps of 8 (--grad-accum 8), so 8 per
# micro-step throughout.
DEFAULT_MICRO_BATCH = 8
EVAL_BATCH, EVAL_NEW_TOKENS = 64, 128  # evaluate.py's --batch-size and --max-new-tokens (real data)

# --------------------------------------------------------------------------------------------------
# 1. Shapes and parameter counts


@dataclass(frozen=True)
class Shape:
    dim: int
    n_layers: int
    n_heads: int
    vocab: int
    hidden: int
    n_kv_heads: int = 0  # 0 = n_heads
    seq_len: int = 300
    micro_batch: int = DEFAULT_MICRO_BATCH
    lora_rank: int = 8
    experts: int = 3
    top_k: int = 2
    eval_batch: int = EVAL_BATCH
    eval_new_tokens: int = EVAL_NEW_TOKENS

    @property
    def kv_heads(self):
        return self.n_kv_heads or self.n_heads

    @property
    def tokens(self):
        return self.micro_batch * self.seq_len  # N tokens per rank per micro-step


def ffn_hidden(dim: int, multiple_of: int) -> int:
    """The FFN width model.ffn_hidden_dim gives (2/3 of 4*dim, rounded up; LLaMA-2-7B: 11008)."""
    return ffn_hidden_dim(ModelArgs(dim=dim, multiple_of=multiple_of))


def attention_params(s: Shape) -> int:
    """wq, wo [D, D] and wk, wv [kv_heads * head_dim, D] of one block."""
    head_dim = s.dim // s.n_heads
    return 2 * s.dim * s.dim + 2 * s.dim * s.kv_heads * head_dim


def ffn_params(s: Shape) -> int:
    """w1, w3 [H, D] and w2 [D, H] of one FFN (= one expert)."""
    return 3 * s.dim * s.hidden


def dense_params(s: Shape) -> int:
    """The whole dense LLaMA: blocks (attention, FFN, two RMSNorms), embeddings, final norm,
    output head."""
    return (s.n_layers * (attention_params(s) + ffn_params(s) + 2 * s.dim)
            + 2 * s.vocab * s.dim + s.dim)


def fused_params(s: Shape) -> int:
    """The fused model: the dense one with E experts instead of one FFN per block, plus a router
    [E, D] each."""
    return dense_params(s) + s.n_layers * ((s.experts - 1) * ffn_params(s) + s.experts * s.dim)


def lora_params_per_ffn(s: Shape) -> int:
    """A [r, in] and B [out, r] for w1, w2, w3 of one FFN: r (D + H) each."""
    return 3 * s.lora_rank * (s.dim + s.hidden)


def trainable_params(s: Shape, stage: int, lora: bool) -> int:
    """Stage 1: every block's FFN (or its LoRA deltas). Stage 2: routers + experts (or routers +
    experts' deltas)."""
    per_ffn = lora_params_per_ffn(s) if lora else ffn_params(s)
    if stage == 1:
        return s.n_layers * per_ffn
    return s.n_layers * (s.experts * per_ffn + s.experts * s.dim)


def total_params(s: Shape, stage: int, lora: bool) -> int:
    """All parameters of the model a stage trains (LoRA's factors included) or evaluates (stage 3:
    fused, merged)."""
    base = dense_params(s) if stage == 1 else fused_params(s)
    if not lora or stage == 3:
        return base
    return base + s.n_layers * lora_params_per_ffn(s) * (1 if stage == 1 else s.experts)


# --------------------------------------------------------------------------------------------------
# 2. Where a run keeps its tensors: device, precision, sharding


@dataclass(frozen=True)
class Run:
    stage: int  # 1, 2 (training), 3 (evaluation)
    lora: bool
    nproc: int = 1  # 1 = one process; N = FSDP2 over N ranks
    device: str = "cuda"  # "cuda": bf16 matmuls; "cpu": all float32 (what --validate measures)

    @property
    def c(self) -> int:
        """Bytes per element of the matmul-side activations: bf16 on CUDA, float32 on CPU
        (evaluation: bf16 on both)."""
        return 2 if self.device == "cuda" or self.stage == 3 else 4

    @property
    def frozen_bytes(self) -> int:
        """Frozen weights: float32 master without LoRA; the matmul dtype with LoRA
        (trainer.compute_dtype)."""
        return self.c if self.lora else 4


def weight_bytes(s: Shape, r: Run) -> int:
    """Resident parameters per rank: trainable ones in float32, frozen ones in Run.frozen_bytes, / N
    under FSDP (evaluation: the merged fused model in bf16 on one GPU). FSDP's padding of a dim to a
    multiple of N is ignored."""
    if r.stage == 3:
        return 2 * fused_params(s)
    n_train = trainable_params(s, r.stage, r.lora)
    n_frozen = total_params(s, r.stage, r.lora) - n_train
    return (4 * n_train + r.frozen_bytes * n_frozen) // r.nproc


def gradient_bytes(s: Shape, r: Run) -> int:
    """One float32 gradient per trainable parameter (FSDP2: the reduce-scattered shard, / N)."""
    return 0 if r.stage == 3 else 4 * trainable_params(s, r.stage, r.lora) // r.nproc


def optimizer_bytes(s: Shape, r: Run) -> int:
    """AdamW's exp_avg and exp_avg_sq, float32, per trainable parameter (/ N under FSDP2)."""
    return 0 if r.stage == 3 else 8 * trainable_params(s, r.stage, r.lora) // r.nproc


def optimizer_step_temporaries(s: Shape, r: Run) -> int:
    """Extra bytes while optimizer.step() runs. CUDA (foreach AdamW): _foreach_sqrt(exp_avg_sq), one
    float32 copy of all trainable parameters. CPU (the per-tensor loop): exp_avg_sq.sqrt() and its
    / bias correction, two copies of the largest trainable tensor (an FFN matrix, a stacked expert
    matrix, or the largest LoRA factor)."""
    n = trainable_params(s, r.stage, r.lora)
    if r.device == "cuda":
        return 4 * n // r.nproc
    per_matrix = s.dim * s.hidden * (1 if r.stage == 1 else s.experts)
    largest = s.lora_rank * s.hidden * (1 if r.stage == 1 else s.experts) if r.lora else per_matrix
    return 2 * 4 * largest // r.nproc


def drift_reference_bytes(s: Shape, r: Run) -> int:
    """W^0 of L_R (stage 2 without LoRA): fuse.py keeps moe.snapshot_expert_weights, a float32 copy
    of every stacked expert matrix (its local shards under FSDP). With LoRA the frozen experts are
    W^0: no copy."""
    if r.stage != 2 or r.lora:
        return 0
    return 4 * s.n_layers * s.experts * ffn_params(s) // r.nproc


def working_weight_copies(s: Shape, r: Run) -> int:
    """bf16 copies of weights that exist only while the matmuls run (training on CUDA without LoRA).
    One GPU (autocast): every block matmul weight autograd keeps for its backward (cast once per
    forward; all blocks but layer 0's attention, whose input and weights need no gradient), the
    stacked experts (dispatch_grouped's .to(bf16)) and the output head. FSDP2: the all-gathered bf16
    parameters of two blocks (the one computing and the one prefetched) and of the root (embeddings,
    output, final norm: the root does not reshard after forward), plus one block's unsharded
    gradients (bf16 from autograd and their float32 copy for the reduce-scatter)."""
    if r.device != "cuda" or r.stage == 3:
        return 0
    block = attention_params(s) + 2 * s.dim + (ffn_params(s) if r.stage == 1
                                               else s.experts * (ffn_params(s) + s.dim))
    if r.nproc == 1:
        if r.lora:
            return 0  # frozen weights already bf16; the LoRA factors' casts are negligible
        return 2 * (s.n_layers * block - attention_params(s) + s.vocab * s.dim)
    block_trainable = trainable_params(s, r.stage, r.lora) // s.n_layers
    return 2 * 2 * block + 2 * (2 * s.vocab * s.dim + s.dim) + 6 * block_trainable


# --------------------------------------------------------------------------------------------------
# 3. Activations: what autograd saves, per token (found with saved_tensors_hooks)


def rmsnorm_saved_per_token(s: Shape) -> int:
    """RMSNorm with a frozen weight: x in float32 (x.float(); pow and mul save it) and
    rsqrt(mean(x^2)) [1]. normed * weight saves only the weight (normed would be saved only if the
    weight trained)."""
    return 4 * s.dim + 4


def attention_saved_per_token(s: Shape, r: Run) -> int:
    """Frozen attention whose input needs a gradient: SDPA saves q, k, v (k, v after
    repeat_interleave: all heads), its output [D] and the logsumexp [n_heads] (float32).
    wq/wk/wv/wo save only their (parameter) weights; the rotary's cos/sin [T, d/2] are shared and
    negligible."""
    return r.c * 4 * s.dim + 4 * s.n_heads


def ffn_saved_per_token(s: Shape, r: Run) -> int:
    """Dense SwiGLU: its input x [D] (w1, w3 need it), w1 x, silu(w1 x), w3 x and their product [H]
    each (w2's input). LoRA: also each matrix's low-rank x A^T [r] (B's gradient needs it; A's needs
    the same x)."""
    return r.c * (s.dim + 4 * s.hidden) + (r.c * 3 * s.lora_rank if r.lora else 0)


def moe_saved_per_token(s: Shape, r: Run) -> int:
    """The MoE layer per token: the router's float32 input [D]; softmax probs [E], the sort's
    indices (int64) [E] and sorted probs [E], the top-k sum [1]; order and rows [k] int64 and each
    row's weight [k]. Per (token, slot) row, k of them: x_sorted [D], the four SwiGLU tensors [H] as
    in ffn_saved_per_token (plus LoRA's [r] x 3), the expert output y [D] (y * weight saves it: the
    router trains) and y * weight [D] (index_add_ saves its source)."""
    E, k = s.experts, s.top_k
    routing = 4 * s.dim + 4 * E + 8 * E + 4 * E + 4 + 8 * k + 8 * k + 4 * k
    per_row = ffn_saved_per_token(s, r) + r.c * s.dim + 4 * s.dim
    return routing + k * per_row


def block_saved_per_token(s: Shape, r: Run, first: bool) -> int:
    """One transformer block. The embeddings are frozen, so in block 0 neither attention nor its
    norms save anything (nothing before them needs a gradient): only its FFN (or MoE) does."""
    ffn = ffn_saved_per_token(s, r) if r.stage == 1 else moe_saved_per_token(s, r)
    if first:
        return ffn
    return 2 * rmsnorm_saved_per_token(s) + attention_saved_per_token(s, r) + ffn


def loss_peak_per_token(s: Shape) -> int:
    """The head and L_CE at the start of the backward: the final norm's saves, the targets (int64)
    and three float32 [V] rows alive at once -- log_softmax's output (nll_loss saves it), its
    gradient, and the logits' gradient (the logits themselves are freed when the objective returns;
    in the forward logits + log_softmax = 8 V bytes)."""
    return rmsnorm_saved_per_token(s) + 8 + 3 * 4 * s.vocab


def drift_saved_bytes(s: Shape, r: Run) -> int:
    """L_R in stage 2 without LoRA: losses.drift_loss forms W - W^0 in float32 for every stacked
    expert matrix and pow(2) saves it: one float32 copy of all experts (/ N: the local shards). With
    LoRA only r x r products."""
    if r.stage != 2 or r.lora:
        return 0
    return 4 * s.n_layers * s.experts * ffn_params(s) // r.nproc


def ffn_backward_transient(s: Shape, r: Run) -> int:
    """Inside one FFN's backward: the gradients of silu(w1 x), w3 x and w1 x [H] (per row: the
    dense FFN's N rows, or one expert's k N / E under the CPU slices, all k N on CUDA's one grouped
    matmul), alive together."""
    rows = (s.tokens if r.stage == 1
            else s.tokens * s.top_k // (1 if r.device == "cuda" else s.experts))
    return 3 * 4 * rows * s.hidden if r.device == "cpu" else 3 * 2 * rows * s.hidden


def activation_bytes(s: Shape, r: Run) -> int:
    """Everything the forward leaves for the backward, at the backward's start: all blocks' saves,
    the loss's buffers, L_R's differences (training); evaluation: the KV cache and the prefill's
    logits."""
    if r.stage == 3:
        return kv_cache_bytes(s, r) + prefill_logits_bytes(s, r)
    blocks = sum(block_saved_per_token(s, r, i == 0) for i in range(s.n_layers))
    return s.tokens * (blocks + loss_peak_per_token(s)) + drift_saved_bytes(s, r)


def kv_cache_bytes(s: Shape, r: Run) -> int:
    """model.setup_cache: k and v [B, prompt + new tokens, kv_heads, head_dim] per layer in the
    weights' dtype (bf16 on CUDA). Evaluation batch EVAL_BATCH, prompt seq_len, EVAL_NEW_TOKENS new
    tokens (evaluate.py's)."""
    length = s.seq_len + s.eval_new_tokens
    return 2 * s.n_layers * s.eval_batch * length * s.kv_heads * (s.dim // s.n_heads) * r.c


def prefill_logits_bytes(s: Shape, r: Run) -> int:
    """The prefill's output head: logits [B, T, V] in the weights' dtype and their .float() copy,
    alive together."""
    return s.eval_batch * s.seq_len * s.vocab * (r.c + 4)


def training_peak(s: Shape, r: Run) -> int:
    """The largest of the moments of one training step (weights, working copies and AdamW state
    always there):
      backward, walking down from the loss: layers above the one running have freed their saves
        and hold their gradients; the layers below still hold their saves. The loss's buffers count
        at the start. Stage 2 without LoRA: L_R's backward runs first (its nodes are the newest) and
        turns the saved W - W^0 into all expert gradients at once, before any layer's backward.
      the step: all gradients + the optimizer's temporaries."""
    static = (weight_bytes(s, r) + drift_reference_bytes(s, r) + working_weight_copies(s, r)
              + optimizer_bytes(s, r))
    per_layer_saves = [s.tokens * block_saved_per_token(s, r, i == 0) for i in range(s.n_layers)]
    layer_grads = gradient_bytes(s, r) // s.n_layers
    experts_first = r.stage == 2 and not r.lora
    moments = []
    for done in range(s.n_layers + 1):  # layers whose backward has run, counted from the top
        grads = gradient_bytes(s, r) if experts_first else done * layer_grads
        alive = sum(per_layer_saves[: s.n_layers - done]) + grads
        alive += s.tokens * loss_peak_per_token(s) if done == 0 else ffn_backward_transient(s, r)
        moments.append(alive)
    step = gradient_bytes(s, r) + optimizer_step_temporaries(s, r)
    return static + max(max(moments), step)


def evaluation_peak(s: Shape, r: Run) -> int:
    """Weights + KV cache + the prefill's logits (the block's own transients are smaller at these
    shapes)."""
    return weight_bytes(s, r) + kv_cache_bytes(s, r) + prefill_logits_bytes(s, r)


def memory_row(s: Shape, r: Run) -> dict:
    """All columns of one table row, in bytes."""
    peak = evaluation_peak(s, r) if r.stage == 3 else training_peak(s, r)
    weights = weight_bytes(s, r) + drift_reference_bytes(s, r) + working_weight_copies(s, r)
    return {"weights": weights, "grads": gradient_bytes(s, r),
            "optimizer": optimizer_bytes(s, r), "activations": activation_bytes(s, r), "peak": peak}


# --------------------------------------------------------------------------------------------------
# 4. The table


STAGE_NAMES = {1: "stage 1 (FFN)", 2: "stage 2 (fused)", 3: "evaluation"}


def print_table(s: Shape, nprocs: list):
    print(f"shape: dim {s.dim}, {s.n_layers} layers, {s.n_heads} heads ({s.kv_heads} kv), "
          f"hidden {s.hidden}, vocab {s.vocab}; seq-len {s.seq_len}, micro-batch {s.micro_batch} "
          f"per GPU ({s.tokens} tokens); E={s.experts}, top-{s.top_k}, LoRA r={s.lora_rank}")
    print(f"parameters: dense {dense_params(s):,}  fused {fused_params(s):,}")
    for stage in (1, 2):
        for lora in (False, True):
            n, total = trainable_params(s, stage, lora), total_params(s, stage, lora)
            print(f"  {STAGE_NAMES[stage]:16s} {'LoRA' if lora else 'full':4s} "
                  f"trainable {n:>14,} = {100 * n / total:6.3f} % of {total:,}")
    print(f"\nGiB per GPU (CUDA: bf16 matmuls; weights column = resident + bf16 working copies; "
          f"peak = the largest moment of a step, not the column sum)")
    print(f"{'':16s} {'mode':4s} {'GPUs':>4s} {'weights':>8s} {'grads':>7s} {'AdamW':>7s} "
          f"{'activ.':>7s} {'peak':>7s}")
    for stage in (1, 2, 3):
        for lora in ((False, True) if stage < 3 else (False,)):
            for n in (nprocs if stage < 3 else [1]):
                m = memory_row(s, Run(stage, lora, n))
                mode = "bf16" if stage == 3 else "LoRA" if lora else "full"
                print(f"{STAGE_NAMES[stage]:16s} {mode:4s} {n:4d} " + " ".join(
                    f"{m[k] / GIB:{w}.2f}" for k, w in zip(m, (8, 7, 7, 7, 7))))
    print(f"(evaluation: the fused model, batch {s.eval_batch}, prompt {s.seq_len} + "
          f"{s.eval_new_tokens} new tokens; activations = KV cache + prefill logits)")


# --------------------------------------------------------------------------------------------------
# 5. Validation: measured peaks of real steps on CPU (float32), each in a fresh subprocess


VALIDATE_SHAPE = Shape(dim=512, n_layers=4, n_heads=8, vocab=8000, hidden=ffn_hidden(512, 256),
                       seq_len=256, micro_batch=4, eval_batch=8, eval_new_tokens=8)
VALIDATE_RUNS = [Run(1, False, device="cpu"), Run(1, True, device="cpu"),
                 Run(2, False, device="cpu"), Run(2, True, device="cpu"),
                 Run(3, False, device="cpu")]


def reset_peak():
    """Make VmHWM (peak resident memory) restart from the current resident memory."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def model_args(s: Shape, n_experts: int):
    """The ModelArgs of shape s (model.py), dense (n_experts 0) or fused."""
    return ModelArgs(dim=s.dim, n_layers=s.n_layers, n_heads=s.n_heads,
                     n_kv_heads=s.n_kv_heads or None, vocab_size=s.vocab, multiple_of=s.hidden,
                     n_experts=n_experts, top_k=s.top_k, max_seq_len=s.seq_len + s.eval_new_tokens)


def build_model(s: Shape, r: Run, device="cpu"):
    """The model as train_expert.py (stage 1) / fuse.py (stage 2) build it, with random weights, and
    the objective. Returns (model, loss_fn(model, batch, counts)). The weights are made on `device`
    (gpu_check.py: on the GPU, where a 7B-wide model initialises in a moment)."""
    from functools import partial
    import torch
    import model as M
    from engineering.lora import add_lora, init_lora, lora_drift_loss
    from fusion import h3fusion_objective, set_trainable
    from losses import drift_loss
    from moe import snapshot_expert_weights
    from train_expert import freeze_all_but_ffn, lm_objective
    args = model_args(s, 0 if r.stage == 1 else s.experts)
    with torch.device(device):  # (init_lora, below, draws on the CPU: outside this block)
        model = M.Transformer(args)
    assert M.ffn_hidden_dim(args) == s.hidden, "--hidden must be what multiple_of gives"
    if r.stage == 1:
        freeze_all_but_ffn(model)
        loss_fn = lm_objective
    else:
        set_trainable(model, "router+experts")
    if r.lora:
        init_lora(add_lora(model, s.lora_rank, 2.0 * s.lora_rank))
    if r.stage == 2:
        initial = {} if r.lora else snapshot_expert_weights(model)
        loss_fn = partial(h3fusion_objective, lam=1.0, gamma=[0.1] * s.experts, reg="drift",
                          initial_experts=initial, drift=lora_drift_loss if r.lora else drift_loss)
    return model, loss_fn


def random_batch(s: Shape):
    import torch
    tokens = torch.randint(0, s.vocab, (s.micro_batch, s.seq_len))  # [B, T]
    targets = torch.roll(tokens, -1, dims=1)  # [B, T]
    targets[:, : s.seq_len // 4] = -100  # the prompt: no loss
    return {"tokens": tokens, "targets": targets,
            "mask": torch.ones(s.micro_batch, s.seq_len, dtype=torch.bool),
            "task": torch.arange(s.micro_batch) % s.experts}


def training_step(model, optimizer, loss_fn, batch):
    """One step as trainer.train runs it (one micro-batch): objective, backward, clip, AdamW,
    zero_grad."""
    import torch
    from trainer import StepCounts
    counts = StepCounts(float((batch["targets"] != -100).sum()), float(len(batch["task"])))
    loss, _ = loss_fn(model, batch, counts)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure_training(s: Shape, r: Run) -> dict:
    """Peak resident memory of the second training step (AdamW's state exists from the first) minus
    the resident memory before the model was built: weights, state, gradients and activations
    together."""
    import gc
    from trainer import build_optimizer
    before = status_kib("VmRSS") * 1024
    model, loss_fn = build_model(s, r)
    optimizer = build_optimizer(model, 1e-4, 0.1 if r.stage == 1 else 0.0)
    batch = random_batch(s)
    training_step(model, optimizer, loss_fn, batch)
    gc.collect()
    reset_peak()
    step_start = status_kib("VmRSS") * 1024
    training_step(model, optimizer, loss_fn, batch)
    peak = status_kib("VmHWM") * 1024
    return {"measured": peak - before, "measured_step": peak - step_start}


def measure_evaluation(s: Shape, r: Run) -> dict:
    """Peak resident memory of greedy generation (KV cache) with the fused model in bf16, minus the
    resident memory before the model was built."""
    import torch
    import model as M
    before = status_kib("VmRSS") * 1024
    model = M.Transformer(model_args(s, s.experts)).to(torch.bfloat16).eval()
    prompts = torch.randint(3, s.vocab, (s.eval_batch, s.seq_len)).tolist()
    reset_peak()
    step_start = status_kib("VmRSS") * 1024
    M.generate_tokens(model, prompts, s.eval_new_tokens)
    peak = status_kib("VmHWM") * 1024
    return {"measured": peak - before, "measured_step": peak - step_start}


def warm_up():
    """One tiny step of everything first, so that the libraries' one-time allocations are not
    counted."""
    tiny = Shape(dim=64, n_layers=2, n_heads=2, vocab=256, hidden=ffn_hidden(64, 32), seq_len=16,
                 micro_batch=2, eval_batch=2, eval_new_tokens=2)
    for r in VALIDATE_RUNS:
        (measure_evaluation if r.stage == 3 else measure_training)(tiny, r)


def worker(config: str):
    import torch
    torch.manual_seed(0)
    cfg = json.loads(config)
    s, r = Shape(**cfg["shape"]), Run(**cfg["run"])
    warm_up()
    import gc
    gc.collect()
    result = (measure_evaluation if r.stage == 3 else measure_training)(s, r)
    print(json.dumps(result))


def predicted(s: Shape, r: Run) -> tuple:
    """(whole peak, peak minus what was resident before the measured step: weights, W^0, AdamW
    state)."""
    if r.stage == 3:
        return evaluation_peak(s, r), kv_cache_bytes(s, r) + prefill_logits_bytes(s, r)
    static = weight_bytes(s, r) + drift_reference_bytes(s, r) + optimizer_bytes(s, r)
    return training_peak(s, r), training_peak(s, r) - static


def run_measurement(s: Shape, r: Run) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    config = json.dumps({"shape": s.__dict__, "run": r.__dict__})
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", config],
                            capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(f"bench_memory.py: error: the measurement of {r} failed:\n"
                         f"{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def validate(s: Shape) -> list:
    """Measure every VALIDATE_RUNS configuration; print measured next to predicted; return the
    ratios."""
    print(f"validation on CPU (float32 training, bf16 evaluation), one process: dim {s.dim}, "
          f"{s.n_layers} layers, {s.n_heads} heads, hidden {s.hidden}, vocab {s.vocab}, "
          f"micro-batch {s.micro_batch} x seq-len {s.seq_len}, E={s.experts} top-{s.top_k}, "
          f"LoRA r={s.lora_rank}; evaluation batch {s.eval_batch}, {s.eval_new_tokens} new tokens")
    print("MiB: total = VmHWM of the measured step - VmRSS before the model was built; "
          "step = VmHWM - VmRSS at the step's start (training: the 2nd step; evaluation: generate)")
    print(f"{'':16s} {'mode':4s} {'predicted':>9s} {'measured':>9s} {'ratio':>6s}   "
          f"{'step pred.':>10s} {'measured':>9s} {'ratio':>6s}")
    ratios = []
    for r in VALIDATE_RUNS:
        m = run_measurement(s, r)
        total, step = predicted(s, r)
        ratios += [total / m["measured"], step / m["measured_step"]]
        mode = "bf16" if r.stage == 3 else "LoRA" if r.lora else "full"
        print(f"{STAGE_NAMES[r.stage]:16s} {mode:4s} {total / 2**20:9.1f} "
              f"{m['measured'] / 2**20:9.1f} {ratios[-2]:6.3f}   {step / 2**20:10.1f} "
              f"{m['measured_step'] / 2**20:9.1f} {ratios[-1]:6.3f}")
    return ratios


# --------------------------------------------------------------------------------------------------
# 6. The command line


def shape_from_args(args, base: dict) -> Shape:
    """The preset (or the validation shape), with every shape flag given on the command line
    replacing its value."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in SHAPE_FLAGS}
    merged = dict(base, **given)
    multiple_of = merged.pop("multiple_of", 256)
    # a preset's own hidden, or the validation shape's, follows --dim / --multiple-of
    if "hidden" not in given:
        merged["hidden"] = ffn_hidden(merged["dim"], multiple_of)
    return Shape(**merged)


SHAPE_FLAGS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab", "hidden", "multiple_of",
               "seq_len", "micro_batch", "lora_rank", "experts", "top_k", "eval_batch",
               "eval_new_tokens")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="default llama-2-7b (not with --validate)")
    p.add_argument("--nproc", default="1,8",
                   help="GPU counts to print: 1 = one process, N > 1 = FSDP2 over N ranks")
    for flag in SHAPE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None)
    p.add_argument("--validate", action="store_true",
                   help="measure real steps on CPU next to the formula")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)
    if args.validate:
        base = {k: v for k, v in VALIDATE_SHAPE.__dict__.items()}
        base = base if args.preset is None else dict(PRESETS[args.preset])
        return validate(shape_from_args(args, base))
    print_table(shape_from_args(args, dict(PRESETS[args.preset or "llama-2-7b"])),
                [int(n) for n in args.nproc.split(",")])


if __name__ == "__main__":
    main()
