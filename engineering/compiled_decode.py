"""Compiled decoding: model.generate_tokens, its one-token step under torch.compile, a static cache.

Why: model.py decodes a token with hundreds of small kernels, each launched from Python; at 7B on
one H100 that ran at a tenth of the HBM bound (92 tokens/s at batch 1:
bench/results/gpu_check_h100_decode_after_fix_2026-11-28.log). gpt-fast's recipe, in plain
PyTorch: give the KV cache one shape for a whole generation and the step a position *tensor*, so
that torch.compile(mode="reduce-overhead") captures the step once as a CUDA graph and
replays it for every token.

It reaches into the model from outside. CompiledDecoder wraps a model.Transformer and looks like
one to model.generate_tokens (forward, setup_cache, clear_cache, params, parameters), so that
generate_tokens' own loop -- ragged prompts, greedy or top-p, </s> -- runs unchanged on it:

    setup_cache(B, L)    allocate (or reuse) the static cache, [rows, length, KV, d] per layer, and
                         lend views of it to the model's attention layers, where model.setup_cache
                         would have put a cache of its own
    forward(tokens, 0)   the prompt ("prefill"): the model's own eager forward fills the lent cache
    forward(token, p)    one token at position p: decode_step, compiled (one CUDA graph on a GPU)
    clear_cache()        take the views back; the static cache stays for the next batch

decode_step is model.Transformer.forward for one token per row, written so that no shape depends on
the position and nothing waits for the GPU:
    attention   static_attention: write the token's key and value at `position` (index_copy_), then
                attend to all `length` cached keys under the mask key position <= position
                (model.Attention slices the cache to position + 1 keys: a new shape every step)
    MoE layer   static_moe: moe.route as MoE.forward; then the experts without a host sync. Where
                the eager layer runs torch._grouped_mm (CUDA, bf16), so does the step, its rows per
                expert counted by one_hot().sum() (moe.sort_by_expert's bincount has a size that
                depends on the data); elsewhere every expert runs on every token, gated to zero
                outside the token's top-k (dispatch_slices' counts.tolist() is a host sync, and its
                slices change shape)
The batch is padded to the cache's rows (the extra rows decode stale tokens, their logits dropped)
and the length rounded up to CACHE_LENGTH_MULTIPLE, so evaluation's batches reuse a few shapes.

Nothing here changes what the model computes eagerly (model.py is not modified); the step is tied
to it by tests/test_compiled_decode.py: compiled greedy decoding gives eager decoding's tokens,
dense and fused, ragged batches of 1 and 4. generate.py and evaluate.py decode through
compiled_or_eager by default on CUDA (--no-compile-decode turns it off), on CPU with
--compile-decode. The first steps compile (and on a GPU capture the graph): that time is
CompiledDecoder.compile_seconds, reported apart from the tokens/s.
"""
import argparse
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from model import (DECODE_ATTENTION_KERNELS, Attention, FeedForward, Transformer, apply_rotary,
                   rotary_cos_sin)
from moe import MoE, at_least_float32, dispatch_grouped, pick_backend, route, swiglu

CACHE_LENGTH_MULTIPLE = 64  # the static cache's length is rounded up to this: fewer shapes, graphs
# The steps timed as compilation after each (re)allocation of the cache: the first compiles (or
# checks the compiled code's guards) and on a GPU warms up; the second captures the CUDA graph.
WARMUP_STEPS = 2
# decode_step compiles once per kind of model (dense, fused, each forced expert of evaluate.py's
# rows) and shape: more than torch's default limit of 8 in one evaluation, past which the step would
# run uncompiled, silently.
RECOMPILE_LIMIT = 64

# --------------------------------------------------------------------------------------------------
# 1. The one-token step, with static shapes


def static_attention(attn: Attention, x, position, cos, sin, cache_k, cache_v):
    """model.Attention.forward for one new token per row at `position`, in shapes that do not depend
    on it. x [B, 1, D]; position [1] long; cos, sin [1, d/2]; cache_k, cache_v [B, L, KV, d]."""
    B = x.shape[0]
    q = attn.wq(x).view(B, 1, attn.n_heads, attn.head_dim)  # [B, 1, H, d]
    k = attn.wk(x).view(B, 1, attn.n_kv_heads, attn.head_dim)  # [B, 1, KV, d]
    v = attn.wv(x).view(B, 1, attn.n_kv_heads, attn.head_dim)  # [B, 1, KV, d]
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    cache_k.index_copy_(1, position, k)  # [B, L, KV, d]: this token's key at its position
    cache_v.index_copy_(1, position, v)  # [B, L, KV, d]
    keys, values = cache_k, cache_v
    repeats = attn.n_heads // attn.n_kv_heads  # grouped-query heads, as in model.Attention
    if repeats > 1:
        keys = keys.repeat_interleave(repeats, dim=2)  # [B, L, H, d]
        values = values.repeat_interleave(repeats, dim=2)  # [B, L, H, d]
    length = cache_k.shape[1]
    visible = torch.arange(length, device=x.device) <= position  # [L]: keys 0 .. position
    q = q.transpose(1, 2)  # [B, H, 1, d]
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)  # [B, H, L, d]
    mask = visible.view(1, 1, 1, length)  # [1, 1, 1, L]
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, H, 1, d]
    return attn.wo(out.transpose(1, 2).reshape(B, 1, -1))  # [B, 1, D]


def every_expert_gated(x_flat, expert_idx, expert_weight, w1, w2, w3):
    """sum_e gate[n, e] * E_e(x_n), the gate zero outside token n's top-k: every expert on every
    token (E/k times the FLOPs, nothing data-dependent). The experts are added in index order, each
    weighted as dispatch_slices weights it, so a token sums the same terms in the same order.
    x_flat [N, D]; expert_idx, expert_weight [N, k]; w1, w3 [E, H, D]; w2 [E, D, H] -> [N, D]"""
    n_tokens, n_experts = x_flat.shape[0], w1.shape[0]
    gate = torch.zeros(n_tokens, n_experts, dtype=expert_weight.dtype, device=x_flat.device)
    gate = gate.scatter(1, expert_idx, expert_weight)  # [N, E], k nonzeros per row
    out = torch.zeros_like(x_flat)  # [N, D]
    for e in range(n_experts):
        y = swiglu(x_flat, w1[e], w2[e], w3[e])  # [N, D]
        out = out + (y * gate[:, e, None].to(y.dtype)).to(out.dtype)  # [N, D]
    return out


def grouped_experts(x_flat, expert_idx, expert_weight, w1, w2, w3):
    """moe.dispatch_grouped (torch._grouped_mm) on the rows sorted by expert as moe.sort_by_expert
    sorts them, the rows per expert counted in a static shape: one_hot().sum(), not bincount(),
    whose size depends on the data. x_flat [N, D]; expert_idx, expert_weight [N, k] -> [N, D]"""
    k = expert_idx.shape[1]
    flat_expert = expert_idx.reshape(-1)  # [N*k]
    order = torch.argsort(flat_expert, stable=True)  # [N*k]
    rows = order // k  # [N*k] the token of each sorted row
    counts = F.one_hot(flat_expert, w1.shape[0]).sum(0)  # [E] rows per expert
    row_weight = expert_weight.reshape(-1).index_select(0, order)  # [N*k]
    return dispatch_grouped(x_flat, rows, row_weight, counts, w1, w2, w3)  # [N, D]


def static_moe(moe: MoE, x, grouped: bool):
    """moe.MoE.forward without a host sync or a data-dependent shape. Decoding runs outside
    autocast, so the router needs no autocast switch; unlike MoE.forward it keeps no router_probs.
    x [B, T, D] -> [B, T, D]"""
    B, T, D = x.shape
    x_flat = x.reshape(B * T, D)  # [N, D]
    router_dtype = at_least_float32(x.dtype)
    logits = F.linear(x_flat.to(router_dtype), moe.router.weight.to(router_dtype))  # [N, E]
    _, expert_idx, expert_weight = route(logits, moe.top_k, moe.forced_expert)  # [N, k] [N, k]
    run_experts = grouped_experts if grouped else every_expert_gated
    out = run_experts(x_flat, expert_idx, expert_weight, moe.w1, moe.w2, moe.w3)  # [N, D]
    return out.view(B, T, D)  # [B, T, D]


def decode_step(model: Transformer, caches: list, tokens, position, cos_table, sin_table,
                grouped_moe: bool):
    """model.Transformer.forward(tokens, position) for one token per row, in static shapes.

    tokens [B, 1] long; position [1] long (all rows are at one position, as in generate_tokens);
    caches: (cache_k, cache_v) per layer, each [B, L, KV, d]; cos_table, sin_table [L, d/2], the
    rotary angles of positions 0 .. L-1 -> logits [B, 1, V] float32. Writes each layer's key and
    value at `position`.
    """
    cos = cos_table.index_select(0, position)  # [1, d/2]
    sin = sin_table.index_select(0, position)  # [1, d/2]
    h = model.tok_embeddings(tokens)  # [B, 1, D]
    for layer, (cache_k, cache_v) in zip(model.layers, caches):
        x = layer.attention_norm(h)  # [B, 1, D]
        h = h + static_attention(layer.attention, x, position, cos, sin, cache_k, cache_v)
        x = layer.ffn_norm(h)  # [B, 1, D]
        if isinstance(layer.feed_forward, MoE):
            h = h + static_moe(layer.feed_forward, x, grouped_moe)  # [B, 1, D]
        else:
            h = h + layer.feed_forward(x)  # [B, 1, D]
    return model.output(model.norm(h)).float()  # [B, 1, V]


# --------------------------------------------------------------------------------------------------
# 2. The wrapper that model.generate_tokens decodes with


def unsupported_reason(model) -> Optional[str]:
    """Why decode_step cannot stand in for `model`'s forward (None: it can). It knows
    model.Transformer with model.Attention, and FeedForward or exactly moe.MoE (a subclass, such as
    LoRA's, computes more)."""
    if not isinstance(model, Transformer):
        return f"{type(model).__name__} is not a model.Transformer"
    for i, layer in enumerate(model.layers):
        if type(layer.attention) is not Attention:
            return f"layer {i}'s attention is a {type(layer.attention).__name__}"
        ffn = layer.feed_forward
        if not (isinstance(ffn, FeedForward) or type(ffn) is MoE):
            return f"layer {i}'s feed-forward is a {type(ffn).__name__}"
    return None


def uses_grouped_mm(model) -> bool:
    """Whether the model's MoE layers run torch._grouped_mm when it decodes eagerly
    (moe.pick_backend: CUDA, bf16); the compiled step then does too, else it runs every expert
    gated, the twin of the per-expert slices. False for a dense model."""
    for layer in model.layers:
        moe = layer.feed_forward
        if isinstance(moe, MoE):
            x = torch.empty(1, moe.dim, dtype=moe.w1.dtype, device=moe.w1.device)  # [1, D]
            return pick_backend(x, moe.w1, moe.w2, moe.backend) == "grouped_mm"
    return False


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CompiledDecoder(nn.Module):
    """A model.Transformer to model.generate_tokens, whose one-token steps run decode_step compiled.

    The step reads and writes a static cache the decoder owns, `rows` x `length` per layer, grown
    (never shrunk) when a batch needs more; the prompt's eager forward writes it through lent views.
    compile_seconds: the time of the WARMUP_STEPS steps after each (re)allocation of the cache,
    which compile the step and on a GPU capture its graph. fallback_reason: set if compiling failed;
    the decoder then decodes eagerly.
    """

    def __init__(self, model: Transformer, mode: Optional[str] = None):
        super().__init__()
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"CompiledDecoder: {reason}")
        self.model, self.params = model, model.params
        self.device = model.output.weight.device
        mode = mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
        self.step = torch.compile(decode_step, mode=mode, fullgraph=True)
        self.grouped_moe = uses_grouped_mm(model)
        self.caches, self.rows, self.length = [], 0, 0  # [(cache_k, cache_v)] per layer
        self.cos_table = self.sin_table = None  # [length, d/2] each
        self.tokens = None  # [rows, 1]: the step's input
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)  # [1]
        torch._dynamo.mark_static_address(self.position)
        self.batch = 0  # rows of the generation under way (0: none)
        self.warmup_left, self.compile_seconds, self.fallback_reason = WARMUP_STEPS, 0.0, None

    def setup_cache(self, batch_size: int, max_len: int):
        """What model.setup_cache is to generate_tokens, with the static cache: the model's
        attention layers get views of its first batch_size rows, which their eager forward fills
        with the prompt."""
        if max_len > self.params.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds max_seq_len={self.params.max_seq_len}")
        if batch_size > self.rows or max_len > self.length:
            rounded = -(-max_len // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
            length = max(self.length, min(rounded, self.params.max_seq_len))
            self.allocate(max(batch_size, self.rows), length)
        for layer, (cache_k, cache_v) in zip(self.model.layers, self.caches):
            layer.attention.cache_k = cache_k[:batch_size]  # [B, length, KV, d]
            layer.attention.cache_v = cache_v[:batch_size]  # [B, length, KV, d]
        self.batch = batch_size

    def allocate(self, rows: int, length: int):
        """The static cache [rows, length, KV, d] per layer, the rotary angles of its positions and
        the step's token buffer, marked as static addresses: a CUDA graph reads and writes them in
        place."""
        args, dtype = self.params, self.model.output.weight.dtype
        shape = (rows, length, args.kv_heads, args.head_dim)
        self.caches = [(torch.zeros(shape, dtype=dtype, device=self.device),
                        torch.zeros(shape, dtype=dtype, device=self.device))
                       for _ in self.model.layers]
        self.cos_table, self.sin_table = rotary_cos_sin(args.head_dim, 0, length, args.rope_theta,
                                                        self.device)  # [length, d/2] each
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=self.device)  # [rows, 1]
        for t in [t for pair in self.caches for t in pair] + [self.cos_table, self.sin_table,
                                                              self.tokens]:
            torch._dynamo.mark_static_address(t)
        self.rows, self.length, self.warmup_left = rows, length, WARMUP_STEPS

    def clear_cache(self):
        self.model.clear_cache()
        self.batch = 0

    def forward(self, tokens, start_pos: int = 0):
        """tokens [B, T] -> logits [B, T, V]: one token inside a generation, after its prompt,
        through the compiled step; anything else (the prompt, a forward outside generation)
        eagerly."""
        if tokens.shape[1] > 1 or start_pos == 0 or not self.batch or self.fallback_reason:
            return self.model(tokens, start_pos)
        try:
            return self.compiled_forward(tokens, start_pos)
        except Exception as error:  # e.g. a backend that cannot compile the step: eagerly, loudly
            if self.warmup_left < WARMUP_STEPS:  # it compiled and ran before: a real error
                raise
            self.fallback_reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            print(f"compiled decoding failed ({self.fallback_reason}); decoding eagerly",
                  file=sys.stderr)
            return self.model(tokens, start_pos)

    def compiled_forward(self, tokens, start_pos: int):
        B = tokens.shape[0]
        self.tokens[:B].copy_(tokens)  # [rows, 1]; rows past B keep old ids (their logits dropped)
        self.position.fill_(start_pos)  # on the device: no copy from the host, no sync
        warmup = self.warmup_left > 0
        if warmup:
            synchronize(self.device)
            start = time.perf_counter()
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last step's outputs may go
        # the attention kernels model.Attention decodes with (not cuDNN's)
        with sdpa_kernel(DECODE_ATTENTION_KERNELS), \
                torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            logits = self.step(self.model, self.caches, self.tokens, self.position, self.cos_table,
                               self.sin_table, self.grouped_moe)  # [rows, 1, V]
        logits = logits[:B].clone()  # [B, 1, V], out of the graph's buffer (the next step's)
        if warmup:
            synchronize(self.device)
            self.compile_seconds += time.perf_counter() - start
            self.warmup_left -= 1
        return logits


@torch.inference_mode()
def step_logits(decoder, tokens, prompt: int):
    """The logits a decoder (a model.Transformer, or a CompiledDecoder) gives for positions
    prompt-1 .. L-2 of tokens [B, L], called as model.generate_tokens calls it: the prompt's
    forward, then one step per token -> [B, L - prompt, V]. How the tests and bench/gpu_check.py
    hold the compiled step's logits against the eager ones."""
    B, L = tokens.shape
    decoder.setup_cache(B, L)
    try:
        steps = [decoder.forward(tokens[:, :prompt], 0)[:, -1]]  # [B, V]
        for pos in range(prompt, L - 1):
            steps.append(decoder.forward(tokens[:, pos:pos + 1], pos)[:, -1])  # [B, V]
    finally:
        decoder.clear_cache()
    return torch.stack(steps, dim=1)  # [B, L - prompt, V]


def compiled_or_eager(model):
    """A CompiledDecoder for `model`, or `model` itself where decode_step does not apply (one line
    on stderr says why): what generate.py and evaluate.py decode with when compiled decoding is
    on."""
    reason = unsupported_reason(model)
    if reason:
        print(f"compiled decoding: {reason}; decoding eagerly", file=sys.stderr)
        return model
    return CompiledDecoder(model)


def add_compile_decode_flag(parser):
    """--compile-decode / --no-compile-decode, of generate.py and evaluate.py."""
    parser.add_argument("--compile-decode", action=argparse.BooleanOptionalAction, default=None,
                        help="decode with the one-token step compiled (torch.compile, CUDA "
                             "graphs) on a static KV cache (engineering/compiled_decode.py). "
                             "Default: on with --device cuda, off on a CPU")


def compile_decode_wanted(flag: Optional[bool], device) -> bool:
    """--compile-decode as given, else on where the device is a GPU."""
    return flag if flag is not None else torch.device(device).type == "cuda"
