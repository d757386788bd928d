"""Broken Hugging Face directories: each ends in one error that names the file -- never a traceback,
a hang, a memory blow-up, a silent load or a read outside the directory -- and reading deletes
nothing.

Every case is a copy of a valid directory the test writes itself (with tests/test_hf_checkpoint.py's
helpers), broken in one way. The battery runs each through checkpoints.load_checkpoint; the command
line (`python generate.py DIR --prompt hi`, as a user runs it) runs one case of each class by
default, and every case under -m slow."""
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from engineering import checkpoints as C
from engineering.fileio import recover_dir
from engineering.tiny import make_tiny_checkpoint
from test_hf_checkpoint import hf_config, random_hf_state, reference_logits, write_hf_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
BIN_SHARDS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin")
Q = "model.layers.0.self_attn.q_proj.weight"
K1 = "model.layers.1.self_attn.k_proj.weight"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = make_tiny_checkpoint(str(tmp_path_factory.mktemp("tok") / "meta"), dim=32, n_layers=1,
                             n_heads=4, n_kv_heads=2)
    return os.path.join(d, "tokenizer.model")


# ---- the valid directories the cases break ----------------------------------------------------


def write_sharded(path, config, state, tokenizer, files, save):
    """A directory of two tensor files and their index (HF's model-0000N-of-00002 layout)."""
    os.makedirs(path)
    names = sorted(state)
    halves = {files[0]: names[: len(names) // 2], files[1]: names[len(names) // 2:]}
    for file, group in halves.items():
        save({n: state[n] for n in group}, os.path.join(path, file))
    index = "model.safetensors.index.json" if files == SHARDS else "pytorch_model.bin.index.json"
    weight_map = {n: file for file, group in halves.items() for n in group}
    write_json(os.path.join(path, index), {"metadata": {}, "weight_map": weight_map})
    write_json(os.path.join(path, "config.json"), config)
    shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    return str(path)


def valid_dir(kind, path, tokenizer):
    """dense (model.safetensors), mixtral, sharded (2 .safetensors + index), bin (2 .bin + index)"""
    config = hf_config(mixtral=kind == "mixtral")
    state = random_hf_state(config, seed=7)
    if kind == "sharded":
        return write_sharded(path, config, state, tokenizer, SHARDS, save_file)
    if kind == "bin":
        return write_sharded(path, config, state, tokenizer, BIN_SHARDS, torch.save)
    return write_hf_dir(path, config, state, tokenizer)


# ---- ways to break one ------------------------------------------------------------------------


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f)


def edit_json(path, change):
    with open(path) as f:
        value = json.load(f)
    change(value)
    write_json(path, value)


def config_with(**changes):
    return lambda d: edit_json(os.path.join(d, "config.json"), lambda c: c.update(changes))


def index_entry(index_file, name, file):
    """The index's weight_map says tensor `name` is in `file`."""
    return lambda d: edit_json(os.path.join(d, index_file),
                               lambda index: index["weight_map"].update({name: file}))


def write_text(file, text):
    def edit(d):
        with open(os.path.join(d, file), "w") as f:
            f.write(text)
    return edit


def config_with_a_repeated_key(d):
    with open(os.path.join(d, "config.json")) as f:
        text = f.read()
    write_text("config.json", text.replace('"rope_theta": 500.0',
                                           '"rope_theta": 500.0, "rope_theta": 1.0'))(d)


def edit_tensors(change, file="model.safetensors"):
    """change(state) on a .safetensors file, written back."""
    def edit(d):
        state = dict(load_file(os.path.join(d, file)))
        change(state)
        save_file(state, os.path.join(d, file))
    return edit


def with_tensor(name, value, file="model.safetensors"):
    return edit_tensors(lambda state: state.update({name: value}), file)


def misshapen_k_in_its_shard(d):
    file = next(f for f in SHARDS if K1 in load_file(os.path.join(d, f)))
    with_tensor(K1, torch.zeros(16, 30), file)(d)


def edit_header(change, file="model.safetensors"):
    """change(header) on the JSON header of a .safetensors file; its tensor bytes stay unchanged."""
    def edit(d):
        path = os.path.join(d, file)
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header, data = json.loads(f.read(n)), f.read()
        change(header)
        raw = json.dumps(header).encode()
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + data)
    return edit


def raw_header(text: bytes):
    def edit(d):
        with open(os.path.join(d, "model.safetensors"), "wb") as f:
            f.write(struct.pack("<Q", len(text)) + text)
    return edit


def huge_header_length(d):
    """A header length of 5 GiB in a (sparse) file that long: reading it takes 5 GiB of memory."""
    path = os.path.join(d, "model.safetensors")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 5 * 2**30) + b"{")
    os.truncate(path, 5 * 2**30 + 8)


def shard_moved_outside(spelled_relative: bool):
    """Move shard 2 out of the directory, to ../elsewhere/x.safetensors, and point the index at it
    (by a relative or an absolute path): a valid file, so that reading it would load silently."""
    def edit(d):
        outside = os.path.join(os.path.dirname(d), "elsewhere", "x.safetensors")
        os.makedirs(os.path.dirname(outside))
        shutil.move(os.path.join(d, SHARDS[1]), outside)
        entry = os.path.relpath(outside, d) if spelled_relative else outside
        def point_outside(index):
            weight_map = index["weight_map"]
            weight_map.update({n: entry for n, f in weight_map.items() if f == SHARDS[1]})
        edit_json(os.path.join(d, "model.safetensors.index.json"), point_outside)
    return edit


def bin_holding_a_list(d):
    torch.save([torch.ones(2)], os.path.join(d, BIN_SHARDS[0]))


def tensor_in_both_shards(d):
    """model.embed_tokens.weight, in shard 1, also in shard 2 with other values."""
    first = load_file(os.path.join(d, SHARDS[0]))
    name = "model.embed_tokens.weight"
    with_tensor(name, first[name] + 1, SHARDS[1])(d)


def tensor_moved_to_the_other_shard(d):
    first = dict(load_file(os.path.join(d, SHARDS[0])))
    second = dict(load_file(os.path.join(d, SHARDS[1])))
    name = sorted(first)[0]
    second[name] = first.pop(name)
    save_file(first, os.path.join(d, SHARDS[0]))
    save_file(second, os.path.join(d, SHARDS[1]))


def layers_times_experts(d):
    """3,000 layers and 3,000 experts present (a norm of each extra layer, a w1 of each extra
    expert; both counts in config.json): a model of 3,000 x 3,000 x 3 expert matrices is described,
    tens of millions of names, and refused from the few thousand tensors present."""
    n = 3000

    def add(state):
        norm, w1 = state["model.norm.weight"], "model.layers.0.block_sparse_moe.experts.0.w1.weight"
        state.update({f"model.layers.{i}.input_layernorm.weight": norm.clone()
                      for i in range(2, n)})
        state.update({w1.replace(".0.w1", f".{e}.w1"): state[w1].clone() for e in range(3, n)})
        for layer in (0, 1):
            state[f"model.layers.{layer}.block_sparse_moe.gate.weight"] = torch.zeros(n, 32)
    edit_tensors(add)(d)
    config_with(num_hidden_layers=n, num_local_experts=n)(d)


# ---- the cases: (id, valid directory, how it is broken, error, what the one line must say) ----
# The message names the file (as the user's directory spells it) and the field or tensor.

V = ValueError
ST_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
CASES = [
    # read from the wrong place or silently wrong
    ("index-points-up", "sharded", shard_moved_outside(spelled_relative=True), V,
     r"model.safetensors.index.json: weight_map\['[^']+'\] = '../elsewhere/x.safetensors' is not "
     r"a plain file name: it points outside the model directory"),
    ("index-absolute-path", "sharded", shard_moved_outside(spelled_relative=False), V,
     r"model.safetensors.index.json: weight_map\['[^']+'\] = '/\S+/elsewhere/x.safetensors' is "
     r"not a plain file name"),
    ("index-bin-points-up", "bin", index_entry(BIN_INDEX, Q, "../x.bin"), V,
     r"pytorch_model.bin.index.json: weight_map\['model.layers.0.self_attn.q_proj.weight'\] = "
     r"'../x.bin' is not a plain file name"),
    ("index-wrong-suffix", "sharded", index_entry(ST_INDEX, Q, "weights.bin"), V,
     r"model.safetensors.index.json: weight_map\['[^']+'\] = 'weights.bin'; expected a "
     r".safetensors file"),
    ("tensor-in-two-shards", "sharded", tensor_in_both_shards, V,
     r"model-00002-of-00002.safetensors: tensor 'model.embed_tokens.weight' is also in "
     r"\S+model-00001-of-00002.safetensors"),
    ("tensor-not-where-the-index-says", "sharded", tensor_moved_to_the_other_shard, V,
     r"model.safetensors.index.json: weight_map puts '[^']+' in model-00001-of-00002.safetensors, "
     r"but model-00002-of-00002.safetensors holds it"),
    ("untied-without-head", "dense", edit_tensors(lambda s: s.pop("lm_head.weight")), V,
     r"model.safetensors: no lm_head.weight, and \S+config.json has tie_word_embeddings false"),
    ("tied-with-another-head", "dense", config_with(tie_word_embeddings=True), V,
     r"model.safetensors: lm_head.weight differs from model.embed_tokens.weight, but "
     r"\S+config.json has tie_word_embeddings true"),
    # config.json's fields, before they are used
    *[(f"{key}-{label}", "dense", config_with(**{key: value}), V,
       re.escape(f"config.json: {key}={value!r}; expected a whole number >= 1"))
      for key in ("hidden_size", "num_attention_heads", "num_hidden_layers")
      for label, value in (("string", "32"), ("float", 4.0), ("zero", 0), ("negative", -4))],
    *[(f"{key}-{label}", "dense", config_with(**{key: value}), V,
       re.escape(f"config.json: {key}={value!r}; expected a finite number > 0"))
      for key in ("rope_theta", "rms_norm_eps")
      for label, value in (("string", "1e-06"), ("zero", 0), ("negative", -1.5))],
    ("tie-word-embeddings-string", "dense", config_with(tie_word_embeddings="false"), V,
     r"config.json: tie_word_embeddings='false'; expected true or false"),
    ("heads-not-dividing-width", "dense", config_with(num_attention_heads=3), V,
     r"config.json: hidden_size=32 is not divisible by num_attention_heads=3"),
    ("kv-heads-not-dividing-heads", "dense", config_with(num_key_value_heads=3), V,
     r"config.json: num_attention_heads=4 is not divisible by num_key_value_heads=3"),
    ("odd-head-dim", "dense", config_with(hidden_size=36), V,
     r"config.json: hidden_size / num_attention_heads = 9 is odd"),
    ("rope-scaling-not-an-object", "dense", config_with(rope_scaling="linear"), V,
     r"config.json: rope_scaling='linear'; expected an object"),
    ("two-rope-thetas", "dense",
     config_with(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), V,
     r"config.json: rope_theta=500.0 but rope_parameters' rope_theta=10000.0"),
    ("experts-per-token-over-experts", "mixtral", config_with(num_experts_per_tok=4), V,
     r"config.json: num_experts_per_tok=4 is more than num_local_experts=3"),
    ("sliding-window", "mixtral", config_with(sliding_window=16), V,
     r"config.json: sliding_window=16; expected null"),
    ("config-repeated-key", "dense", config_with_a_repeated_key, V,
     r"config.json: the key 'rope_theta' appears twice"),
    # JSON that is not an object, headers that are not whole
    ("config-not-an-object", "dense", write_text("config.json", "[1, 2]"), V,
     r"config.json: JSON list \[1, 2\]; expected an object"),
    ("index-not-an-object", "sharded", write_text(ST_INDEX, '"weights"'), V,
     r"model.safetensors.index.json: JSON str weights; expected an object"),
    ("header-not-an-object", "dense", raw_header(b"[1, 2, 3]"), V,
     r"model.safetensors \(its header\): JSON list \[1, 2, 3\]; expected an object"),
    ("header-entry-without-offsets", "dense", edit_header(lambda h: h[Q].pop("data_offsets")), V,
     r"model.safetensors: header entry 'model.layers.0.self_attn.q_proj.weight' is .*expected "
     r"\{\"dtype\", \"shape\", \"data_offsets\": \[begin, end\]\}"),
    ("header-shape-not-its-bytes", "dense", edit_header(lambda h: h[Q].update(shape=[32, 33])), V,
     r"model.safetensors: header entry 'model.layers.0.self_attn.q_proj.weight': data_offsets "
     r"\[\d+, \d+\] span 4,096 bytes, but shape \[32, 33\] of F32 takes 4,224"),
    ("header-of-5-GiB", "dense", huge_header_length, V,
     r"model.safetensors: a header of 5,368,709,120 bytes; the safetensors format allows at most "
     r"100,000,000"),
    ("bin-holds-a-list", "bin", bin_holding_a_list, V,
     r"pytorch_model-00001-of-00002.bin: holds a list; expected a state dict"),
    # every tensor's shape and dtype, before any reshape or stacking
    ("q-proj-misshapen", "dense", edit_tensors(lambda s: s.update({Q: s[Q][:28]})), V,
     r"model.safetensors: model.layers.0.self_attn.q_proj.weight has shape \(28, 32\); "
     r"\S+config.json implies \(32, 32\)"),
    ("k-proj-misshapen", "sharded", misshapen_k_in_its_shard, V,
     r"model-0000\d-of-00002.safetensors: model.layers.1.self_attn.k_proj.weight has shape "
     r"\(16, 30\); \S+config.json implies \(16, 32\) \(num_key_value_heads \* head_dim, "
     r"hidden_size\)"),
    ("experts-of-different-shapes", "mixtral",
     with_tensor("model.layers.1.block_sparse_moe.experts.1.w1.weight", torch.zeros(40, 32)), V,
     r"model.safetensors: model.layers.1.block_sparse_moe.experts.1.w1.weight has shape "
     r"\(40, 32\); \S+config.json implies \(48, 32\)"),
    ("integer-weights", "dense",
     with_tensor("model.norm.weight", torch.ones(32, dtype=torch.int64)), V,
     r"model.safetensors: model.norm.weight is int64; expected floating-point weights"),
    # sizes bounded by the weights present, before anything is built
    ("a-billion-layers", "dense", config_with(num_hidden_layers=10**9), V,
     r"config.json: num_hidden_layers=1000000000, but \S+model.safetensors holds the weights of "
     r"2 layers"),
    ("a-billion-experts", "mixtral", config_with(num_local_experts=10**9), V,
     r"config.json: num_local_experts=1000000000, but \S+model.safetensors holds the weights of "
     r"3 experts"),
    ("layers-times-experts", "mixtral", layers_times_experts, V,
     r"model.safetensors: missing \['model.layers.0.block_sparse_moe.experts.3.w2.weight', .*\] "
     r"\(the first 4\); \S+config.json describes a MixtralForCausalLM"),
]
CLI_CASES = ["index-points-up", "tensor-in-two-shards", "untied-without-head",
             "hidden_size-string", "header-entry-without-offsets", "q-proj-misshapen",
             "a-billion-layers", "a-billion-experts",
             "header-of-5-GiB"]  # one of each class of the issue; -m slow runs them all


def broken_dir(case, tmp_path, tokenizer) -> str:
    _, kind, breakage, _, _ = case
    d = valid_dir(kind, str(tmp_path / "ckpt"), tokenizer)
    breakage(d)
    return d


def tree(root) -> dict:
    """{relative path: (size, mtime)} of every file under root: what a read must leave as it was."""
    files = [os.path.join(parent, f) for parent, _, names in os.walk(root) for f in names]
    return {os.path.relpath(f, root): (os.path.getsize(f), os.path.getmtime(f)) for f in files}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_load_checkpoint_refuses_a_broken_hf_directory_naming_the_file(case, tmp_path, tokenizer):
    d = broken_dir(case, tmp_path, tokenizer)
    before = tree(tmp_path)
    with pytest.raises(case[3], match=case[4]) as refused:
        C.load_checkpoint(d)
    assert "params.json" not in str(refused.value)  # an HF directory has none
    assert tree(tmp_path) == before  # nothing written, moved or deleted


def test_the_valid_directories_the_cases_break_load(tmp_path, tokenizer):
    """So that each refusal above is its breakage's; and into a model of one dtype."""
    for kind in ("dense", "mixtral", "sharded", "bin"):
        model, _ = C.load_checkpoint(valid_dir(kind, str(tmp_path / kind), tokenizer))
        assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("kind", ["dense", "mixtral", "sharded", "bin"])
def test_transformers_gives_our_logits_on_the_valid_directories(kind, tmp_path, tokenizer):
    """Optional (transformers is not a dependency): what the strict reader accepts, transformers
    reads to the same logits."""
    transformers = pytest.importorskip("transformers")
    d = valid_dir(kind, str(tmp_path / kind), tokenizer)
    cls = transformers.MixtralForCausalLM if kind == "mixtral" else transformers.LlamaForCausalLM
    theirs = cls.from_pretrained(d, dtype=torch.float32).eval()
    ours, _ = C.load_checkpoint(d)
    tokens = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(tokens).logits
        assert (ours(tokens) - want).abs().max() <= 1e-4 * want.abs().max()


def limited_memory():
    """The child's data (heap and private memory, not the libraries it maps) is capped at 4 GiB:
    reading gigabytes fails instead of swapping. (A valid tiny directory needs well under 1 GiB.)"""
    resource.setrlimit(resource.RLIMIT_DATA, (4 * 2**30, 4 * 2**30))


def run_generate(dirs: dict) -> dict:
    """{name: (exit code, stdout, stderr)} of `python generate.py DIR --prompt hi` for each of
    dirs {name: DIR}, two at a time, each under limited_memory."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    names, results = list(dirs), {}
    for at in range(0, len(names), 2):
        children = {name: subprocess.Popen(
            [sys.executable, "generate.py", dirs[name], "--prompt", "hi", "--max-new-tokens", "2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=limited_memory) for name in names[at:at + 2]}
        for name, child in children.items():
            try:
                stdout, stderr = child.communicate(timeout=240)  # a hang ends (no timing asserted)
            except subprocess.TimeoutExpired:
                child.kill()
                stdout, stderr = child.communicate()
            results[name] = (child.returncode, stdout, stderr)
    return results


def check_generate_refuses(cases, tmp_path, tokenizer):
    """Each broken directory: one line `generate.py: error: ...` saying what the case says, exit
    code 2, no traceback. A valid directory beside them generates under the same memory cap."""
    dirs = {case[0]: broken_dir(case, tmp_path / case[0], tokenizer) for case in cases}
    dirs["valid"] = valid_dir("sharded", str(tmp_path / "valid"), tokenizer)
    results = run_generate(dirs)
    returncode, stdout, stderr = results.pop("valid")
    assert returncode == 0 and "tokens/s" in stdout, stderr[-2000:]
    for name, _, _, _, message in cases:
        returncode, _, stderr = results[name]
        assert returncode == 2, (name, returncode, stderr[-2000:])
        assert "Traceback" not in stderr, (name, stderr[-2000:])
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("generate.py: error: "), (name, stderr)
        assert re.search(message, lines[0]), (name, lines[0])


def test_generate_py_refuses_one_broken_directory_of_each_class(tmp_path, tokenizer):
    cases = [c for c in CASES if c[0] in CLI_CASES]
    assert len(cases) == len(CLI_CASES)
    check_generate_refuses(cases, tmp_path, tokenizer)


@pytest.mark.slow
def test_generate_py_refuses_every_broken_directory(tmp_path, tokenizer):
    check_generate_refuses(CASES, tmp_path, tokenizer)


# ---- one dtype; reading deletes nothing -------------------------------------------------------


@pytest.mark.parametrize("most, odd", [(torch.float32, torch.float16),
                                       (torch.bfloat16, torch.float32)])
def test_mixed_dtypes_load_as_one_model_in_the_dtype_of_most_weights(most, odd, tmp_path,
                                                                      tokenizer):
    config = hf_config()
    state = {n: t.to(most) for n, t in random_hf_state(config, seed=8).items()}
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].to(odd)
    model, _ = C.load_checkpoint(write_hf_dir(tmp_path / "mixed", config, state, tokenizer))
    assert {p.dtype for p in model.parameters()} == {most}
    tokens = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens).float()
    want = reference_logits({n: t.to(most).float() for n, t in state.items()}, config, tokens)
    assert (ours - want).abs().max() <= 0.05 * want.abs().max()  # (bfloat16 rounds every product)


def test_a_read_leaves_lookalike_temporary_directories_alone(tmp_path, tokenizer):
    """Siblings named like replace_dir's temporary directories (.NAME.tmp-*, .NAME.old-*) without
    its marker are someone else's: neither a read nor the recovery of an interrupted save moves or
    deletes them."""
    d = valid_dir("dense", str(tmp_path / "hf"), tokenizer)
    (tmp_path / ".hf.tmp-notes").mkdir()
    (tmp_path / ".hf.tmp-notes" / "draft.txt").write_text("mine")
    shutil.copytree(d, tmp_path / ".hf.old-backup" / "copy")  # even a complete-looking old copy
    before = tree(tmp_path)
    C.load_checkpoint(d)
    C.read_checkpoint_args(d)
    C.recover_checkpoint(d)
    assert tree(tmp_path) == before
    shutil.rmtree(d)
    recover_dir(d, "config.json")  # no marker: not taken for an interrupted save of d
    assert not os.path.exists(d)
    assert (tmp_path / ".hf.tmp-notes" / "draft.txt").read_text() == "mine"
    assert (tmp_path / ".hf.old-backup" / "copy" / "config.json").exists()
