"""model.py against independent references: direct formulas, naive loops, round trips."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import model as M
from engineering import checkpoints as C
from data.tokenizer import Tokenizer
import generate
from data.format import format_prompt
from data.tokenizer import train_tokenizer
from engineering.tiny import make_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"), dim=64, n_layers=2,
                                n_heads=4, n_kv_heads=2, seed=1)


def small_args(**kw):
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                max_seq_len=64)
    base.update(kw)
    return M.ModelArgs(**base)


# ---- building blocks -----------------------------------------------------------------------------


def test_ffn_hidden_dim_matches_llama2_sizes():
    assert M.ffn_hidden_dim(M.ModelArgs(dim=4096, multiple_of=256)) == 11008  # LLaMA-2-7B
    assert M.ffn_hidden_dim(M.ModelArgs(dim=5120, multiple_of=256)) == 13824  # 13B
    assert M.ffn_hidden_dim(M.ModelArgs(dim=8192, multiple_of=4096,
                                        ffn_dim_multiplier=1.3)) == 28672  # 70B


def test_rotary_matches_complex_rotation_formula():
    torch.manual_seed(0)
    B, T, H, d, start = 2, 5, 3, 8, 7
    x = torch.randn(B, T, H, d, dtype=torch.float64)
    cos, sin = M.rotary_cos_sin(d, start, T, 10000.0, "cpu")
    got = M.apply_rotary(x, cos.double(), sin.double())
    # direct formula: pair (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1],
    # multiplied by e^{i p w_i}
    want = torch.empty_like(x)
    for t in range(T):
        p = start + t
        for i in range(d // 2):
            w = 10000.0 ** (-2 * i / d)
            z = (torch.complex(x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1])
                 * complex(math.cos(p * w), math.sin(p * w)))
            want[:, t, :, 2 * i], want[:, t, :, 2 * i + 1] = z.real, z.imag
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def naive_attention(attn, x, start_pos=0):
    """Per-head loop, explicit causal mask, kv head = q head // (H / KV)."""
    B, T, D = x.shape
    H, KV, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = (x @ attn.wq.weight.T).view(B, T, H, d)
    k = (x @ attn.wk.weight.T).view(B, T, KV, d)
    v = (x @ attn.wv.weight.T).view(B, T, KV, d)
    cos, sin = M.rotary_cos_sin(d, start_pos, T, 10000.0, "cpu")
    q, k = (M.apply_rotary(q, cos.to(x.dtype), sin.to(x.dtype)),
            M.apply_rotary(k, cos.to(x.dtype), sin.to(x.dtype)))
    heads = []
    for h in range(H):
        kv = h // (H // KV)
        scores = q[:, :, h] @ k[:, :, kv].transpose(1, 2) / math.sqrt(d)  # [B, T, T]
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
        scores = scores.masked_fill(~causal, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[:, :, kv])
    return torch.cat(heads, dim=-1) @ attn.wo.weight.T


def test_attention_matches_naive_per_head_loop():
    torch.manual_seed(0)
    attn = M.Attention(small_args()).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    cos, sin = M.rotary_cos_sin(attn.head_dim, 0, 6, 10000.0, "cpu")
    got = attn(x, 0, cos.double(), sin.double())
    torch.testing.assert_close(got, naive_attention(attn, x))


def test_grouped_query_attention_equals_expanded_multi_head():
    torch.manual_seed(0)
    gqa = M.Attention(small_args(n_kv_heads=2)).double()
    mha = M.Attention(small_args(n_kv_heads=4)).double()
    d, repeats = gqa.head_dim, 2
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):  # kv head j serves q heads 2j, 2j+1: duplicate its rows
            w = getattr(gqa, name).weight.view(2, d, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(repeats, dim=0).reshape(4 * d, 32))
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    cos, sin = M.rotary_cos_sin(d, 0, 5, 10000.0, "cpu")
    torch.testing.assert_close(gqa(x, 0, cos.double(), sin.double()),
                               mha(x, 0, cos.double(), sin.double()))


def naive_forward(sd, args, tokens):
    """A from-the-state-dict re-implementation of LLaMA, written
    independently of model.py's modules."""
    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + args.norm_eps) * w

    h = sd["tok_embeddings.weight"][tokens]
    for i in range(args.n_layers):
        p = f"layers.{i}."
        attn = M.Attention(args).double()
        attn.load_state_dict({k[len(p + "attention."):]: v for k, v in sd.items()
                              if k.startswith(p + "attention.")})
        h = h + naive_attention(attn, rms(h, sd[p + "attention_norm.weight"]))
        x = rms(h, sd[p + "ffn_norm.weight"])
        gate = x @ sd[p + "feed_forward.w1.weight"].T
        h = h + ((gate * torch.sigmoid(gate) * (x @ sd[p + "feed_forward.w3.weight"].T))
                 @ sd[p + "feed_forward.w2.weight"].T)
    return rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def test_forward_matches_naive_reimplementation(tiny_dir):
    model, args = C.load_checkpoint(tiny_dir, dtype=torch.float64)
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    want = naive_forward({k: v.double() for k, v in model.state_dict().items()}, args, tokens)
    torch.testing.assert_close(model(tokens).double(), want)


# ---- decoding ------------------------------------------------------------------------------------


def test_a_block_traces_as_one_graph_for_any_sequence_length():
    """--compile compiles every block with dynamic sequence lengths (T changes from batch to batch):
    the block must trace without a graph break (fullgraph=True raises on one) and give the eager
    result, for a fused block too. backend="eager" checks the tracing only, in a second."""
    torch._dynamo.reset()
    for n_experts in (0, 3):
        args = M.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=50,
                           multiple_of=16, n_experts=n_experts, top_k=2)
        block = M.Transformer(args).layers[0]
        compiled = torch.compile(block, backend="eager", fullgraph=n_experts == 0, dynamic=True)
        for T in (5, 9):
            x = torch.randn(2, T, 32)
            cos, sin = M.rotary_cos_sin(args.dim // args.n_heads, 0, T, args.rope_theta, x.device)
            torch.testing.assert_close(compiled(x, 0, cos, sin), block(x, 0, cos, sin))


def test_kv_cache_decoding_equals_full_forward(tiny_dir):
    model, args = C.load_checkpoint(tiny_dir, dtype=torch.float64)
    tokens = torch.randint(0, args.vocab_size, (2, 12))
    full = model(tokens)
    model.setup_cache(2, 12)
    chunks = ([model(tokens[:, :5], 0), model(tokens[:, 5:8], 5)]
              + [model(tokens[:, t:t + 1], t) for t in range(8, 12)])
    model.clear_cache()
    torch.testing.assert_close(torch.cat(chunks, dim=1), full)


def test_batched_ragged_prompts_equal_one_at_a_time_greedy(tiny_dir):
    model, args = C.load_checkpoint(tiny_dir, dtype=torch.float64)
    tok = Tokenizer(os.path.join(tiny_dir, "tokenizer.model"))
    prompts = ["the river", "a small bright tree over the mountain stone", "why"]
    batched = M.generate(model, tok, prompts, max_new_tokens=12)
    alone = [M.generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    assert all(len(tok.encode(c, False, False)) > 0 for c in batched)


def test_generation_stops_at_eos_and_top_p_is_seeded(tiny_dir):
    model, args = C.load_checkpoint(tiny_dir)
    with torch.no_grad():  # make </s> the argmax everywhere: greedy decoding must return nothing
        model.output.weight[2] += 100 * model.norm.weight.sign()
    assert M.generate_tokens(model, [[1, 5, 6]], 8, eos_id=2) == [[]]
    model, _ = C.load_checkpoint(tiny_dir)
    torch.manual_seed(3)
    a = M.generate_tokens(model, [[1, 5], [1, 7, 8]], 6, temperature=1.0, top_p=0.9)
    torch.manual_seed(3)
    assert a == M.generate_tokens(model, [[1, 5], [1, 7, 8]], 6, temperature=1.0, top_p=0.9)


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    draws = {int(M.sample_next(logits, 1.0, 0.7)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are never drawn


# ---- checkpoints ---------------------------------------------------------------------------------


def test_shards_merge_to_the_same_model_and_split_is_byte_exact(tiny_dir, tmp_path):
    model, args = C.load_checkpoint(tiny_dir)
    ref = model.state_dict()
    for n in (2, 4):
        out = C.save_checkpoint(model, str(tmp_path / f"s{n}"), n_shards=n)
        files = sorted(f for f in os.listdir(out) if f.endswith(".pth"))
        assert files == [f"consolidated.{i:02d}.pth" for i in range(n)]
        shard0 = torch.load(os.path.join(out, files[0]), weights_only=True)
        assert (shard0["layers.0.attention.wq.weight"].shape[0]
                == ref["layers.0.attention.wq.weight"].shape[0] // n)
        assert (shard0["layers.0.feed_forward.w2.weight"].shape[1]
                == ref["layers.0.feed_forward.w2.weight"].shape[1] // n)
        merged, _ = C.load_checkpoint(out)
        for k, v in ref.items():
            assert torch.equal(merged.state_dict()[k].view(torch.uint8), v.view(torch.uint8)), k


def test_the_checked_load_reads_each_shard_once_and_builds_the_plain_readers_model(
        tiny_dir, tmp_path, monkeypatch):
    """checkpoints.load_checkpoint checks every file as it reads it and builds the model from what
    it checked: each consolidated.NN.pth goes through torch.load once, and the model and args are
    model.load_checkpoint's (the plain reader a student reads), bit for bit."""
    model, _ = C.load_checkpoint(tiny_dir)
    out = C.save_checkpoint(model, str(tmp_path / "two"), n_shards=2)
    plain, plain_args = M.load_checkpoint(out)
    loaded, real_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: loaded.append(f) or real_load(f, *a, **k))
    checked, args = C.load_checkpoint(out)
    assert sorted(loaded) == [os.path.join(out, f"consolidated.0{i}.pth") for i in range(2)]
    assert args == plain_args
    plain_state = plain.state_dict()
    assert set(checked.state_dict()) == set(plain_state)
    for name, t in checked.state_dict().items():
        assert t.dtype == plain_state[name].dtype and torch.equal(t, plain_state[name]), name


def test_save_load_round_trip_is_exact_and_bf16_stays_bf16(tmp_path):
    d = make_tiny_checkpoint(str(tmp_path / "bf16"), dtype=torch.bfloat16, seed=2)
    model, args = C.load_checkpoint(d)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = C.save_checkpoint(model, str(tmp_path / "again"))
    again, args2 = C.load_checkpoint(out)
    assert args2 == args
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert json.load(open(os.path.join(out, "params.json")))["vocab_size"] == args.vocab_size
    # a plain Meta params.json
    assert "n_experts" not in json.load(open(os.path.join(out, "params.json")))


def test_rope_freqs_key_is_ignored_and_vocab_minus_one_comes_from_tokenizer(tiny_dir, tmp_path):
    d = str(tmp_path / "meta")
    shutil.copytree(tiny_dir, d)
    sd = torch.load(os.path.join(d, "consolidated.00.pth"), weights_only=True)
    sd["rope.freqs"] = torch.ones(8)
    torch.save(sd, os.path.join(d, "consolidated.00.pth"))
    params = json.load(open(os.path.join(d, "params.json")))
    params["vocab_size"] = -1
    json.dump(params, open(os.path.join(d, "params.json"), "w"))
    model, args = C.load_checkpoint(d)
    assert args.vocab_size == 320


def test_interrupted_save_keeps_the_old_checkpoint(tiny_dir, tmp_path, monkeypatch):
    d = shutil.copytree(tiny_dir, str(tmp_path / "ckpt"))
    model, _ = C.load_checkpoint(d)
    calls = []

    def failing_save(obj, path):
        calls.append(path)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        C.save_checkpoint(model, d, n_shards=2)
    assert calls and sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left behind
    monkeypatch.undo()
    C.load_checkpoint(d)  # the old checkpoint is intact


KILL_CHILD = """
import os, shutil, sys, torch
from engineering import checkpoints as C
ckpt, killed_at = sys.argv[1], int(sys.argv[2])
old, _ = C.load_checkpoint(ckpt)
new_state = {k: v + 1.0 for k, v in old.state_dict().items()}
calls = []
def kill_at(real):
    def wrapped(*a, **kw):
        calls.append(a[0])
        if len(calls) == killed_at:
            os._exit(137)  # like SIGKILL: no cleanup handler runs
        return real(*a, **kw)
    return wrapped
C.os.replace, C.shutil.rmtree = kill_at(os.replace), kill_at(shutil.rmtree)
C.save_checkpoint(new_state, ckpt, args=old.params)
"""


@pytest.mark.parametrize("killed_at", [1, 2, 3, 4, 5])
def test_save_killed_at_any_step_leaves_a_complete_checkpoint(tiny_dir, tmp_path, killed_at):
    """save_checkpoint over an existing checkpoint (engineering.fileio.replace_dir): (1) params.json
    written in the temporary copy .NAME.tmp-*/copy (the copy is now complete), (2) NAME ->
    .NAME.old-*/copy, (3) .NAME.tmp-*/copy -> NAME, (4) delete the old copy, (5) delete
    .NAME.tmp-* (now only its marker). A process killed before step k leaves what it leaves; a
    read of it then changes nothing, and the next write's recovery (recover_checkpoint) must find a
    complete checkpoint -- the new one once the new copy was complete and the old one was moved
    away (k >= 3), else the old one -- and nothing left over."""
    d = shutil.copytree(tiny_dir, str(tmp_path / "ckpt"))
    before = C.load_checkpoint(d)[0].state_dict()
    child = subprocess.run([sys.executable, "-c", KILL_CHILD, d, str(killed_at)], cwd=ROOT,
                           capture_output=True, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert child.returncode == 137, child.stderr[-2000:]
    left = sorted(os.listdir(tmp_path))
    assert left != ["ckpt"]  # the kill did leave something half-done
    try:
        C.load_checkpoint(d)
    except FileNotFoundError:  # killed between the renames: NAME is not there until recovery
        assert killed_at == 3
    assert sorted(os.listdir(tmp_path)) == left  # reading moved and deleted nothing
    C.recover_checkpoint(d)
    loaded = C.load_checkpoint(d)[0].state_dict()
    shift = 1.0 if killed_at >= 3 else 0.0
    for k, v in loaded.items():
        torch.testing.assert_close(v, before[k] + shift)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no .tmp-* or .old-* left


# ---- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_llama_settings_round_trip_unicode(tmp_path):
    path = train_tokenizer(["hello world 12345 naïve café",
                            "東京 is a city. ünïcödé über alles 2024"] * 40,
                           str(tmp_path / "tokenizer.model"), vocab_size=300)
    tok = Tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.n_words) == (1, 2, -1, 300)
    text = "Grüße aus 東京 — 42 🦙 emojis fall back to bytes"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids[1:-1]) == text
    digits = [tok.sp.id_to_piece(i) for i in tok.encode("12345", False, False)]
    assert [p.strip("▁") for p in digits if p.strip("▁")] == list("12345")  # split_digits


# ---- bad input -----------------------------------------------------------------------------------


def edit(tiny_dir, tmp_path, params=None, state=None, name="bad"):
    d = shutil.copytree(tiny_dir, str(tmp_path / name))
    if params:
        p = json.load(open(os.path.join(d, "params.json")))
        params(p)
        json.dump(p, open(os.path.join(d, "params.json"), "w"))
    if state:
        sd = dict(torch.load(os.path.join(d, "consolidated.00.pth"), weights_only=True))
        state(sd)
        torch.save(sd, os.path.join(d, "consolidated.00.pth"))
    return d


def test_bad_params_json(tiny_dir, tmp_path):
    d = edit(tiny_dir, tmp_path, params=lambda p: p.update(use_scaled_rope=True))
    with pytest.raises(ValueError, match=r"params.json: unknown key 'use_scaled_rope'"):
        C.load_checkpoint(d)
    d = edit(tiny_dir, tmp_path, params=lambda p: p.update(vocab_size=-1), name="novocab")
    os.remove(os.path.join(d, "tokenizer.model"))
    with pytest.raises(ValueError, match="vocab_size is -1 and there is no"):
        C.load_checkpoint(d)
    d = edit(tiny_dir, tmp_path, params=lambda p: p.update(dim=96), name="dim")
    with pytest.raises(ValueError, match=r"tok_embeddings.weight has shape \(320, 64\), "
                                         r"params.json implies \(320, 96\)"):
        C.load_checkpoint(d)
    # sizes far beyond the weights present are refused from the weights, before a model is built
    d = edit(tiny_dir, tmp_path, params=lambda p: p.update(n_layers=10**9), name="layers")
    with pytest.raises(ValueError, match=r"params.json: n_layers=1000000000, but .* \(2 layers\)"):
        C.load_checkpoint(d)
    d = edit(tiny_dir, tmp_path, params=lambda p: p.update(n_experts=10**9), name="experts")
    with pytest.raises(ValueError,
                       match=r"params.json: n_experts=1000000000, but .* no stacked experts"):
        C.load_checkpoint(d)


def test_missing_and_unexpected_keys_and_tokenizer_mismatch(tiny_dir, tmp_path):
    d = edit(tiny_dir, tmp_path, state=lambda sd: sd.pop("layers.1.ffn_norm.weight"))
    with pytest.raises(ValueError, match=r"missing keys \['layers.1.ffn_norm.weight'\]"):
        C.load_checkpoint(d)
    d = edit(tiny_dir, tmp_path, state=lambda sd: sd.update(extra=torch.ones(1)), name="extra")
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        C.load_checkpoint(d)
    d = edit(tiny_dir, tmp_path, name="tok")
    train_tokenizer(["some other text entirely 123"] * 30, os.path.join(d, "tokenizer.model"),
                    vocab_size=310)
    with pytest.raises(ValueError,
                       match="tokenizer has 310 pieces but tok_embeddings has 320 rows"):
        C.load_checkpoint(d)


def test_shards_that_disagree(tiny_dir, tmp_path):
    model, _ = C.load_checkpoint(tiny_dir)
    d = C.save_checkpoint(model, str(tmp_path / "two"), n_shards=2)
    sd = dict(torch.load(os.path.join(d, "consolidated.01.pth"), weights_only=True))
    sd["layers.0.attention.wq.weight"] = sd["layers.0.attention.wq.weight"][:, :10].clone()
    torch.save(sd, os.path.join(d, "consolidated.01.pth"))
    with pytest.raises(ValueError, match=r"consolidated.01.pth: layers.0.attention.wq.weight "
                                         r"has shape \(32, 10\)"):
        C.load_checkpoint(d)
    os.rename(os.path.join(d, "consolidated.01.pth"), os.path.join(d, "consolidated.03.pth"))
    with pytest.raises(ValueError, match="shards must be consolidated.00.pth"):
        C.load_checkpoint(d)


def test_mixed_dtypes_load_as_one_and_integer_weights_are_refused(tiny_dir, tmp_path):
    """load_checkpoint without a dtype: the one most weights have (checkpoints.checkpoint_dtype)."""
    d = edit(tiny_dir, tmp_path, state=lambda sd: sd.update(
        {"norm.weight": sd["norm.weight"].half()}))
    model, args = C.load_checkpoint(d)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model(torch.randint(0, args.vocab_size, (1, 5)))  # one dtype: the forward runs
    d = edit(tiny_dir, tmp_path, state=lambda sd: sd.update(
        {"norm.weight": sd["norm.weight"].long()}), name="int")
    with pytest.raises(ValueError, match=r"consolidated.00.pth: norm.weight is torch.int64; "
                                         r"expected floating-point weights"):
        C.load_checkpoint(d)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_code_payload_is_refused(tiny_dir, tmp_path):
    d = edit(tiny_dir, tmp_path, state=lambda sd: sd.update(evil=Payload()))
    with pytest.raises(ValueError, match=r"consolidated.00.pth: refused: it holds pickled objects"):
        C.load_checkpoint(d)


def test_missing_things_and_refusal_to_overwrite_a_non_checkpoint(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        C.load_checkpoint(str(tmp_path / "nope"))
    d = edit(tiny_dir, tmp_path)
    os.remove(os.path.join(d, "consolidated.00.pth"))
    with pytest.raises(FileNotFoundError, match="no consolidated.NN.pth"):
        C.load_checkpoint(d)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    model, _ = C.load_checkpoint(tiny_dir)
    with pytest.raises(FileExistsError, match="not a checkpoint directory"):
        C.save_checkpoint(model, str(precious))
    assert (precious / "notes.txt").read_text() == "keep me"


def test_cli_generates_from_one_and_two_shards(tiny_dir, tmp_path, capsys):
    model, _ = C.load_checkpoint(tiny_dir)
    two = C.save_checkpoint(model, str(tmp_path / "two"), os.path.join(tiny_dir, "tokenizer.model"),
                            n_shards=2)
    outputs = []
    for d in (tiny_dir, two):
        generate.main([d, "--prompt", "the river", "--prompt", "a", "--max-new-tokens", "5"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1].replace(outputs[1].splitlines()[-1],
                                            outputs[0].splitlines()[-1])
    assert "tokens/s" in outputs[0]


def test_instruction_is_the_prompt_in_the_alpaca_template(tiny_dir, capsys):
    """generate.py --instruction X = --prompt format_prompt(X): --prompt takes text as given."""
    generate.main([tiny_dir, "--instruction", "the river", "--instruction", "a",
                   "--max-new-tokens", "5"])
    asked = capsys.readouterr().out
    generate.main([tiny_dir, "--prompt", format_prompt("the river"), "--prompt", format_prompt("a"),
                   "--max-new-tokens", "5"])
    direct = capsys.readouterr().out
    assert "### Instruction:\nthe river\n\n### Response:\n" in asked
    assert asked.splitlines()[:-1] == direct.splitlines()[:-1]  # all but the timing line
