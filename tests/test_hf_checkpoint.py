"""engineering/hf_checkpoint.py: Hugging Face Llama / Mixtral directories in and out.

The HF weights here are written by the test itself (random tensors under HF's names, saved with
safetensors), and checked against a naive forward written below in HF's own conventions
(rotate_half rotary, repeated kv heads, Mixtral's router), so the q/k row permutation cannot be
right by accident: a wrong one changes the logits."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import model as M
from engineering import checkpoints as C
from engineering import export_hf, fileio
from engineering.hf_checkpoint import hf_rows_from_meta, meta_rows_from_hf, write_hf_checkpoint
from engineering.tiny import make_tiny_checkpoint
from engineering.lean_fusion import build_fused_model

VOCAB = 320  # engineering/tiny.py's tokenizer


@pytest.fixture(scope="module")
def meta_dirs(tmp_path_factory):
    """Tiny Meta-format checkpoints: a dense one with grouped-query attention, a fused one
    (3 experts, top-2)."""
    root = tmp_path_factory.mktemp("meta")
    dense = make_tiny_checkpoint(str(root / "dense"), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 seed=1)
    fused = make_tiny_checkpoint(str(root / "fused"), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 seed=2, n_experts=3, top_k=2)
    return {"dense": dense, "fused": fused, "tokenizer": os.path.join(dense, "tokenizer.model")}


def hf_config(mixtral=False, tied=False, n_kv_heads=2):
    config = {"architectures": ["MixtralForCausalLM" if mixtral else "LlamaForCausalLM"],
              "model_type": "mixtral" if mixtral else "llama", "hidden_size": 32,
              "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": n_kv_heads, "rms_norm_eps": 1e-6, "rope_theta": 500.0,
              "vocab_size": VOCAB, "tie_word_embeddings": tied, "max_position_embeddings": 128,
              "hidden_act": "silu"}
    if mixtral:
        config.update(num_local_experts=3, num_experts_per_tok=2)
    return config


def random_hf_state(config, seed=0) -> dict:
    """Random weights under HF's names and shapes (Llama, or Mixtral's
    per-expert block_sparse_moe)."""
    g = torch.Generator().manual_seed(seed)
    D, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = D // config["num_attention_heads"]
    KV = config["num_key_value_heads"] * d

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    state = {"model.embed_tokens.weight": w(V, D), "model.norm.weight": 1 + w(D)}
    if not config["tie_word_embeddings"]:
        state["lm_head.weight"] = w(V, D)
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        state.update({p + "self_attn.q_proj.weight": w(D, D),
                      p + "self_attn.k_proj.weight": w(KV, D),
                      p + "self_attn.v_proj.weight": w(KV, D),
                      p + "self_attn.o_proj.weight": w(D, D),
                      p + "input_layernorm.weight": 1 + w(D),
                      p + "post_attention_layernorm.weight": 1 + w(D)})
        if config["model_type"] == "mixtral":
            state[p + "block_sparse_moe.gate.weight"] = w(config["num_local_experts"], D) * 3
            for e in range(config["num_local_experts"]):
                q = p + f"block_sparse_moe.experts.{e}."
                state.update({q + "w1.weight": w(I, D), q + "w2.weight": w(D, I),
                              q + "w3.weight": w(I, D)})
        else:
            state.update({p + "mlp.gate_proj.weight": w(I, D), p + "mlp.down_proj.weight": w(D, I),
                          p + "mlp.up_proj.weight": w(I, D)})
    return state


def write_hf_dir(path, config, state, tokenizer):
    """A HF directory as transformers' save_pretrained leaves it (written here,
    not by the code under test)."""
    os.makedirs(path)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    shutil.copyfile(tokenizer, os.path.join(path, "tokenizer.model"))
    return str(path)


# ---- an independent reference in HF's conventions ------------------------------------------------


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(hf: dict, config: dict, tokens):
    """A naive forward of a HF LlamaForCausalLM / MixtralForCausalLM state dict, as transformers
    computes it: q, k rotated as q * cos + rotate_half(q) * sin with cos, sin [T, d] (the d/2 angles
    repeated twice), kv heads repeated for their query heads, an explicit causal mask; Mixtral's
    router: softmax over all experts, top-k, renormalised, a loop over the experts."""
    B, T = tokens.shape
    D, H, KV = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    d, eps = D // H, config["rms_norm_eps"]
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, d, 2).float() / d)  # [d/2]
    angles = torch.outer(torch.arange(T).float(), inv_freq)  # [T, d/2]
    # cos, sin [T, d]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    mask = torch.full((T, T), float("-inf")).triu(1)  # [T, T]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def swiglu(x, gate, up, down):
        return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T

    x = hf["model.embed_tokens.weight"][tokens]  # [B, T, D]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = rms(x, hf[p + "input_layernorm.weight"])
        # q [B, H, T, d]; k, v [B, KV, T, d]
        q = (h @ hf[p + "self_attn.q_proj.weight"].T).view(B, T, H, d).transpose(1, 2)
        k = (h @ hf[p + "self_attn.k_proj.weight"].T).view(B, T, KV, d).transpose(1, 2)
        v = (h @ hf[p + "self_attn.v_proj.weight"].T).view(B, T, KV, d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # k, v, attn [B, H, T, d]
        k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(B, T, D) @ hf[p + "self_attn.o_proj.weight"].T
        h = rms(x, hf[p + "post_attention_layernorm.weight"])
        if config["model_type"] == "llama":
            x = x + swiglu(h, hf[p + "mlp.gate_proj.weight"], hf[p + "mlp.up_proj.weight"],
                           hf[p + "mlp.down_proj.weight"])
            continue
        probs = torch.softmax((h @ hf[p + "block_sparse_moe.gate.weight"].T).float(),
                              dim=-1)  # [B, T, E]
        top, idx = probs.topk(config["num_experts_per_tok"], dim=-1)  # [B, T, k]
        top = top / top.sum(-1, keepdim=True)
        for e in range(config["num_local_experts"]):
            q_ = p + f"block_sparse_moe.experts.{e}."
            # [B, T, 1], 0 where e is not in the top-k
            weight = (top * (idx == e)).sum(-1, keepdim=True)
            x = x + weight * swiglu(h, hf[q_ + "w1.weight"], hf[q_ + "w3.weight"],
                                    hf[q_ + "w2.weight"])
    head = hf.get("lm_head.weight", hf["model.embed_tokens.weight"])
    return rms(x, hf["model.norm.weight"]) @ head.T  # [B, T, V]


def max_rel_err(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


TOKENS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))


# ---- the permutation -----------------------------------------------------------------------------


def test_the_row_permutation_moves_meta_pair_rows_to_rotate_half_rows_and_back():
    H, d, D = 2, 8, 3
    meta = torch.arange(H * d * D, dtype=torch.float32).view(H * d, D)
    hf = hf_rows_from_meta(meta, H)
    for h in range(H):
        for i in range(d // 2):
            for c in range(2):  # HF row c * d/2 + i of a head = Meta row 2i + c
                assert torch.equal(hf[h * d + c * d // 2 + i], meta[h * d + 2 * i + c])
    assert torch.equal(meta_rows_from_hf(hf, H), meta) and not torch.equal(hf, meta)


# ---- HF in: logits of our model on the imported weights = the reference's on the HF weights ------


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-mha-tied", "mixtral"])
def test_a_hf_directory_loads_with_the_reference_logits(kind, meta_dirs, tmp_path):
    config = hf_config(mixtral=kind == "mixtral", tied="tied" in kind,
                       n_kv_heads=4 if "mha" in kind else 2)
    hf = random_hf_state(config, seed=3)
    ckpt = write_hf_dir(tmp_path / kind, config, hf, meta_dirs["tokenizer"])
    model, args = C.load_checkpoint(ckpt)
    assert (args.n_experts, args.rope_theta, args.kv_heads, M.ffn_hidden_dim(args)) == \
        (3 if kind == "mixtral" else 0, 500.0, config["num_key_value_heads"], 48)
    with torch.no_grad():
        err = max_rel_err(model(TOKENS), reference_logits(hf, config, TOKENS))
    print(f"{kind}: max relative error, ours on the imported weights vs the rotate_half reference: "
          f"{err:.2e}")
    assert err <= 1e-5, err
    # the permutation matters: the same weights without it give other logits
    unpermuted = M.Transformer(args)
    unpermuted.load_state_dict({k: hf_rows_from_meta(v, 4 if "wq" in k else args.kv_heads)
                                if ".wq." in k or ".wk." in k else v
                                for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert max_rel_err(unpermuted(TOKENS), reference_logits(hf, config, TOKENS)) > 1e-2


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "mixtral"])
def test_hf_to_ours_to_hf_is_the_identity_on_every_tensor(kind, meta_dirs, tmp_path):
    config = hf_config(mixtral=kind == "mixtral", tied="tied" in kind)
    hf = random_hf_state(config, seed=4)
    model, args = C.load_checkpoint(write_hf_dir(tmp_path / "in", config, hf,
                                                 meta_dirs["tokenizer"]))
    out = write_hf_checkpoint(str(tmp_path / "out"), C.params_json(args), model.state_dict(),
                              meta_dirs["tokenizer"])
    again = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(again) == sorted(hf)
    for name, t in hf.items():
        assert torch.equal(again[name], t), name
    written = json.load(open(os.path.join(out, "config.json")))
    for key, value in config.items():
        assert written[key] == value, key


def test_sharded_safetensors_and_sharded_bin_with_their_index_load_the_same(meta_dirs, tmp_path):
    config = hf_config()
    hf = random_hf_state(config, seed=5)
    whole, _ = C.load_checkpoint(write_hf_dir(tmp_path / "whole", config, hf,
                                              meta_dirs["tokenizer"]))
    args = C.read_checkpoint_args(str(tmp_path / "whole"))
    sharded = write_hf_checkpoint(str(tmp_path / "st"), C.params_json(args), whole.state_dict(),
                                  meta_dirs["tokenizer"], max_shard_bytes=40_000)
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert "model.safetensors.index.json" in os.listdir(sharded)
    # pytorch_model-0000N-of-0000M.bin + index, as older HF repos ship them
    # (with HF's rotary buffer in them)
    bins = tmp_path / "bin"
    bins.mkdir()
    names = sorted(hf)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for file, group in halves.items():
        extra = ({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)} if "00001" in file
                 else {})
        torch.save({n: hf[n] for n in group} | extra, bins / file)
    weight_map = {n: f for f, group in halves.items() for n in group}
    (bins / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copyfile(tmp_path / "whole" / "config.json", bins / "config.json")
    shutil.copyfile(meta_dirs["tokenizer"], bins / "tokenizer.model")
    for ckpt in (sharded, str(bins)):
        loaded = C.load_checkpoint(ckpt)[0].state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in whole.state_dict().items()), ckpt


# ---- HF out: a Meta checkpoint exported and imported again ---------------------------------------


@pytest.mark.parametrize("kind", ["dense", "fused"])
def test_export_hf_and_import_give_the_meta_layouts_logits(kind, meta_dirs, tmp_path):
    out = str(tmp_path / f"{kind}-hf")
    export_hf.main([meta_dirs[kind], out])
    assert sorted(os.listdir(out)) == [  # (the tokenizer's files: tests/test_hf_tokenizer.py)
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    config = json.load(open(os.path.join(out, "config.json")))
    tensors = load_file(os.path.join(out, "model.safetensors"))
    if kind == "fused":
        assert (config["architectures"] == ["MixtralForCausalLM"]
                and config["model_type"] == "mixtral")
        assert (config["num_local_experts"], config["num_experts_per_tok"]) == (3, 2)
        assert tensors["model.layers.1.block_sparse_moe.gate.weight"].shape == (3, 32)
        hidden = config["intermediate_size"]
        assert tensors["model.layers.1.block_sparse_moe.experts.2.w1.weight"].shape == (hidden, 32)
        assert tensors["model.layers.1.block_sparse_moe.experts.2.w2.weight"].shape == (32, hidden)
        assert not any("mlp." in n for n in tensors)
    else:
        assert (config["architectures"] == ["LlamaForCausalLM"]
                and config["num_key_value_heads"] == 2)
    meta_model, _ = C.load_checkpoint(meta_dirs[kind])
    hf_model, hf_args = C.load_checkpoint(out)
    assert M.ffn_hidden_dim(hf_args) == M.ffn_hidden_dim(meta_model.params)
    with torch.no_grad():
        err = max_rel_err(hf_model(TOKENS), meta_model(TOKENS))
        assert err <= 1e-5, err
        assert max_rel_err(reference_logits(tensors, config, TOKENS), meta_model(TOKENS)) <= 1e-5
    print(f"{kind}: max relative error, HF import vs Meta load: {err:.2e}")


def test_a_hf_base_and_expert_fuse_like_their_meta_copies(meta_dirs, tmp_path):
    """fuse.py --base / --experts read a HF directory through
    engineering/lean_fusion.py CheckpointRows."""
    hf_base = str(tmp_path / "base-hf")
    export_hf.main([meta_dirs["dense"], hf_base])
    from_meta, _ = build_fused_model(meta_dirs["dense"], [meta_dirs["dense"]] * 3,
                                     router_init="random", verbose=False)
    from_hf, _ = build_fused_model(hf_base, [hf_base, meta_dirs["dense"], hf_base],
                                   router_init="random", verbose=False)
    for k, v in from_meta.state_dict().items():
        assert torch.equal(from_hf.state_dict()[k], v), k


def test_an_interrupted_export_is_finished_by_the_next_write_not_a_read(meta_dirs, tmp_path,
                                                                         monkeypatch):
    out = tmp_path / "hf"

    def killed_before_the_last_rename(src, dst):
        if os.path.abspath(dst) == str(out):
            raise KeyboardInterrupt("killed")
        return real_replace(src, dst)

    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", killed_before_the_last_rename)
    monkeypatch.setattr(fileio.shutil, "rmtree", lambda *args, **kwargs: None)  # killed: no cleanup
    with pytest.raises(KeyboardInterrupt):
        export_hf.main([meta_dirs["dense"], str(out)])
    monkeypatch.undo()
    left = sorted(os.listdir(tmp_path))
    assert len(left) == 1 and left[0].startswith(".hf.tmp-")  # the whole new copy, never renamed
    with pytest.raises(FileNotFoundError, match=r"a save to it was interrupted and left \.hf\.tmp"):
        C.load_checkpoint(str(out))
    assert sorted(os.listdir(tmp_path)) == left  # a read moves and deletes nothing
    C.recover_checkpoint(str(out))  # what the next save to it (fuse.py, a training run) does first
    assert sorted(os.listdir(tmp_path)) == ["hf"] and (out / "config.json").exists()
    C.load_checkpoint(str(out))


# ---- broken checkpoints name their file ----------------------------------------------------------


def test_a_file_cut_short_names_its_size_and_what_was_expected(meta_dirs, tmp_path):
    hf_dir = str(tmp_path / "hf")
    export_hf.main([meta_dirs["dense"], hf_dir])
    path = os.path.join(hf_dir, "model.safetensors")
    full = os.path.getsize(path)
    os.truncate(path, full - 1000)
    with pytest.raises(ValueError, match=rf"model.safetensors: {full - 1000:,} bytes, but its "
                                         rf"header describes {full:,}; the file looks cut short"):
        C.load_checkpoint(hf_dir)
    meta = tmp_path / "meta"
    shutil.copytree(meta_dirs["dense"], meta)
    shard = meta / "consolidated.00.pth"
    for size in (os.path.getsize(shard) - 7, os.path.getsize(shard) // 2, 1000, 0):
        os.truncate(shard, size)
        with pytest.raises(ValueError, match=rf"consolidated.00.pth: {size:,} bytes, .*cut short"):
            C.load_checkpoint(str(meta))
    torch.save(C.load_checkpoint(meta_dirs["dense"])[0].state_dict(), shard,
               _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="consolidated.00.pth: not a zip-format torch.save file"):
        C.load_checkpoint(str(meta))  # (torch's pre-1.6 format cannot be memory-mapped)


def test_bad_hf_directories_are_refused_with_the_file_named(meta_dirs, tmp_path):
    config = hf_config()
    hf = random_hf_state(config)
    ckpt = write_hf_dir(tmp_path / "hf", config, hf, meta_dirs["tokenizer"])

    def with_config(name, **changes):
        d = tmp_path / name
        shutil.copytree(ckpt, d)
        (d / "config.json").write_text(json.dumps({**config, **changes}))
        return str(d)

    with pytest.raises(ValueError, match="config.json: rotary scaling 'llama3'"):
        C.load_checkpoint(with_config("llama31",
                                      rope_scaling={"rope_type": "llama3", "factor": 8.0}))
    with pytest.raises(ValueError, match="config.json: model_type 'mistral'"):
        C.load_checkpoint(with_config("mistral", model_type="mistral"))
    with pytest.raises(ValueError, match="config.json: head_dim=16"):
        C.load_checkpoint(with_config("head", head_dim=16))
    with pytest.raises(ValueError, match=r"model.safetensors: \S+ has shape \(320, 32\); "
                                         r"\S+config.json implies \(400, 32\) \(vocab_size, "):
        C.load_checkpoint(with_config("vocab", vocab_size=400))  # (weights before the tokenizer)
    odd = tmp_path / "odd"
    shutil.copytree(ckpt, odd)
    save_file(hf | {"model.layers.0.mlp.bias": torch.zeros(3)}, odd / "model.safetensors")
    with pytest.raises(ValueError,
                       match="odd/model.safetensors: unexpected tensor 'model.layers.0.mlp.bias'"):
        C.load_checkpoint(str(odd))
    index_only = tmp_path / "index"
    shutil.copytree(ckpt, index_only)
    os.remove(index_only / "model.safetensors")
    (index_only / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        n: "model-00001-of-00002.safetensors" for n in hf}}))
    with pytest.raises(FileNotFoundError,
                       match=r"index.json: names \['model-00001-of-00002.safetensors'\], not in"):
        C.load_checkpoint(str(index_only))
    os.remove(index_only / "model.safetensors.index.json")
    with pytest.raises(FileNotFoundError,
                       match="a HF directory .config.json. with no model.safetensors"):
        C.load_checkpoint(str(index_only))
    with pytest.raises(FileExistsError, match="is not a Hugging Face checkpoint directory"):
        export_hf.main([meta_dirs["dense"], meta_dirs["fused"]])  # never over a Meta checkpoint


# ---- optional: transformers itself (not a dependency of the project) -----------------------------


@pytest.mark.parametrize("kind", ["dense", "fused"])
def test_transformers_gives_our_logits_on_the_export(kind, meta_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    export_hf.main([meta_dirs[kind], out])
    cls = transformers.MixtralForCausalLM if kind == "fused" else transformers.LlamaForCausalLM
    theirs = cls.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = C.load_checkpoint(meta_dirs[kind])
    with torch.no_grad():
        err = max_rel_err(theirs(TOKENS).logits, ours(TOKENS))
    print(f"transformers {transformers.__version__} {cls.__name__}: max relative error {err:.2e}")
    assert err <= 1e-4, err
