"""Hugging Face checkpoints, converted at the edge: HF Llama or Mixtral <-> our Meta layout.

Everything here works on plain dicts -- (params, state): Meta's params.json fields and a state dict
with Meta's names -- and imports nothing from the model; engineering/checkpoints.py calls it
(load_checkpoint reads a directory that has a config.json through read_hf_checkpoint;
`python -m engineering.export_hf CKPT OUT` writes through write_hf_checkpoint). Every file of a HF
directory is checked before any tensor is read or anything built: check_hf_dir, through
engineering/hf_checks.py (one check per input).
Read top to bottom:
  1. Tensor files            read_torch_file (.pth/.bin: weights only, memory-mapped),
                             read_safetensors (memory-mapped); a file cut short names its size and
                             what was expected
  2. config.json <-> params  params_from_hf_config, hf_config_from_params
  3. The q/k permutation     Meta rotates the pairs (x[2i], x[2i+1]) of a head, HF's rotate_half
                             the pairs (x[i], x[i + d/2]); HF's conversion script reorders the rows
                             of wq and wk so that HF row c*d/2 + i = Meta row 2i + c:
                             hf_rows_from_meta / meta_rows_from_hf
  4. Names                   meta_state_from_hf, hf_state_from_meta (Llama's names; a fused model's
                             experts as Mixtral-8x7B publishes them: block_sparse_moe.gate,
                             block_sparse_moe.experts.e.w1/w2/w3)
  5. Directories             is_hf_dir, check_hf_dir, read_hf_params, read_hf_checkpoint,
                             write_hf_checkpoint

    HF Llama / Mixtral                                        ours (Meta)
    model.embed_tokens.weight                                 tok_embeddings.weight
    model.layers.N.self_attn.{q,k}_proj.weight    (permuted)  layers.N.attention.w{q,k}.weight
    model.layers.N.self_attn.{v,o}_proj.weight                layers.N.attention.w{v,o}.weight
    model.layers.N.mlp.{gate,down,up}_proj.weight             layers.N.feed_forward.w{1,2,3}.weight
    model.layers.N.block_sparse_moe.gate.weight   [E, dim]    layers.N.feed_forward.router.weight
    ...block_sparse_moe.experts.e.w{1,3}.weight   [hid, dim]  layers.N.feed_forward.w{1,3}[e]
    ...block_sparse_moe.experts.e.w2.weight       [dim, hid]  layers.N.feed_forward.w2[e]
    model.layers.N.{input,post_attention}_layernorm.weight    layers.N.{attention,ffn}_norm.weight
    model.norm.weight, lm_head.weight                         norm.weight, output.weight

Ours stacks the experts: feed_forward.w{1,3} is [E, hid, dim], feed_forward.w2 [E, dim, hid]; the
router is [E, dim] in both. Mixtral's router is ours (moe.route): softmax in float32 over all E
experts, top-k, renormalised to sum to 1.
"""
import glob
import json
import os
import pickle
import re
import shutil
import struct

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engineering.fileio import replace_dir, write_atomic
from engineering.hf_checks import (check_hf_config, check_hf_tensors, check_index,
                                   check_tensor_files, check_tied_head, check_weight_counts,
                                   cut_short_error, read_json_object, read_safetensors_header)
from engineering.hf_tokenizer import hf_tokenizer_files, write_hf_tokenizer

HF_MARKER = "config.json"  # marks a HF checkpoint directory; write_hf_checkpoint writes it last
MAX_SHARD_BYTES = 5 * 2**30  # HF's usual: model-0000N-of-0000M.safetensors of at most 5 GiB each

# --------------------------------------------------------------------------------------------------
# 1. Tensor files. A download cut short is the commonest broken checkpoint: say which file, its
#    size, and what a whole one would be.


def zip_cut_short(path: str) -> bool:
    r"""True when the file does not end with a whole end-of-central-directory record -- 22 bytes
    from its signature PK\x05\x06, then a comment of the length it gives -- which every zip
    archive, so every torch.save file, ends with (its last 22 + 65,535 bytes hold it)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 22 - 65535))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    return (at < 0 or len(tail) - at < 22
            or len(tail) - at - 22 < struct.unpack("<H", tail[at + 20 : at + 22])[0])


def read_torch_file(path: str) -> dict:
    """A torch.save state dict (Meta's consolidated.NN.pth, HF's pytorch_model*.bin), memory-mapped,
    tensors only: weights_only=True refuses any pickled object that could run code."""
    if os.path.getsize(path) == 0:
        raise cut_short_error(path, "empty (expected a torch.save zip archive)")
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: refused: it holds pickled objects other than tensors, which could run code "
            f"on load (torch.load weights_only=True). Re-save it as a plain state dict. "
            f"Detail: {str(e)[:300]}") from None
    except (RuntimeError, OSError) as e:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":  # every zip archive starts with a local file header
                raise ValueError(f"{path}: not a zip-format torch.save file (an old torch's "
                                 f"format, or not a checkpoint): it cannot be memory-mapped; "
                                 f"re-save it with torch.save, or use the checkpoint's "
                                 f".safetensors files") from None
        if zip_cut_short(path):
            raise cut_short_error(path, "and no zip central directory at its end "
                                        "(a torch.save file ends with one)") from None
        raise ValueError(f"{path}: not a readable torch checkpoint ({str(e)[:300]})") from None
    return check_state_dict(loaded, path)


def read_safetensors(path: str) -> dict:
    """{name: tensor} of a .safetensors file whose header is checked already
    (hf_checks.read_safetensors_header, in check_hf_dir: capped, every entry, the file's size),
    memory-mapped (the format holds raw tensors only: nothing can run)."""
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable .safetensors file ({str(e)[:300]})") from None


def check_state_dict(loaded, path: str) -> dict:
    """What a torch.save file holds is a state dict {name: tensor} (not a list, a nested dict)."""
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: holds a {type(loaded).__name__}; expected a state dict "
                         f"{{name: tensor}}")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path}: entry {name!r:.100} is a {type(value).__name__}; expected a "
                             f"state dict {{name: tensor}}")
    return loaded


# --------------------------------------------------------------------------------------------------
# 2. config.json <-> Meta's params.json fields


def hf_rope_theta(config: dict) -> float:
    """rope_theta from a checked config.json: rope_parameters' (transformers 5), or the plain field
    (transformers 4), or LlamaConfig's default."""
    rope = config.get("rope_parameters") or {}
    return float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def params_from_hf_config(config: dict) -> dict:
    """A HF LlamaConfig / MixtralConfig, checked already (hf_checks.check_hf_config, in
    check_hf_dir) -> Meta's params.json fields (+ n_experts, top_k for Mixtral).

    Meta's params.json has no FFN width: the model derives it,
    multiple_of * ceil(m * int(8 dim / 3) / multiple_of) with m = ffn_dim_multiplier
    (model.ffn_hidden_dim). multiple_of = intermediate_size makes that rule return intermediate_size
    exactly, whenever m * int(8 dim / 3) lies in (0, intermediate_size]: m = None if it already
    does, else m = intermediate_size / int(8 dim / 3)."""
    dim, heads, hidden = (config["hidden_size"], config["num_attention_heads"],
                          config["intermediate_size"])
    meta_estimate = int(2 * (4 * dim) / 3)
    params = {"dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": heads,
              "n_kv_heads": config.get("num_key_value_heads") or heads,
              "vocab_size": config["vocab_size"], "multiple_of": hidden,
              "ffn_dim_multiplier": None if meta_estimate <= hidden else hidden / meta_estimate,
              "norm_eps": config.get("rms_norm_eps", 1e-6), "rope_theta": hf_rope_theta(config),
              "max_seq_len": config.get("max_position_embeddings") or 4096}
    if config["model_type"] == "mixtral":
        params.update(n_experts=config.get("num_local_experts", 8),
                      top_k=config.get("num_experts_per_tok", 2))
    return {k: v for k, v in params.items() if v is not None}


def hf_config_from_params(params: dict, hidden_dim: int, tied: bool, dtype: torch.dtype) -> dict:
    """Meta's params (resolved: vocab_size > 0) -> the config.json of a LlamaForCausalLM, or of a
    MixtralForCausalLM when params has n_experts > 0. hidden_dim: the FFN width (w1's rows)."""
    fused = params.get("n_experts", 0) > 0
    config = {
        "architectures": ["MixtralForCausalLM" if fused else "LlamaForCausalLM"],
        "model_type": "mixtral" if fused else "llama",
        "hidden_size": params["dim"], "intermediate_size": hidden_dim,
        "num_hidden_layers": params["n_layers"], "num_attention_heads": params["n_heads"],
        "num_key_value_heads": params.get("n_kv_heads") or params["n_heads"],
        "head_dim": params["dim"] // params["n_heads"],
        "hidden_act": "silu", "rms_norm_eps": params.get("norm_eps", 1e-5),
        "rope_theta": params.get("rope_theta", 10000.0), "rope_scaling": None,
        "max_position_embeddings": params.get("max_seq_len", 4096),
        "vocab_size": params["vocab_size"], "tie_word_embeddings": tied,
        "bos_token_id": 1, "eos_token_id": 2,  # Meta's sentencepiece ids
        "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if fused:
        config.update(num_local_experts=params["n_experts"],
                      num_experts_per_tok=params.get("top_k", 2),
                      output_router_logits=False, router_aux_loss_coef=0.0, sliding_window=None)
    else:
        config.update(attention_bias=False, mlp_bias=False)
    return config


# --------------------------------------------------------------------------------------------------
# 3. The q/k row permutation between Meta's rotary pairing and HF's rotate_half


def hf_rows_from_meta(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk [n_heads * d, dim] in Meta's row order -> HF's: in each head, the rows of the pairs'
    first elements (2i) come first, then the second elements (2i + 1)."""
    rows, dim = w.shape
    return (w.reshape(n_heads, rows // n_heads // 2, 2, dim)  # [H, d/2, 2, dim]
            .transpose(1, 2).reshape(rows, dim))  # [H, 2, d/2, dim] -> [H*d, dim]


def meta_rows_from_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of hf_rows_from_meta: HF row c*d/2 + i of a head goes back to Meta row 2i + c."""
    rows, dim = w.shape
    return (w.reshape(n_heads, 2, rows // n_heads // 2, dim)  # [H, 2, d/2, dim]
            .transpose(1, 2).reshape(rows, dim))  # [H, d/2, 2, dim] -> [H*d, dim]


# --------------------------------------------------------------------------------------------------
# 4. Names: HF's state dict <-> ours

LAYER_NAMES = {  # HF name inside model.layers.N. -> ours inside layers.N.
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "block_sparse_moe.gate.weight": "feed_forward.router.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight",
             "model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
EXPERT_NAME = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")


def meta_state_from_hf(hf: dict, params: dict) -> dict:
    """HF's state dict -> ours: renamed, wq/wk rows back in Meta's order, Mixtral's per-expert
    matrices stacked [E, ...], a tied head (no lm_head.weight) given its own copy of the embeddings.
    It trusts its input, checked whole by check_hf_dir: every name known, every layer's experts
    0 .. E-1 present, the embeddings there. (An old .bin's rotary table is dropped: we compute
    ours.)"""
    state, experts = {}, {}  # experts[(layer, "w1")][e] = tensor
    n_kv = params.get("n_kv_heads") or params["n_heads"]
    for name, t in hf.items():
        if name in TOP_NAMES:
            state[TOP_NAMES[name]] = t
            continue
        layer, _, rest = name.removeprefix("model.layers.").partition(".")
        expert = EXPERT_NAME.fullmatch(rest)
        if expert:
            experts.setdefault((layer, expert[2]), {})[int(expert[1])] = t
        elif rest in LAYER_NAMES:
            ours = f"layers.{layer}.{LAYER_NAMES[rest]}"
            heads = {"attention.wq.weight": params["n_heads"],
                     "attention.wk.weight": n_kv}.get(LAYER_NAMES[rest])
            state[ours] = t if heads is None else meta_rows_from_hf(t, heads)
    for (layer, matrix), by_expert in experts.items():
        state[f"layers.{layer}.feed_forward.{matrix}"] = torch.stack(
            [by_expert[e] for e in sorted(by_expert)])  # [E, ...]
    # tie_word_embeddings: one matrix is both the embeddings and the head
    if "output.weight" not in state:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    return state


def hf_state_from_meta(state: dict, params: dict) -> dict:
    """Ours -> HF's names (the inverse of meta_state_from_hf): wq/wk rows in HF's order, stacked
    experts split into Mixtral's per-expert matrices (views; write_hf_checkpoint copies them one
    file at a time)."""
    to_hf = {ours: hf for hf, ours in LAYER_NAMES.items()}
    n_kv = params.get("n_kv_heads") or params["n_heads"]
    out = {}
    for name, t in state.items():
        top = {ours: hf for hf, ours in TOP_NAMES.items()}.get(name)
        if top:
            out[top] = t
            continue
        _, layer, rest = name.split(".", 2)
        if t.dim() == 3:  # stacked experts [E, ...]
            matrix = rest.rsplit(".", 1)[-1]  # w1 | w2 | w3
            for e in range(t.shape[0]):  # t[e]: [hid|dim, ...]
                out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{matrix}.weight"] = t[e]
            continue
        heads = {"attention.wq.weight": params["n_heads"], "attention.wk.weight": n_kv}.get(rest)
        out[f"model.layers.{layer}.{to_hf[rest]}"] = (t if heads is None
                                                       else hf_rows_from_meta(t, heads))
    return out


# --------------------------------------------------------------------------------------------------
# 5. Directories


def is_hf_dir(ckpt_dir: str) -> bool:
    return os.path.isfile(os.path.join(ckpt_dir, HF_MARKER))


def config_path(ckpt_dir: str) -> str:
    """The file describing a checkpoint's architecture: config.json (HF) or params.json (Meta)."""
    return os.path.join(ckpt_dir, HF_MARKER if is_hf_dir(ckpt_dir) else "params.json")


def hf_weight_files(ckpt_dir: str) -> tuple:
    """(tensor file paths, the index's weight_map or None, the index's path or None) of a HF
    directory, looked for in HF's order: model.safetensors, the shards model.safetensors.index.json
    names, pytorch_model.bin, the shards pytorch_model.bin.index.json names. An index names plain
    files beside it (hf_checks.check_index)."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.isfile(os.path.join(ckpt_dir, single)):
            return [os.path.join(ckpt_dir, single)], None, None
        index_path = os.path.join(ckpt_dir, index)
        if os.path.isfile(index_path):
            suffix = os.path.splitext(single)[1]  # .safetensors | .bin
            weight_map = check_index(read_json_object(index_path), index_path, suffix)
            paths = [os.path.join(ckpt_dir, f) for f in sorted(set(weight_map.values()))]
            missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
            if missing:
                raise FileNotFoundError(f"{index_path}: names {missing[:3]}, not in {ckpt_dir} "
                                        f"(a download that stopped early?)")
            return paths, weight_map, index_path
    found = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ckpt_dir, "*.safetensors")) +
                   glob.glob(os.path.join(ckpt_dir, "*.bin")))
    raise FileNotFoundError(f"{ckpt_dir}: a HF directory (config.json) with no model.safetensors, "
                            f"model.safetensors.index.json, pytorch_model.bin or "
                            f"pytorch_model.bin.index.json"
                            + (f" (found {found}: sharded files need their index)"
                               if found else ""))


def tensor_table(path: str) -> dict:
    """{tensor name: (dtype name, shape)} of a tensor file, read without its data: a .safetensors
    header, or a .bin memory-mapped."""
    if path.endswith(".safetensors"):
        return read_safetensors_header(path)
    tensors = read_torch_file(path)
    return {name: (str(t.dtype).removeprefix("torch."), tuple(t.shape))
            for name, t in tensors.items()}


def check_hf_dir(ckpt_dir: str) -> tuple:
    """Everything read_hf_checkpoint trusts of a HF directory, checked before any tensor is read or
    anything built (engineering/hf_checks.py): config.json's fields, the index, every file's header,
    each tensor in one file and the one the index names, the layers and experts config.json counts
    present, and every tensor of its name, shape and dtype. Returns (config, {tensor file path:
    {tensor name: (dtype name, shape)}})."""
    path = os.path.join(ckpt_dir, HF_MARKER)
    config = read_json_object(path)
    check_hf_config(config, path)
    paths, weight_map, index_path = hf_weight_files(ckpt_dir)
    tables = {p: tensor_table(p) for p in paths}
    names = check_tensor_files(tables, weight_map, index_path)
    check_weight_counts(config, names, path, index_path or paths[0])
    check_hf_tensors(config, tables, path, index_path or paths[0])
    return config, tables


def read_hf_params(ckpt_dir: str) -> dict:
    """Meta's params fields of a HF directory, which is checked whole first (check_hf_dir): every
    size they give is one the weights present have."""
    config, _ = check_hf_dir(ckpt_dir)
    return params_from_hf_config(config)


def read_hf_checkpoint(ckpt_dir: str) -> tuple:
    """A HF Llama / Mixtral directory -> (Meta's params fields, state dict with Meta's names),
    checked whole first (check_hf_dir). Every file is memory-mapped; only wq/wk (reordered) and
    Mixtral's experts (stacked) are copied."""
    config, tables = check_hf_dir(ckpt_dir)
    path = os.path.join(ckpt_dir, HF_MARKER)
    hf = {}
    for file in tables:
        read = read_safetensors if file.endswith(".safetensors") else read_torch_file
        hf.update(read(file))
    head_file = next((file for file, table in tables.items() if "lm_head.weight" in table), None)
    check_tied_head(hf, config, path, head_file)
    params = params_from_hf_config(config)
    return params, meta_state_from_hf(hf, params)


def shards_of(hf: dict, max_shard_bytes: int) -> list:
    """Cut a state dict into consecutive groups of at most max_shard_bytes (a larger tensor is a
    group alone)."""
    groups, size = [[]], 0
    for name, t in hf.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def write_hf_checkpoint(out_dir: str, params: dict, state: dict, tokenizer_path: str = None,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> str:
    """Ours -> a HF directory: config.json, model.safetensors (or model-0000N-of-0000M.safetensors
    + its index when larger than max_shard_bytes), tokenizer.model and the tokenizer files
    AutoTokenizer reads (engineering/hf_tokenizer.py). Dense -> LlamaForCausalLM, fused ->
    MixtralForCausalLM. The head is written tied (no lm_head.weight) only when it equals the
    embeddings exactly. Written as a whole directory (engineering/fileio.py's replace_dir,
    config.json last); a directory that is not a HF checkpoint is refused."""
    embeddings, head = state["tok_embeddings.weight"], state["output.weight"]
    tied = embeddings.shape == head.shape and torch.equal(embeddings, head)
    w1 = state["layers.0.feed_forward.w1.weight" if params.get("n_experts", 0) == 0
               else "layers.0.feed_forward.w1"]
    config = hf_config_from_params(params, w1.shape[-2], tied, embeddings.dtype)
    hf = hf_state_from_meta({k: v for k, v in state.items() if not (tied and k == "output.weight")},
                            params)
    # the tokenizer's files first: one they cannot describe is refused before any weight is written
    tokenizer_files = (hf_tokenizer_files(tokenizer_path, config["max_position_embeddings"])
                       if tokenizer_path is not None else None)
    groups = shards_of(hf, max_shard_bytes)
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]

    def fill(tmp):
        for file_name, group in zip(names, groups):  # one file's copies in memory at a time
            save_file({k: hf[k].contiguous().clone() for k in group}, os.path.join(tmp, file_name),
                      metadata={"format": "pt"})
        if len(groups) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                    for t in hf.values())},
                     "weight_map": {k: f for f, group in zip(names, groups) for k in group}}
            write_atomic(os.path.join(tmp, "model.safetensors.index.json"),
                         json.dumps(index, indent=2))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, os.path.join(tmp, "tokenizer.model"))
            write_hf_tokenizer(tmp, tokenizer_path, files=tokenizer_files)
        write_atomic(os.path.join(tmp, HF_MARKER), json.dumps(config, indent=2))

    replace_dir(out_dir, fill, marker=HF_MARKER, kind="a Hugging Face checkpoint directory")
    return os.path.abspath(out_dir)
