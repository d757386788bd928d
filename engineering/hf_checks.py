"""The checks of a Hugging Face directory, one per input, before any tensor is read or model built.

A HF directory is someone else's files: hf_checkpoint.check_hf_dir reads it as strictly as
checkpoints.py reads Meta's, calling these in one line each. A broken directory ends in one
ValueError (FileNotFoundError for a file that is not there) naming the file, and the field or
tensor as the directory spells it (config.json's num_attention_heads, model.safetensors'
model.layers.0.self_attn.q_proj.weight). Nothing outside the directory is opened: an index may name
only plain file names beside it. (A symbolic link inside the directory is followed wherever it
points, as in Hugging Face's own cache, whose snapshot directories link to ../../blobs/.)

  read_json_object         config.json, an index: a small file of JSON, an object, no key twice
  check_hf_config          config.json's fields: types, ranges, divisibility, the architecture's
                           own consistency (the heads, rotary, Mixtral's experts)
  check_index              an index's weight_map: every entry a plain file name in the directory
  read_safetensors_header  a .safetensors header (at most 100 MB, the format's own cap): every
                           entry's dtype, shape and byte range, and the file's size against them
  check_tensor_files       every tensor in exactly one file, the file the index names
  check_weight_counts      num_hidden_layers, num_local_experts: bounded by the weights present
  check_hf_tensors         every tensor's name, shape (before any reshape) and dtype against
                           config.json; the head present unless tied
  check_tied_head          a tied config with an lm_head.weight of its own: only the embeddings
"""
import json
import math
import os
import re
import struct

MAX_JSON_BYTES = 100_000_000  # config.json is a few KB, an index at most a few MB
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own cap on its JSON header
MODEL_DTYPES = ("float16", "bfloat16", "float32", "float64")  # what the model can compute in
SAFETENSORS_DTYPES = {  # a header's dtype -> (the torch dtype's name, bytes per element)
    "F16": ("float16", 2), "BF16": ("bfloat16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "BOOL": ("bool", 1),
    "U8": ("uint8", 1), "I8": ("int8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8),
}
LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")
EXPERT_INDEX = re.compile(r"model\.layers\.\d+\.block_sparse_moe\.experts\.(\d+)\.")
ROTARY_BUFFER = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")  # old .bin

# ------------------------------------------------------------------------------------------------
# 1. JSON files


class RepeatedKey(ValueError):
    pass


def object_without_repeated_keys(pairs: list) -> dict:
    """json's object_pairs_hook: a key given twice is refused (json.loads would keep the last)."""
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise RepeatedKey(f"the key {key!r:.100} appears twice in one object")
        seen.add(key)
    return dict(pairs)


def json_object(data: bytes, where: str) -> dict:
    """JSON text (UTF-8/16/32) that must be an object {...}; anything else names `where`."""
    try:
        value = json.loads(data, object_pairs_hook=object_without_repeated_keys)
    except RepeatedKey as e:
        raise ValueError(f"{where}: {e}; which one is meant is a guess") from None
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError, UnicodeDecodeError; nesting
        raise ValueError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{where}: JSON {type(value).__name__} {str(value)[:60]}; expected an "
                         f"object {{...}}")
    return value


def read_json_object(path: str) -> dict:
    """config.json or an index file: at most MAX_JSON_BYTES of JSON, an object."""
    size = os.path.getsize(path)
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{path}: {size:,} bytes; expected a small JSON file (at most "
                         f"{MAX_JSON_BYTES:,} bytes)")
    with open(path, "rb") as f:
        return json_object(f.read(), path)


# ------------------------------------------------------------------------------------------------
# 2. config.json


def is_whole_number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_int(config: dict, key: str, path: str):
    if not is_whole_number(config[key]) or config[key] < 1:
        raise ValueError(f"{path}: {key}={config[key]!r:.80}; expected a whole number >= 1")


def check_positive_number(config: dict, key: str, path: str):
    if not is_real_number(config[key]) or config[key] <= 0:
        raise ValueError(f"{path}: {key}={config[key]!r:.80}; expected a finite number > 0")


def check_hf_config(config: dict, path: str):
    """config.json (at `path`) describes a LlamaForCausalLM or MixtralForCausalLM that this model
    computes exactly, in fields of the right type and range, before any of them is used."""
    check_architecture(config, path)
    required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "vocab_size")
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{path}: missing {missing}; expected a LlamaConfig or MixtralConfig")
    optional = ("num_key_value_heads", "head_dim", "max_position_embeddings")  # null: the default
    for key in required + tuple(key for key in optional if config.get(key) is not None):
        check_positive_int(config, key, path)
    for key in ("rms_norm_eps", "rope_theta"):
        if key in config:
            check_positive_number(config, key, path)
    if not isinstance(config.get("tie_word_embeddings", False), bool):
        raise ValueError(f"{path}: tie_word_embeddings={config['tie_word_embeddings']!r:.80}; "
                         f"expected true or false")
    check_heads(config, path)
    check_rotary(config, path)
    if config["model_type"] == "mixtral":
        check_experts(config, path)


def check_architecture(config: dict, path: str):
    """model_type llama or mixtral, SiLU, no biases: LLaMA's architecture, the one ours computes."""
    model_type = config.get("model_type")
    if model_type not in ("llama", "mixtral"):
        raise ValueError(f"{path}: model_type {model_type!r:.80}; expected 'llama' "
                         f"(LlamaForCausalLM) or 'mixtral'")
    for key, expected in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        value = config.get(key, expected)
        if value != expected or type(value) is not type(expected):
            raise ValueError(f"{path}: {key}={config[key]!r:.80}; expected {json.dumps(expected)} "
                             f"(LLaMA's architecture)")


def check_heads(config: dict, path: str):
    """The width splits into whole heads of an even size (rotary turns pairs of features), and the
    query heads into whole groups per key/value head (grouped-query attention)."""
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if dim % heads:
        raise ValueError(f"{path}: hidden_size={dim} is not divisible by "
                         f"num_attention_heads={heads}; each head gets hidden_size / "
                         f"num_attention_heads features")
    if config.get("head_dim") not in (None, dim // heads):
        raise ValueError(f"{path}: head_dim={config['head_dim']}; expected hidden_size / "
                         f"num_attention_heads = {dim // heads}")
    if (dim // heads) % 2:
        raise ValueError(f"{path}: hidden_size / num_attention_heads = {dim // heads} is odd; "
                         f"rotary position embeddings turn pairs of a head's features")
    if heads % kv_heads:
        raise ValueError(f"{path}: num_attention_heads={heads} is not divisible by "
                         f"num_key_value_heads={kv_heads}; each key/value head serves a whole "
                         f"group of query heads")


def check_rotary(config: dict, path: str):
    """Plain rotary only: rope_scaling (transformers 4) and rope_parameters (transformers 5) are
    null or an object of rope_type 'default'; a rope_theta in both agrees."""
    for key in ("rope_scaling", "rope_parameters"):
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"{path}: {key}={value!r:.80}; expected an object "
                             f"{{\"rope_type\": ...}} or null")
        value = value or {}
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ValueError(f"{path}: rotary scaling {kind!r:.80} ({key}); expected plain rotary "
                             f"(rope_type 'default')")
    parameters = config.get("rope_parameters") or {}
    if "rope_theta" in parameters:
        check_positive_number(parameters, "rope_theta", f"{path}: rope_parameters")
        if config.get("rope_theta", parameters["rope_theta"]) != parameters["rope_theta"]:
            raise ValueError(f"{path}: rope_theta={config['rope_theta']} but rope_parameters' "
                             f"rope_theta={parameters['rope_theta']}; which one is meant is a "
                             f"guess")


def check_experts(config: dict, path: str):
    """Mixtral: num_local_experts experts (MixtralConfig's default 8), num_experts_per_tok of them
    per token (default 2), and full attention (a sliding window is not ours)."""
    experts = {key: config.get(key, default)
               for key, default in (("num_local_experts", 8), ("num_experts_per_tok", 2))}
    for key in experts:
        check_positive_int(experts, key, path)
    if experts["num_experts_per_tok"] > experts["num_local_experts"]:
        raise ValueError(f"{path}: num_experts_per_tok={experts['num_experts_per_tok']} is more "
                         f"than num_local_experts={experts['num_local_experts']}")
    window, positions = config.get("sliding_window"), config.get("max_position_embeddings") or 4096
    if window is not None and not (is_whole_number(window) and window >= positions):
        raise ValueError(f"{path}: sliding_window={window!r:.80}; expected null: this model "
                         f"attends to every earlier position")


# ------------------------------------------------------------------------------------------------
# 3. The index of a sharded directory


def is_plain_file_name(name) -> bool:
    """A file name beside the index: no directory part, not '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and not os.path.isabs(name)
            and not any(c in name for c in ("/", "\\", "\0")))


def check_index(index: dict, index_path: str, suffix: str) -> dict:
    """An index's weight_map {tensor name: file}: not empty, and every file a plain name ending in
    `suffix` (so every file read lies in the index's own directory). Returns the weight_map."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: no \"weight_map\" {{tensor name: file}}; expected HF's "
                         f"index format")
    for name, file in weight_map.items():
        if not is_plain_file_name(file):
            raise ValueError(f"{index_path}: weight_map[{name!r:.100}] = {file!r:.300} is not a "
                             f"plain file name: it points outside the model directory; an index "
                             f"names the files beside it")
        if not file.endswith(suffix):
            raise ValueError(f"{index_path}: weight_map[{name!r:.100}] = {file!r:.300}; expected a "
                             f"{suffix} file")
    return weight_map


# ------------------------------------------------------------------------------------------------
# 4. Tensor files


def cut_short_error(path: str, detail: str) -> ValueError:
    return ValueError(f"{path}: {os.path.getsize(path):,} bytes, {detail}; the file looks cut "
                      f"short (a download or copy that stopped early): fetch it again")


def read_safetensors_header(path: str) -> dict:
    """{tensor name: (dtype name, shape)} of a .safetensors file, from its header alone: 8 bytes
    (the header's length n, at most MAX_HEADER_BYTES), n bytes of JSON, then the tensors back to
    back, each at the byte range its "data_offsets" [begin, end] gives (from the header's end)."""
    size = os.path.getsize(path)
    if size < 8:
        raise cut_short_error(path, "shorter than the 8-byte header length a .safetensors file "
                                    "starts with")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: a header of {n:,} bytes; the safetensors format allows at "
                             f"most {MAX_HEADER_BYTES:,} (not a .safetensors file, or a damaged "
                             f"one)")
        if 8 + n > size:
            raise cut_short_error(path, f"but its header alone is {8 + n:,} bytes")
        header = json_object(f.read(n), f"{path} (its header)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"{path}: header's __metadata__ is {metadata!r:.80}; expected an object")
    entries = {name: header_entry(header[name], name, path) for name in header}
    check_byte_ranges(entries, 8 + n, size, path)
    return {name: (dtype, shape) for name, (dtype, shape, _) in entries.items()}


def header_entry(entry, name: str, path: str) -> tuple:
    """(dtype name, shape, (begin, end)) of one header entry {"dtype", "shape", "data_offsets"},
    its byte range the size of its shape."""
    where = f"{path}: header entry {name!r:.100}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"{where} is {entry!r:.100}; expected {{\"dtype\", \"shape\", "
                         f"\"data_offsets\": [begin, end]}}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r:.40}; expected one of "
                         f"{sorted(SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(is_whole_number(s) and s >= 0 for s in shape):
        raise ValueError(f"{where}: shape {shape!r:.100}; expected a list of whole numbers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_whole_number, offsets))
            and 0 <= offsets[0] <= offsets[1]):
        raise ValueError(f"{where}: data_offsets {offsets!r:.100}; expected [begin, end], "
                         f"0 <= begin <= end")
    name_of_dtype, itemsize = SAFETENSORS_DTYPES[dtype]
    if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
        raise ValueError(f"{where}: data_offsets {offsets} span {offsets[1] - offsets[0]:,} bytes, "
                         f"but shape {shape} of {dtype} takes {math.prod(shape) * itemsize:,}")
    return name_of_dtype, tuple(shape), tuple(offsets)


def check_byte_ranges(entries: dict, header_bytes: int, size: int, path: str):
    """The tensors' byte ranges follow each other from 0 without gap or overlap, and end where the
    file (of `size` bytes, the first header_bytes of them its header) does."""
    end = 0
    for name, (_, _, (begin, stop)) in sorted(entries.items(), key=lambda item: item[1][2]):
        if begin != end:
            raise ValueError(f"{path}: header entry {name!r:.100} starts at byte {begin:,} of the "
                             f"data, expected {end:,} (the tensors lie back to back)")
        end = stop
    if header_bytes + end > size:
        raise cut_short_error(path, f"but its header describes {header_bytes + end:,}")
    if header_bytes + end < size:
        raise ValueError(f"{path}: {size - header_bytes - end:,} bytes after its last tensor; a "
                         f".safetensors file ends with its last tensor")


def check_tensor_files(tables: dict, weight_map, index_path) -> dict:
    """tables {file path: {tensor name: ...}}: every tensor in exactly one file and, with an index,
    in the file its weight_map names, every entry of which is in its file. Returns {tensor name:
    file path}."""
    file_of = {}
    for path, table in tables.items():
        for name in table:
            if name in file_of:
                raise ValueError(f"{path}: tensor {name!r:.100} is also in {file_of[name]}; every "
                                 f"tensor must be in exactly one file")
            file_of[name] = path
    if weight_map is None:
        return file_of
    for name, path in file_of.items():
        listed = weight_map.get(name)
        if listed is None and not ROTARY_BUFFER.fullmatch(name):  # (an unused buffer: ignored)
            raise ValueError(f"{index_path}: its weight_map does not list {name!r:.100}, which "
                             f"{os.path.basename(path)} holds")
        if listed is not None and listed != os.path.basename(path):
            raise ValueError(f"{index_path}: weight_map puts {name!r:.100} in {listed}, but "
                             f"{os.path.basename(path)} holds it")
    for name, file in weight_map.items():
        if name not in file_of:
            raise ValueError(f"{index_path}: weight_map puts {name!r:.100} in {file}, which does "
                             f"not hold it")
    return file_of


# ------------------------------------------------------------------------------------------------
# 5. The tensors against config.json


def check_weight_counts(config: dict, names, config_path: str, where: str):
    """num_hidden_layers and (Mixtral) num_local_experts are the numbers of layers and experts whose
    weights `where` holds: every size config.json gives is then bounded by the files present, before
    anything is built from it."""
    counts = [("num_hidden_layers", "layers", LAYER_INDEX, config["num_hidden_layers"])]
    if config["model_type"] == "mixtral":
        counts.append(("num_local_experts", "experts", EXPERT_INDEX,
                       config.get("num_local_experts", 8)))
    for key, what, pattern, expected in counts:
        found = sorted({m[1] for m in map(pattern.match, names) if m}, key=lambda i: (len(i), i))
        if len(found) != expected:
            listed = f" ({', '.join(found[:3])}{', ...' * (len(found) > 3)})" if found else ""
            raise ValueError(f"{config_path}: {key}={expected}, but {where} holds the weights of "
                             f"{len(found)} {what}{listed}")


def layer_shapes(config: dict) -> dict:
    """{name inside model.layers.N.: (shape, what gives it)} of one layer of the LlamaForCausalLM /
    MixtralForCausalLM that config.json describes (3 per expert: bounded by check_weight_counts)."""
    dim, heads = config["hidden_size"], config["num_attention_heads"]
    hidden = config["intermediate_size"]
    kv = (config.get("num_key_value_heads") or heads) * (dim // heads)
    kv_why = "num_key_value_heads * head_dim, hidden_size"
    shapes = {"self_attn.q_proj.weight": ((dim, dim), "hidden_size, hidden_size"),
              "self_attn.k_proj.weight": ((kv, dim), kv_why),
              "self_attn.v_proj.weight": ((kv, dim), kv_why),
              "self_attn.o_proj.weight": ((dim, dim), "hidden_size, hidden_size"),
              "input_layernorm.weight": ((dim,), "hidden_size"),
              "post_attention_layernorm.weight": ((dim,), "hidden_size")}
    swiglu = {"gate": (hidden, dim), "up": (hidden, dim), "down": (dim, hidden)}
    if config["model_type"] == "llama":
        for part, shape in swiglu.items():
            shapes[f"mlp.{part}_proj.weight"] = (shape, "intermediate_size, hidden_size")
        return shapes
    n_experts = config.get("num_local_experts", 8)
    shapes["block_sparse_moe.gate.weight"] = ((n_experts, dim), "num_local_experts, hidden_size")
    for e in range(n_experts):
        for matrix, part in (("w1", "gate"), ("w2", "down"), ("w3", "up")):
            shapes[f"block_sparse_moe.experts.{e}.{matrix}.weight"] = (swiglu[part],
                                                                       "intermediate_size")
    return shapes


def top_shapes(config: dict) -> dict:
    """{name: (shape, what gives it)} of the tensors outside the layers (the head, even tied)."""
    vocab, dim = config["vocab_size"], config["hidden_size"]
    return {"model.embed_tokens.weight": ((vocab, dim), "vocab_size, hidden_size"),
            "model.norm.weight": ((dim,), "hidden_size"),
            "lm_head.weight": ((vocab, dim), "vocab_size, hidden_size")}


def expected_shape(name: str, top: dict, layer: dict, n_layers: int):
    """(shape, what gives it) of tensor `name` in the model of top_shapes / layer_shapes with
    n_layers layers, or None when it has no such tensor."""
    if name in top:
        return top[name]
    index, _, rest = name.removeprefix("model.layers.").partition(".")
    is_layer = name.startswith("model.layers.") and index.isdigit() and index == str(int(index))
    return layer.get(rest) if is_layer and int(index) < n_layers else None


def expected_names(top: dict, layer: dict, n_layers: int):
    """Every tensor name of that model, one at a time (never all of them in memory)."""
    yield from top
    for i in range(n_layers):
        for rest in layer:
            yield f"model.layers.{i}.{rest}"


def check_hf_tensors(config: dict, tables: dict, config_path: str, where: str):
    """Every tensor of tables {file path: {name: (dtype name, shape)}} is one config.json (at
    config_path) describes, of its shape -- checked before anything is reshaped or stacked -- and
    floating point; every tensor it describes is there (the head unless tie_word_embeddings).
    `where`: the weight file, or the index, for what is missing. Call check_weight_counts first."""
    top, layer, n_layers = top_shapes(config), layer_shapes(config), config["num_hidden_layers"]
    kind = "MixtralForCausalLM" if config["model_type"] == "mixtral" else "LlamaForCausalLM"
    found = set()
    for path, table in tables.items():
        for name, (dtype, shape) in table.items():
            found.add(name)
            if ROTARY_BUFFER.fullmatch(name):
                continue  # HF's own rotary table: ignored, ours is computed
            wanted = expected_shape(name, top, layer, n_layers)
            if wanted is None:
                raise ValueError(f"{path}: unexpected tensor {name!r:.100}; a {kind} as "
                                 f"{config_path} describes it has none")
            if tuple(shape) != wanted[0]:
                raise ValueError(f"{path}: {name} has shape {tuple(shape)}; {config_path} implies "
                                 f"{wanted[0]} ({wanted[1]})")
            if dtype not in MODEL_DTYPES:
                raise ValueError(f"{path}: {name} is {dtype}; expected floating-point weights "
                                 f"({', '.join(MODEL_DTYPES)})")
    if "lm_head.weight" not in found and not config.get("tie_word_embeddings", False):
        raise ValueError(f"{where}: no lm_head.weight, and {config_path} has "
                         f"tie_word_embeddings false (transformers' default): the head is a matrix "
                         f"of its own, and it is missing")
    check_none_missing(expected_names(top, layer, n_layers), found, f"{where}: missing",
                       f"{config_path} describes a {kind} with them")


def check_none_missing(expected, found: set, what: str, why: str):
    """Every name `expected` yields (but the head) is in `found`; the first 4 missing are named.
    The names are walked one at a time, and no further than the 4th missing one: about len(found)
    of them, so a config.json that describes far more tensors than the files hold is refused
    without listing them all."""
    missing = []
    for name in expected:
        if name not in found and name != "lm_head.weight":
            missing.append(name)
            if len(missing) == 4:
                break
    if missing:
        raise ValueError(f"{what} {missing}{' (the first 4)' * (len(missing) == 4)}; {why}")


def check_tied_head(state: dict, config: dict, config_path: str, where: str):
    """tie_word_embeddings true: the head is the embeddings; a file that also holds an
    lm_head.weight may, only if it is that same matrix (else which one is the head is a guess)."""
    head, embeddings = state.get("lm_head.weight"), state["model.embed_tokens.weight"]
    tied = config.get("tie_word_embeddings", False)
    if tied and head is not None and not head.equal(embeddings):
        raise ValueError(f"{where}: lm_head.weight differs from model.embed_tokens.weight, but "
                         f"{config_path} has tie_word_embeddings true (the head is the embeddings)")
