"""A single-file LLaMA that loads Meta's original checkpoints.

Read top to bottom (each number is a section below):
  1. ModelArgs        the fields of Meta's params.json (+ n_experts, top_k for fused models)
  2. RMSNorm, rotary  x / rms(x) * g ;  rotate each (even, odd) pair of q/k by pos * theta^(-2i/d)
  3. Attention        softmax(q k^T / sqrt(d_head) + causal mask) v, grouped-query heads, KV cache
  4. FeedForward      SwiGLU:  w2( silu(w1 x) * w3 x )   -- the block H3Fusion turns into experts
  5. Transformer      h = x + Attn(norm(x));  out = h + FFN(norm(h))   (FFN = dense, or moe.MoE)
  6. generate         batched ragged prompts, KV cache, greedy or top-p
  7. load_checkpoint  params.json + consolidated.NN.pth shards (+ tokenizer.model), read plainly
It imports nothing from the project but moe.py. The command line is generate.py; the checks every
command applies before it reads a checkpoint, Hugging Face's layout and the atomic writer are
engineering/checkpoints.py's; the tokenizer is data/tokenizer.py's.

Parameter names are Meta's exactly (tok_embeddings, layers.N.attention.wq, ..., norm, output), so a
consolidated.00.pth from Meta loads with no renaming. H3Fusion (arXiv 2411.17792) keeps everything
here from the base model and swaps each block's FeedForward for an MoE layer (moe.py) whose experts
are the FeedForwards of the three aligned models.
"""
import glob
import json
import math
import os
from dataclasses import dataclass
from typing import Optional

import sentencepiece as spm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from moe import MoE

# --------------------------------------------------------------------------------------------------
# 1. Configuration


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (multi-head); fewer = grouped-query attention
    vocab_size: int = -1  # -1 = take it from tokenizer.model (Meta's LLaMA-2 files say -1)
    multiple_of: int = 256  # FFN hidden size is rounded up to a multiple of this
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    n_experts: int = 0  # 0 = dense FeedForward; E > 0 = moe.MoE with E experts (H3Fusion: E = 3)
    top_k: int = 2  # experts per token in an MoE layer

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def ffn_hidden_dim(args: ModelArgs) -> int:
    """Meta's rule: 2/3 of 4*dim (SwiGLU has 3 matrices, not 2), scaled, rounded up to
    multiple_of."""
    hidden = int(2 * (4 * args.dim) / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


# --------------------------------------------------------------------------------------------------
# 2. RMSNorm and rotary position embeddings


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotary_cos_sin(head_dim: int, start_pos: int, seq_len: int, theta: float, device):
    """cos/sin of angle pos * theta^(-2i/head_dim) for pos in [start_pos, start_pos+seq_len),
    i < head_dim/2."""
    # --- exercise 1: begin ---
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float()
                               / head_dim)  # [d/2]
    positions = torch.arange(start_pos, start_pos + seq_len, device=device).float()  # [T]
    angles = torch.outer(positions, inv_freq)  # [T, d/2]
    return angles.cos(), angles.sin()
    # --- exercise 1: end ---


def apply_rotary(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) -- Meta's pairing (view_as_complex of [..., d/2, 2]).

    x: [B, T, H, d];  cos, sin: [T, d/2].
    """
    # --- exercise 1: begin ---
    x_pairs = x.float().unflatten(-1, (-1, 2))  # [B, T, H, d/2, 2]
    even, odd = x_pairs[..., 0], x_pairs[..., 1]  # [B, T, H, d/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, d/2] broadcasts over heads
    rotated = torch.stack((even * cos - odd * sin,
                           even * sin + odd * cos), dim=-1)  # [B, T, H, d/2, 2]
    return rotated.flatten(-2).type_as(x)  # [B, T, H, d]
    # --- exercise 1: end ---


# --------------------------------------------------------------------------------------------------
# 3. Attention with grouped-query heads and a KV cache


DECODE_ATTENTION_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                            SDPBackend.MATH]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        if args.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={args.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # [B_max, T_max, KV, d] while decoding, else None

    def forward(self, x, start_pos, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # [B, T, H, d]
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, KV, d]
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)  # [B, T, KV, d]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if self.cache_k is not None:  # decoding: append this step's k/v, attend to all so far
            self.cache_k[:B, start_pos : start_pos + T] = k
            self.cache_v[:B, start_pos : start_pos + T] = v
            k, v = (self.cache_k[:B, : start_pos + T],
                    self.cache_v[:B, : start_pos + T])  # [B, S, KV, d]
        # grouped-query attention: each kv head serves `repeats` query heads
        repeats = self.n_heads // self.n_kv_heads
        if repeats > 1:  # (a copy of the whole cache: skipped for plain multi-head attention)
            k = k.repeat_interleave(repeats, dim=2)  # [B, S, H, d]
            v = v.repeat_interleave(repeats, dim=2)  # [B, S, H, d]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T|S, d]
        # query t (absolute position start_pos + t) may see keys 0 .. start_pos + t
        # (`True if` below: under torch.compile T may be symbolic; is_causal must be a Python bool)
        if start_pos == 0:
            out = F.scaled_dot_product_attention(q, k, v,
                                                 is_causal=True if T > 1 else False)  # [B, H, T, d]
        else:  # decoding; one new query (T == 1) sees every cached key, so it needs no mask
            mask = None if T == 1 else torch.ones(T, start_pos + T, dtype=torch.bool,
                                                  device=x.device).tril(start_pos)
            # not cuDNN's kernel: it plans anew for each key length S, ~9 ms a step on an H100
            with sdpa_kernel(DECODE_ATTENTION_KERNELS):
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, d]
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # [B, T, D]


# --------------------------------------------------------------------------------------------------
# 4. SwiGLU feed-forward: the block that stage 1 fine-tunes and stage 2 turns into experts


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # [B, T, D]


# --------------------------------------------------------------------------------------------------
# 5. Transformer


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        if args.n_experts > 0:
            self.feed_forward = MoE(args.dim, ffn_hidden_dim(args), args.n_experts, args.top_k)
        else:
            self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args))
        self.attention_norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, eps=args.norm_eps)

    def forward(self, x, start_pos, cos, sin):
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin)  # [B, T, D]
        return h + self.feed_forward(self.ffn_norm(h))  # [B, T, D]


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError(f"vocab_size={args.vocab_size}: resolve it from the tokenizer first")
        self.params = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(i, args) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Initialisation for training from scratch (Meta ships none): N(0, 0.02), residual outputs
        (attention.wo, feed_forward.w2) scaled by 1/sqrt(2 * n_layers) as in GPT-2. Loaded weights
        replace it."""
        for name, p in self.named_parameters():
            if p.device.type == "meta" or p.dim() == 1:
                continue  # norms stay at 1; nothing to do on the meta device
            residual = name.endswith(("attention.wo.weight", "feed_forward.w2.weight",
                                      "feed_forward.w2"))
            nn.init.normal_(p, std=std / math.sqrt(2 * self.params.n_layers) if residual else std)

    def forward(self, tokens, start_pos: int = 0):
        B, T = tokens.shape
        h = self.tok_embeddings(tokens)  # [B, T, D]
        cos, sin = rotary_cos_sin(self.params.head_dim, start_pos, T, self.params.rope_theta,
                                  tokens.device)
        for layer in self.layers:
            h = layer(h, start_pos, cos, sin)  # [B, T, D]
        return self.output(self.norm(h)).float()  # [B, T, V]

    def setup_cache(self, batch_size: int, max_len: int):
        """Allocate a KV cache for decoding; forward(tokens, start_pos) then appends to it."""
        if max_len > self.params.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds max_seq_len={self.params.max_seq_len}")
        p = self.output.weight
        for layer in self.layers:
            shape = (batch_size, max_len, self.params.kv_heads, self.params.head_dim)
            layer.attention.cache_k = torch.zeros(shape, dtype=p.dtype, device=p.device)
            layer.attention.cache_v = torch.zeros(shape, dtype=p.dtype, device=p.device)

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None


# --------------------------------------------------------------------------------------------------
# 6. Generation


def sample_next(logits, temperature: float, top_p: float):
    """logits [B, V] -> token ids [B]. temperature 0 = greedy; else nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)  # [B, V]
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(-1, keepdim=True), 1)  # [B, 1]
    return order.gather(-1, choice).squeeze(-1)  # [B]


@torch.inference_mode()
def generate_tokens(model, prompt_tokens: list, max_new_tokens: int, temperature=0.0, top_p=0.9,
                    eos_id=None):
    """Decode a batch of prompts of different lengths with the KV cache; return their new tokens.

    Meta's tokenizer has no pad id, so prompts are not padded: every row starts decoding at the
    shortest prompt's length, and while a longer row is still inside its prompt its prompt token is
    kept instead of the sampled one. Each row therefore sees exactly the tokens it would see alone.
    """
    lengths = [len(p) for p in prompt_tokens]
    if min(lengths) == 0:
        raise ValueError("generate: empty prompt (encode with bos=True)")
    total_len = max(lengths) + max_new_tokens
    if total_len > model.params.max_seq_len:
        raise ValueError(f"generate: prompt {max(lengths)} + {max_new_tokens} new tokens exceeds "
                         f"max_seq_len={model.params.max_seq_len}")
    device = next(model.parameters()).device
    B = len(prompt_tokens)
    tokens = torch.zeros(B, total_len, dtype=torch.long, device=device)  # [B, L]
    in_prompt = torch.zeros(B, total_len, dtype=torch.bool, device=device)  # [B, L]
    for i, p in enumerate(prompt_tokens):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        in_prompt[i, : len(p)] = True
    done = torch.zeros(B, dtype=torch.bool, device=device)
    model.setup_cache(B, total_len)
    try:
        prev_pos = 0
        for cur_pos in range(min(lengths), total_len):
            logits = model.forward(tokens[:, prev_pos:cur_pos], prev_pos)  # [B, t, V]
            next_token = sample_next(logits[:, -1], temperature, top_p)  # [B]
            next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            prev_pos = cur_pos
            if eos_id is not None:  # (done.all() waits for the device: only when it can be true)
                done |= ~in_prompt[:, cur_pos] & (next_token == eos_id)
                if done.all():
                    break
    finally:
        model.clear_cache()
    out = []
    for i, n in enumerate(lengths):
        new = tokens[i, n : min(n + max_new_tokens, prev_pos + 1)].tolist()
        out.append(new[: new.index(eos_id)] if eos_id in new else new)
    return out


def generate(model, tokenizer, prompts: list, max_new_tokens: int = 64, temperature=0.0,
             top_p=0.9) -> list:
    """Complete each prompt (strings in, completions out; decoding stops at </s>)."""
    prompt_tokens = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    new = generate_tokens(model, prompt_tokens, max_new_tokens, temperature, top_p,
                          tokenizer.eos_id)
    return [tokenizer.decode(t) for t in new]


# --------------------------------------------------------------------------------------------------
# 7. Meta's checkpoint layout: params.json + consolidated.NN.pth + tokenizer.model
#
# Meta's 13B/70B checkpoints are split for model parallelism into consolidated.00.pth ... .NN.pth.
# Column-parallel matrices (wq, wk, wv, w1, w3, output) were split along dim 0 (output features),
# row-parallel ones (wo, w2) and tok_embeddings along dim 1; 1-D norms are copied into every shard.
# A fused (MoE) model stores experts stacked: w1/w3 [E, hidden, dim] split on dim 1,
# w2 [E, dim, hidden] split on dim 2, router.weight [E, dim] copied.
# This section reads that layout as plainly as it can: load_checkpoint below is the plain Meta
# reader. Every command reads through engineering/checkpoints.py's load_checkpoint instead, which
# checks each file as it reads it (a broken one is named in one line), converts Hugging Face's
# layout to this one (engineering/hf_checkpoint.py), and builds the model with model_from_shards.


def read_params(ckpt_dir: str) -> ModelArgs:
    """params.json -> ModelArgs. vocab_size -1 (what Meta's LLaMA-2 files say) = the pieces of
    tokenizer.model."""
    with open(os.path.join(ckpt_dir, "params.json")) as f:
        args = ModelArgs(**json.load(f))
    if args.vocab_size == -1:
        tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(ckpt_dir, "tokenizer.model"))
        args.vocab_size = tokenizer.vocab_size()
    return args


def shard_dim(name: str, ndim: int):
    """The dimension a tensor is split along across model-parallel shards (None = replicated)."""
    if ndim == 1 or name.endswith("router.weight"):
        return None
    if ndim == 3:
        return 2 if name.endswith("w2") else 1
    if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight",
                                                         "feed_forward.w2.weight")):
        return 1
    return 0


def merge_shards(shards: list) -> dict:
    """Concatenate model-parallel shards (state dicts) into one state dict; a single shard is
    returned as is."""
    if len(shards) == 1:
        return dict(shards[0])
    merged = {}
    for name, first in shards[0].items():
        dim = shard_dim(name, first.dim())
        merged[name] = first if dim is None else torch.cat([s[name] for s in shards], dim=dim)
    return merged


def split_state_dict(state: dict, n_shards: int) -> list:
    """The inverse of merge_shards: cut every split tensor into n_shards equal pieces (cloned, so
    each shard file holds only its own bytes)."""
    if n_shards == 1:
        return [{k: v.detach() for k, v in state.items()}]
    shards = [{} for _ in range(n_shards)]
    for name, t in state.items():
        t = t.detach()
        dim = shard_dim(name, t.dim())
        pieces = [t] * n_shards if dim is None else t.chunk(n_shards, dim=dim)
        for shard, piece in zip(shards, pieces):
            shard[name] = piece.clone()
    return shards


def model_from_state(args: ModelArgs, state: dict, device="cpu", dtype=None):
    """The Transformer `args` describes, holding the tensors of `state` (Meta's names) as its
    parameters: built on the meta device (no memory, no initialisation), so a loaded checkpoint is
    never copied twice."""
    with torch.device("meta"):
        model = Transformer(args)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, assign=True)  # strict: every parameter present, nothing unexpected
    return model.to(device)


def load_checkpoint(ckpt_dir: str, device="cpu", dtype=None):
    """A Meta-format checkpoint directory -> (Transformer, ModelArgs).

    Every shard is memory-mapped (no copy: bf16 stays bf16 unless `dtype` asks otherwise) and read
    with weights_only=True (tensors only: a pickle in the file cannot run code); the shards are
    merged, and the model takes the tensors as its parameters, so peak memory stays near the
    checkpoint's size.
    """
    args = read_params(ckpt_dir)
    paths = sorted(glob.glob(os.path.join(ckpt_dir, "consolidated.*.pth")))
    shards = [torch.load(p, map_location="cpu", mmap=True, weights_only=True) for p in paths]
    return model_from_shards(args, shards, device, dtype), args


def model_from_shards(args: ModelArgs, shards: list, device="cpu", dtype=None):
    """The Transformer `args` describes, from Meta's model-parallel shards (state dicts): merged,
    the precomputed rotary table dropped (we compute it on the fly), the tensors taken as the
    model's parameters."""
    state = merge_shards(shards)
    state.pop("rope.freqs", None)
    return model_from_state(args, state, device, dtype)
