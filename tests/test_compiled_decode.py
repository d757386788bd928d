"""engineering/compiled_decode.py against eager decoding: model.generate_tokens on the model itself,
and the model's full forward without any cache. torch.compile on CPU is slow, so each tiny model is
compiled once (module-scoped decoders) and the tests reuse its shapes (4 cache rows, length 64);
the tests that compile more (another forced expert, another cache shape) are marked slow."""
import pytest
import torch

import generate
import model as M
from engineering.compiled_decode import (CompiledDecoder, compile_decode_wanted, compiled_or_eager,
                                         static_moe, step_logits, unsupported_reason)
from engineering.lora import add_lora
from engineering.tiny import make_tiny_checkpoint
from evaluation.baselines import ByDimension, OutputEnsemble
from evaluation.generation import for_decoding, generate_responses
from moe import MoE, dense_moe_reference, moe_layers, set_forced_expert

VOCAB = 320  # engineering/tiny.py's tokenizer
RAGGED = [[1, 17, 33, 250, 9], [1, 4, 8, 15, 16, 23, 42, 99, 7], [1, 300, 2], [1, 5, 6, 7, 8, 10]]


def tiny_args(**kw):
    return M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                       multiple_of=32, max_seq_len=64, **kw)


def tiny_model(seed, **kw):
    """A random tiny model; a fused one gets a random router (zero routes all tokens alike)."""
    torch.manual_seed(seed)
    model = M.Transformer(tiny_args(**kw)).eval()
    for moe in moe_layers(model):
        torch.nn.init.normal_(moe.router.weight, std=1.0)
    return model


@pytest.fixture(scope="module")
def dense():
    model = tiny_model(0)
    return model, CompiledDecoder(model)


@pytest.fixture(scope="module")
def fused():
    model = tiny_model(1, n_experts=3, top_k=2)
    return model, CompiledDecoder(model)


def decoded_with(decoder, prompts, max_new_tokens, eos_id=None):
    """generate_tokens through the decoder, checking that its compiled step really ran."""
    out = M.generate_tokens(decoder, prompts, max_new_tokens, eos_id=eos_id)
    assert decoder.fallback_reason is None and decoder.compile_seconds > 0
    return out


@pytest.mark.parametrize("which", ["dense", "fused"])
def test_compiled_greedy_decoding_gives_eager_tokens_ragged_batches_of_4_and_1(which, request):
    model, decoder = request.getfixturevalue(which)
    assert decoder.grouped_moe is False  # on a CPU the fused step runs every expert, gated
    want = M.generate_tokens(model, RAGGED, 20)
    assert decoded_with(decoder, RAGGED, 20) == want
    for prompt in (RAGGED[1], RAGGED[2]):  # batch 1, padded to the cache's 4 rows
        assert decoded_with(decoder, [prompt], 20) == M.generate_tokens(model, [prompt], 20)
    # stopping at </s>: a token the eager run produced mid-way in some row
    eos = want[0][5]
    got = decoded_with(decoder, RAGGED, 20, eos_id=eos)
    assert got == M.generate_tokens(model, RAGGED, 20, eos_id=eos)
    assert any(len(row) < 20 for row in got)


@pytest.mark.parametrize("which", ["dense", "fused"])
@torch.inference_mode()
def test_step_logits_equal_the_full_forward_without_cache(which, request):
    """Every decode step's logits against model.forward over the whole sequence (no cache)."""
    model, decoder = request.getfixturevalue(which)
    tokens = torch.randint(1, VOCAB, (4, 30), generator=torch.Generator().manual_seed(2))  # [B, L]
    want = model(tokens)[:, 5:29]  # [B, 24, V]
    torch.testing.assert_close(step_logits(decoder, tokens, 6), want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # one more compile, in bf16
@torch.inference_mode()
def test_the_grouped_mm_step_a_gpu_takes_compiles_and_computes_the_layer():
    """The path of a GPU (torch._grouped_mm in bf16), compiled on a CPU, whose _grouped_mm takes
    bf16 too: its logits against the full forward through the layers' own grouped dispatch, to
    bf16 precision."""
    model = tiny_model(1, n_experts=3, top_k=2).to(torch.bfloat16)
    for moe in moe_layers(model):
        moe.backend = "grouped_mm"
    decoder = CompiledDecoder(model)
    assert decoder.grouped_moe
    tokens = torch.randint(1, VOCAB, (4, 20), generator=torch.Generator().manual_seed(3))  # [B, L]
    got = step_logits(decoder, tokens, 6)  # [B, 14, V]
    assert decoder.fallback_reason is None and decoder.compile_seconds > 0
    torch.testing.assert_close(got, model(tokens)[:, 5:19], rtol=0.05, atol=0.05)


def test_the_model_is_left_as_it_was(dense):
    """After compiled decoding the model decodes eagerly as before and holds no cache."""
    model, decoder = dense
    before = M.generate_tokens(tiny_model(0), RAGGED, 12)  # a fresh copy of the same weights
    decoded_with(decoder, RAGGED, 12)
    assert all(layer.attention.cache_k is None and layer.attention.cache_v is None
               for layer in model.layers)
    assert M.generate_tokens(model, RAGGED, 12) == before


@pytest.mark.slow  # compiles the step once more (it specialises on the forced expert)
def test_a_forced_expert_is_followed_by_the_compiled_step(fused):
    """evaluate.py's forced-expert and oracle rows switch moe.forced_expert between generations."""
    model, decoder = fused
    try:
        for expert in (2, None):
            set_forced_expert(model, expert)
            assert decoded_with(decoder, RAGGED, 10) == M.generate_tokens(model, RAGGED, 10)
    finally:
        set_forced_expert(model, None)


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("forced", [None, 1])
def test_static_moe_is_the_moe_layer(grouped, forced):
    """Both expert paths of the step, eagerly, against the dense every-expert reference of moe.py
    (the grouped one through torch._grouped_mm, which a CPU runs in float32 too)."""
    torch.manual_seed(3)
    moe = MoE(32, 64, 3, 2)
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    moe.forced_expert = forced
    x = torch.randn(4, 1, 32)  # [B, 1, D]: one token per row
    torch.testing.assert_close(static_moe(moe, x, grouped), dense_moe_reference(moe, x),
                               rtol=1e-5, atol=1e-6)


def test_what_the_step_does_not_know_decodes_eagerly(dense, capsys):
    model, _ = dense
    ensemble = OutputEnsemble([tiny_model(0), tiny_model(5)])
    assert compiled_or_eager(ensemble) is ensemble
    assert "not a model.Transformer; decoding eagerly" in capsys.readouterr().err
    lora = add_lora(tiny_model(1, n_experts=3, top_k=2), rank=2, alpha=2.0)
    assert "LoRAMoE" in unsupported_reason(lora)
    with pytest.raises(ValueError, match="LoRAMoE"):
        CompiledDecoder(lora)
    assert unsupported_reason(model) is None


def test_compile_decode_default_is_on_for_cuda_only():
    assert compile_decode_wanted(None, "cuda") and compile_decode_wanted(None, "cuda:1")
    assert not compile_decode_wanted(None, "cpu")
    assert compile_decode_wanted(True, "cpu") and not compile_decode_wanted(False, "cuda")


class TokenIds:
    """A stand-in tokenizer for generate_responses: a prompt is its own list of ids."""

    eos_id = None

    def encode(self, ids, bos, eos):
        return list(ids)

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_evaluation_rows_decode_the_same_compiled(dense):
    """for_decoding's stand-ins of an ensemble and an oracle row answer as the eager rows do (their
    members share the dense model's architecture: the compiled step is reused, not recompiled)."""
    members = [tiny_model(0), tiny_model(6)]
    rows = {"ensemble": OutputEnsemble(members),
            "oracle": ByDimension(members.__getitem__, 2, members)}
    prompts = RAGGED
    for name, row in rows.items():
        stand_in = for_decoding(row, compile_decode=True)
        assert for_decoding(row, compile_decode=False) is row
        for task in range(2):
            eager_model = row if name == "ensemble" else row.model_for(task)
            compiled_model = stand_in if name == "ensemble" else stand_in.model_for(task)
            want = generate_responses(eager_model, TokenIds(), prompts, 8, batch_size=4)
            assert generate_responses(compiled_model, TokenIds(), prompts, 8, batch_size=4) == want
        decoders = stand_in.members if name == "ensemble" else stand_in.models
        assert all(isinstance(d, CompiledDecoder) and d.fallback_reason is None for d in decoders)


@pytest.mark.slow  # compiles the step once more, for 2 cache rows (shapes become dynamic)
def test_generate_cli_compiles_on_request_and_prints_the_compile_time(tmp_path, capsys):
    ckpt = make_tiny_checkpoint(str(tmp_path / "tiny"), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                multiple_of=32, max_seq_len=64, seed=4)
    argv = [ckpt, "--prompt", "the quick brown fox", "--prompt", "water", "--max-new-tokens", "8"]
    generate.main(argv)
    eager = capsys.readouterr().out
    generate.main(argv + ["--compile-decode"])
    compiled = capsys.readouterr().out
    assert "compiled the decode step in" not in eager and "compiled the decode step in" in compiled
    text = [line for line in compiled.splitlines() if not line.startswith("compiled the decode")]
    assert text[:-1] == eager.splitlines()[:-1]  # the same completions (the tokens/s line differs)
