"""moe.py against independent references: a per-token Python loop, the dense
every-expert computation, the aligned models themselves (forced routing), the base model
(identical experts), round trips."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import model as M
from engineering import checkpoints as C
from data.tokenizer import Tokenizer
import moe
import fuse
import fusion
from engineering import lean_fusion
from engineering.tiny import make_tiny_checkpoint

HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def ffn(x, w1, w2, w3):
    """One SwiGLU FFN written from the formula: w2 (silu(w1 x) * w3 x)."""
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def naive_moe(layer, x):
    """Token by token: full softmax, pick the k best (ties: lower index),
    renormalise, sum the experts."""
    B, T, D = x.shape
    out = torch.zeros_like(x)
    for b in range(B):
        for t in range(T):
            logits = x[b, t].double() @ layer.router.weight.double().T  # [E]
            p = torch.softmax(logits, dim=-1)
            if layer.forced_expert is not None:
                chosen, weights = [layer.forced_expert], [1.0]
            else:
                chosen = sorted(range(layer.n_experts),
                                key=lambda e: (-p[e].item(), e))[: layer.top_k]
                total = sum(p[e] for e in chosen)
                weights = [p[e] / total for e in chosen]
            for e, w in zip(chosen, weights):
                out[b, t] += (w * ffn(x[b, t], layer.w1[e], layer.w2[e], layer.w3[e])).to(x.dtype)
    return out


def make_layer(dim=16, hidden=24, E=3, k=2, dtype=torch.float32, seed=0, router_std=1.0):
    torch.manual_seed(seed)
    layer = moe.MoE(dim, hidden, E, k).to(dtype)
    with torch.no_grad():
        layer.router.weight.normal_(0, router_std)
    return layer


def grads_of(layer, x, fn, grad_out):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(layer, x)
    out.backward(grad_out)
    return out.detach(), [x.grad] + [p.grad.clone()
                                     for p in (layer.w1, layer.w2, layer.w3, layer.router.weight)]


def moe_forward(backend):
    def run(layer, x):
        layer.backend = backend
        return layer(x)
    return run


BACKENDS = ["slices"] + (["grouped_mm"] if HAS_GROUPED_MM else [])
NAMES = ["x", "w1", "w2", "w3", "router"]


# ---- routing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_route_matches_per_token_sort_with_ties(k):
    logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 3.0, 3.0], [2.0, -1.0, 2.0], [0.5, 0.1, 0.9],
                           [5.0, 5.0, 1.0]])
    probs, idx, weight = moe.route(logits, k)
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(-1), torch.ones(5))
    for n in range(logits.shape[0]):
        p = torch.softmax(logits[n].double(), -1)
        chosen = sorted(range(3), key=lambda e: (-p[e].item(), e))[:k]
        assert idx[n].tolist() == chosen
        expected = torch.tensor([p[e] for e in chosen]) / sum(p[e] for e in chosen)
        assert torch.allclose(weight[n].double(), expected, atol=1e-7)


def test_zero_router_sends_every_token_to_the_first_k_experts():
    layer = moe.MoE(8, 16, 3, 2)  # router initialised at zero: all probabilities 1/3
    layer(torch.randn(2, 4, 8))
    assert (layer.expert_idx == torch.tensor([0, 1])).all()
    assert torch.allclose(layer.router_probs, torch.full((2, 4, 3), 1 / 3))


def test_router_outputs_are_kept_on_the_module():
    layer = make_layer()
    x = torch.randn(2, 5, 16)
    out = layer(x)
    assert layer.router_probs.shape == (2, 5, 3) and layer.router_probs.dtype == torch.float32
    assert layer.router_logits.shape == (2, 5, 3) and layer.expert_idx.shape == (2, 5, 2)
    assert torch.allclose(layer.router_probs, torch.softmax(x @ layer.router.weight.T, -1),
                          atol=1e-6)
    assert layer.router_probs.requires_grad  # the gating loss trains the router through it
    (layer.router_probs[..., 2].sum()).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert out.shape == x.shape


def test_forward_in_bfloat16_keeps_float32_router():
    layer = make_layer(dtype=torch.bfloat16)
    out = layer(torch.randn(1, 4, 16, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and layer.router_probs.dtype == torch.float32
    ref = moe.dense_moe_reference(layer, torch.randn(1, 4, 16).bfloat16())
    assert ref.dtype == torch.bfloat16


# ---- dispatch == dense reference == per-token loop -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_matches_dense_reference_outputs_and_gradients(k, backend):
    layer = make_layer(k=k)
    x = torch.randn(3, 7, 16)
    g = torch.randn(3, 7, 16)
    out, grads = grads_of(layer, x, moe_forward(backend), g)
    ref_out, ref_grads = grads_of(layer, x, lambda m, x: moe.dense_moe_reference(m, x), g)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5), name
    if k < 3:
        assert grads[-1].abs().sum() > 0  # the renormalised top-k weights depend on the router


@pytest.mark.parametrize("k", [1, 2, 3])
def test_dispatch_matches_per_token_loop(k):
    layer = make_layer(k=k, dtype=torch.float64)
    x = torch.randn(2, 4, 16, dtype=torch.float64)
    assert torch.allclose(layer(x), naive_moe(layer, x), atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_router_and_idle_expert(backend):
    """Zero router: all probabilities tie, experts 0 and 1 take every token, expert 2 none. Its
    gradients must be zero tensors (not None), everything must still match the dense reference."""
    layer = make_layer(k=2)
    with torch.no_grad():
        layer.router.weight.zero_()
    x, g = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    out, grads = grads_of(layer, x, moe_forward(backend), g)
    ref_out, ref_grads = grads_of(layer, x, lambda m, x: moe.dense_moe_reference(m, x), g)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert a is not None and torch.allclose(a, b, atol=1e-5), name
    for w in grads[1:4]:
        assert torch.count_nonzero(w[2]) == 0 and torch.count_nonzero(w[0]) > 0
    assert torch.allclose(out, 0.5 * ffn(x, layer.w1[0], layer.w2[0], layer.w3[0])
                          + 0.5 * ffn(x, layer.w1[1], layer.w2[1], layer.w3[1]), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_that_starves_the_middle_expert(backend):
    layer = make_layer(k=2)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = layer.router.weight[2, 1] = 1.0
        layer.router.weight[1, 2] = -1.0
    x = torch.randn(4, 3, 16)
    x[..., :3] = torch.tensor([2.0, 2.0, 2.0])  # logits (2, -2, 2): experts 0 and 2
    g = torch.randn_like(x)
    out, grads = grads_of(layer, x, moe_forward(backend), g)
    assert set(layer.expert_idx.unique().tolist()) == {0, 2}
    ref_out, ref_grads = grads_of(layer, x, lambda m, x: moe.dense_moe_reference(m, x), g)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5), name
    assert all(torch.count_nonzero(w[1]) == 0 for w in grads[1:4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_single_token(k, backend):
    layer = make_layer(k=k)
    x, g = torch.randn(1, 1, 16), torch.randn(1, 1, 16)
    out, grads = grads_of(layer, x, moe_forward(backend), g)
    ref_out, ref_grads = grads_of(layer, x, lambda m, x: moe.dense_moe_reference(m, x), g)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.allclose(out, naive_moe(layer, x), atol=1e-5)
    for name, a, b in zip(NAMES, grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5), name


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch._grouped_mm not in this torch")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_path_equals_slices_path(dtype):
    layer = make_layer(dim=64, hidden=96, E=3, k=2, dtype=dtype, router_std=0.3)
    x, g = torch.randn(2, 33, 64, dtype=dtype), torch.randn(2, 33, 64, dtype=dtype)
    out_a, grads_a = grads_of(layer, x, moe_forward("grouped_mm"), g)
    out_b, grads_b = grads_of(layer, x, moe_forward("slices"), g)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out_a, out_b, atol=tol, rtol=tol)
    for name, a, b in zip(NAMES, grads_a, grads_b):
        assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), name


def test_grouped_mm_supported_rules():
    w = torch.randn(3, 24, 16)
    assert moe.grouped_mm_supported(torch.randn(5, 16), w) == HAS_GROUPED_MM
    # no float64 kernel
    assert not moe.grouped_mm_supported(torch.randn(5, 16).double(), w.double())
    # 24-byte rows: misaligned
    assert not moe.grouped_mm_supported(torch.randn(5, 6), torch.randn(3, 24, 6))
    # "auto" takes the slice loop on CPU (measured faster there, see moe.BACKENDS), on any shape
    assert moe.pick_backend(torch.randn(5, 16), w, w) == "slices"
    layer = make_layer(dim=6, hidden=10)
    x = torch.randn(2, 3, 6)
    assert torch.allclose(layer(x), moe.dense_moe_reference(layer, x), atol=1e-5)


@pytest.mark.skipif(not HAS_GROUPED_MM, reason="torch._grouped_mm not in this torch")
def test_grouped_mm_runs_in_the_autocast_dtype():
    """Autocast does not cover torch._grouped_mm: with float32 weights (one GPU:
    engineering.distributed.autocast_context) the grouped backend must cast to bf16 itself, or it
    silently runs float32 matmuls (or, on CUDA, is not used)."""
    layer = make_layer(dim=16, hidden=24)
    x = torch.randn(2, 8, 16)
    x_bf = x.bfloat16().float()  # the same input, exactly representable in bf16
    assert moe.matmul_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.matmul_dtype(x) == torch.bfloat16
        assert moe.grouped_mm_supported(x.view(-1, 16), layer.w1)  # float32 inputs, bf16 kernels
        outs = {}
        for backend in ("grouped_mm", "slices"):
            layer.backend = backend
            outs[backend] = layer(x_bf)  # [B, T, D]
    # the reference: every weight and input rounded to bf16 first, then the float32 naive loop
    ref_layer = make_layer(dim=16, hidden=24)
    with torch.no_grad():
        for w in (ref_layer.w1, ref_layer.w2, ref_layer.w3):
            w.copy_(w.bfloat16().float())
    ref = naive_moe(ref_layer, x_bf)
    exact = layer.to(torch.float32)
    layer.backend = "grouped_mm"
    assert not torch.equal(outs["grouped_mm"], exact(x_bf))  # bf16 did run
    for backend, out in outs.items():
        assert out.dtype == torch.float32  # added back into the float32 residual stream
        torch.testing.assert_close(out, ref, rtol=0.03, atol=0.03, msg=backend)


def test_gradcheck_float64():
    layer = make_layer(dim=4, hidden=6, E=3, k=2, dtype=torch.float64, router_std=2.0)
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [layer.w1, layer.w2, layer.w3, layer.router.weight]

    def f(x, w1, w2, w3, wr):
        return torch.func.functional_call(layer,
                                          {"w1": w1, "w2": w2, "w3": w3, "router.weight": wr}, (x,))

    inputs = [x] + [p.detach().clone().requires_grad_(True) for p in params]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5)


def test_forced_expert_computes_that_expert_alone():
    layer = make_layer(k=2)
    x = torch.randn(2, 3, 16)
    for i in range(3):
        layer.forced_expert = i
        out = layer(x)
        assert (layer.expert_idx == i).all()
        assert torch.allclose(out, ffn(x, layer.w1[i], layer.w2[i], layer.w3[i]), atol=1e-5)
        assert torch.allclose(out, moe.dense_moe_reference(layer, x), atol=1e-5)
    with pytest.raises(ValueError, match="forced_expert=3"):  # refused when set, once
        layer.forced_expert = 3


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="top_k=4"):
        moe.MoE(8, 16, 3, 4)
    with pytest.raises(ValueError, match="top_k=0"):
        moe.MoE(8, 16, 3, 0)
    with pytest.raises(ValueError, match="n_experts=0"):
        moe.MoE(8, 16, 0, 1)
    layer = moe.MoE(8, 16, 3, 2)
    layer.backend = "cuda-magic"
    with pytest.raises(ValueError, match="backend='cuda-magic'"):
        layer(torch.randn(1, 2, 8))


# ---- fusion: aligned checkpoints -> MoE model ----------------------------------------------------


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny base, three 'aligned' copies whose FFNs (only) were changed, and mismatching ones."""
    root = tmp_path_factory.mktemp("fusion")
    base_dir = make_tiny_checkpoint(str(root / "base"), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    seed=3)
    tok = os.path.join(base_dir, "tokenizer.model")
    dirs = []
    for i in range(3):
        aligned, _ = C.load_checkpoint(base_dir)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in aligned.named_parameters():
                if fusion.is_ffn_key(name):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        dirs.append(C.save_checkpoint(aligned, str(root / f"aligned{i}"), tokenizer_path=tok))
    # attention changed (stage 1 should have frozen it): builds, but reports the difference
    drifted, _ = C.load_checkpoint(dirs[0])
    with torch.no_grad():
        drifted.layers[1].attention.wq.weight.add_(0.25)
    drifted_dir = C.save_checkpoint(drifted, str(root / "drifted"), tokenizer_path=tok)
    other_arch = make_tiny_checkpoint(str(root / "other"), dim=64, n_layers=3, n_heads=4,
                                      n_kv_heads=2, seed=3)
    return dict(base=base_dir, aligned=dirs, drifted=drifted_dir, other=other_arch, root=root)


def tokens_for(vocab=320, B=2, T=9, seed=0):
    return torch.randint(3, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router_init", ["random", "hidden"])
def test_the_in_memory_reference_and_the_lean_upcycling_give_the_same_weights(ckpts, router_init):
    """fuse.fuse_in_memory (four models loaded whole, FFNs stacked) is what
    lean_fusion.build_fused_model computes row by row from memory-mapped files: the same tensors,
    bit for bit, router init "hidden" included."""
    prompts = [["Say yes.", "Name a colour."], ["Is it safe?"],
               ["Is the sky green?", "Who wrote it?"]]
    kwargs = dict(top_k=2, router_init=router_init, init_prompts=prompts, seed=5, router_std=0.3)
    simple, simple_args = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], **kwargs)
    lean, lean_args = lean_fusion.build_fused_model(ckpts["base"], ckpts["aligned"], verbose=False,
                                                    **kwargs)
    assert simple_args == lean_args
    lean_state = lean.state_dict()
    assert set(simple.state_dict()) == set(lean_state)
    for name, t in simple.state_dict().items():
        assert t.dtype == lean_state[name].dtype and torch.equal(t, lean_state[name]), name


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_forced_expert_i_reproduces_aligned_model_i(ckpts, top_k):
    fused, args = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], top_k=top_k,
                                      router_init="random", router_std=0.5, verbose=False)
    assert args.n_experts == 3 and args.top_k == top_k and len(moe.moe_layers(fused)) == 2
    tokens = tokens_for()
    aligned_logits = []
    for i, d in enumerate(ckpts["aligned"]):
        aligned, _ = C.load_checkpoint(d)
        with torch.no_grad():
            aligned_logits.append(aligned(tokens))
        moe.set_forced_expert(fused, i)
        with torch.no_grad():
            fused_logits = fused(tokens)
        assert torch.allclose(fused_logits, aligned_logits[i], atol=1e-5), i
    # the experts do differ
    assert not torch.allclose(aligned_logits[0], aligned_logits[1], atol=1e-3)
    moe.set_forced_expert(fused, None)
    with torch.no_grad():
        routed = fused(tokens)
    assert not any(torch.allclose(routed, a, atol=1e-4) for a in aligned_logits) or top_k == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_model_under_bf16_autocast_matches_float32(ckpts, backend):
    """What one GPU runs (engineering.distributed.autocast_context): float32 weights and residual
    stream, bf16 matmuls. The experts' bf16 output must be added back into the float32 stream
    (index_add_ refuses mixed dtypes), and forward and backward must agree with float32 within bf16
    rounding. Autocast runs on CPU too."""
    fused, _ = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], top_k=2, router_init="random",
                                     router_std=0.5, verbose=False)
    for layer in moe.moe_layers(fused):
        layer.backend = backend
    tokens = tokens_for(T=16)
    results = []
    for autocast in (False, True):
        fused.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = fused(tokens)  # [B, T, V]
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in fused.named_parameters() if "feed_forward" in n}
        results.append((logits.float().detach(), loss.item(), grads))
    (ref_logits, ref_loss, ref_grads), (bf_logits, bf_loss, bf_grads) = results
    # not equal: bf16 did run
    assert bf_logits.dtype == torch.float32 and not torch.equal(bf_logits, ref_logits)
    torch.testing.assert_close(bf_logits, ref_logits, rtol=0.05, atol=0.05)
    assert bf_loss == pytest.approx(ref_loss, rel=0.01)
    for name, g in ref_grads.items():  # relative error of each expert/router gradient, as a whole
        assert (bf_grads[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name


@pytest.mark.parametrize("router_init", ["zero", "random"])
def test_identical_experts_give_the_base_model_for_any_router(ckpts, router_init):
    base, _ = C.load_checkpoint(ckpts["base"])
    fused, _ = fuse.fuse_in_memory(ckpts["base"], [ckpts["base"]] * 3, top_k=2,
                                   router_init=router_init, router_std=1.0, verbose=False)
    tokens = tokens_for(seed=1)
    with torch.no_grad():
        assert torch.allclose(fused(tokens), base(tokens), atol=1e-5)
        if router_init == "random":  # the router really did spread tokens over experts
            assert len(torch.cat([m.expert_idx.flatten()
                                  for m in moe.moe_layers(fused)]).unique()) == 3


def test_fused_model_takes_non_ffn_weights_from_base_and_stacks_experts(ckpts):
    fused, _ = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], verbose=False)
    base, _ = C.load_checkpoint(ckpts["base"])
    sd, base_sd = fused.state_dict(), base.state_dict()
    for key, t in base_sd.items():
        if not fusion.is_ffn_key(key):
            assert torch.equal(sd[key], t), key
    for i, d in enumerate(ckpts["aligned"]):
        a_sd = C.load_checkpoint(d)[0].state_dict()
        for layer in range(2):
            for w in ("w1", "w2", "w3"):
                assert torch.equal(sd[f"layers.{layer}.feed_forward.{w}"][i],
                                   a_sd[f"layers.{layer}.feed_forward.{w}.weight"])
        # router_init="zero"
        assert torch.count_nonzero(sd["layers.0.feed_forward.router.weight"]) == 0


def test_fused_model_save_load_round_trip(ckpts, tmp_path):
    fused, args = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], top_k=2,
                                      router_init="random", router_std=0.5, verbose=False)
    out = C.save_checkpoint(fused, str(tmp_path / "fused"),
                            tokenizer_path=os.path.join(ckpts["base"], "tokenizer.model"))
    with open(os.path.join(out, "params.json")) as f:
        params = json.load(f)
    assert params["n_experts"] == 3 and params["top_k"] == 2
    loaded, largs = C.load_checkpoint(out)
    assert largs.n_experts == 3 and largs.top_k == 2
    assert loaded.layers[0].feed_forward.w1.shape == (3, M.ffn_hidden_dim(largs), 64)
    tokens = tokens_for(seed=2)
    with torch.no_grad():
        assert torch.equal(loaded(tokens), fused(tokens))


def test_router_init_random_is_seeded_and_small(ckpts):
    a, _ = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], router_init="random", seed=1,
                               verbose=False)
    b, _ = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], router_init="random", seed=1,
                               verbose=False)
    c, _ = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], router_init="random", seed=2,
                               verbose=False)
    ra, rb, rc = (m.layers[0].feed_forward.router.weight for m in (a, b, c))
    assert torch.equal(ra, rb) and not torch.equal(ra, rc)
    assert 0.01 < ra.std().item() < 0.03  # N(0, 0.02)
    assert not torch.equal(a.layers[0].feed_forward.router.weight,
                           a.layers[1].feed_forward.router.weight)


def test_router_init_hidden_is_the_mean_normalised_ffn_input(ckpts):
    prompts = [["the river runs over the stone", "a small bright tree"], ["I cannot tell you why"],
               ["seven is the answer", "honest answer to the question 2024"]]
    fused, _ = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], router_init="hidden",
                                     init_prompts=prompts, verbose=False)
    base, bargs = C.load_checkpoint(ckpts["base"])
    tok = Tokenizer(os.path.join(ckpts["base"], "tokenizer.model"))
    # independent reference: walk the base model's blocks by hand and collect each ffn_norm output
    # [layer][expert] -> list of [T, D]
    inputs = [[[] for _ in range(3)] for _ in range(bargs.n_layers)]
    with torch.no_grad():
        for e, ps in enumerate(prompts):
            for p in ps:
                tokens = torch.tensor([tok.encode(p, bos=True, eos=False)])
                h = base.tok_embeddings(tokens)
                cos, sin = M.rotary_cos_sin(bargs.head_dim, 0, tokens.shape[1], bargs.rope_theta,
                                            "cpu")
                for li, layer in enumerate(base.layers):
                    h = h + layer.attention(layer.attention_norm(h), 0, cos, sin)
                    x = layer.ffn_norm(h)[0]  # [T, D]
                    inputs[li][e].append(x)
                    h = h + layer.feed_forward(x[None])
    for li in range(bargs.n_layers):
        xs = [torch.cat(inputs[li][e]) for e in range(3)]
        mean_norm = torch.cat([x.norm(dim=-1) for x in xs]).mean()
        rows = []
        for x in xs:
            d = (x / x.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(d / d.norm() / mean_norm)
        expected = torch.stack(rows)
        got = fused.layers[li].feed_forward.router.weight
        assert torch.allclose(got, expected, atol=1e-5), li
        # logits of the prompts' own tokens are cosine-like: |logit| <= |x| / mean|x|
        assert (xs[0] @ got.T).abs().max() <= (xs[0].norm(dim=-1).max() / mean_norm) + 1e-4


def test_non_ffn_difference_is_reported_and_base_is_used(ckpts, capsys):
    fused, _ = fuse.fuse_in_memory(ckpts["base"],
                                   [ckpts["aligned"][0], ckpts["drifted"], ckpts["aligned"][2]])
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if "max |non-FFN - base|" in line]
    assert len(lines) == 3
    assert ("= 0 " in lines[0] + " " and "layers.1.attention.wq.weight" in lines[1]
            and "0.25" in lines[1])
    base, _ = C.load_checkpoint(ckpts["base"])
    assert torch.equal(fused.layers[1].attention.wq.weight, base.layers[1].attention.wq.weight)


def test_fusion_refuses_bad_inputs(ckpts, tmp_path):
    base, aligned = ckpts["base"], ckpts["aligned"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fuse.fuse_in_memory(base, [aligned[0], str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="top_k=4"):
        fuse.fuse_in_memory(base, aligned, top_k=4)
    with pytest.raises(ValueError, match="empty"):
        fuse.fuse_in_memory(base, [])
    with pytest.raises(ValueError, match=r"other/params.json: n_layers=3.*n_layers=2"):
        fuse.fuse_in_memory(base, [aligned[0], ckpts["other"]], verbose=False)
    with pytest.raises(ValueError, match="init_prompts"):
        fuse.fuse_in_memory(base, aligned, router_init="hidden")
    with pytest.raises(ValueError, match="init_prompts"):
        fuse.fuse_in_memory(base, aligned, router_init="hidden", init_prompts=[["a"], ["b"]])
    with pytest.raises(ValueError, match="router_init='mean'"):
        fuse.fuse_in_memory(base, aligned, router_init="mean")
    fused, _ = fuse.fuse_in_memory(base, aligned[:2], top_k=1, verbose=False)
    fused_dir = C.save_checkpoint(fused, str(tmp_path / "fused"))
    with pytest.raises(ValueError, match="n_experts"):
        fuse.fuse_in_memory(base, [aligned[0], fused_dir], top_k=1, verbose=False)


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_checkpoint_rows_equal_the_merged_tensor(tmp_path, n_shards):
    """CheckpointRows reads rows [a, b) of a tensor from Meta's model-parallel shards (split
    on dim 0 or 1, or replicated) without merging them: it must equal the fully merged
    tensor's rows, for every tensor."""
    ckpt = make_tiny_checkpoint(str(tmp_path / "m"), dim=32, n_layers=2, n_heads=4,
                                n_shards=n_shards)
    full, _ = C.load_checkpoint(ckpt)
    rows = lean_fusion.CheckpointRows(ckpt)
    assert len(rows.shards) == n_shards
    for name, t in full.state_dict().items():
        n = t.shape[0]
        for a, b in [(0, n), (0, 1), (n // 3, n // 3 + max(1, n // 2)), (n - 1, n), (n, n)]:
            assert torch.equal(rows.rows(name, a, b), t[a:b]), (name, a, b)


def test_non_ffn_difference_names_the_key(ckpts):
    fused, _ = lean_fusion.build_fused_model(ckpts["base"], ckpts["aligned"], verbose=False)
    assert lean_fusion.non_ffn_difference(
        fused, lean_fusion.CheckpointRows(ckpts["aligned"][1])) == (0.0, None)
    diff, key = lean_fusion.non_ffn_difference(fused, lean_fusion.CheckpointRows(ckpts["drifted"]))
    drifted, _ = C.load_checkpoint(ckpts["drifted"])
    base, _ = C.load_checkpoint(ckpts["base"])
    expected = max(((drifted.state_dict()[k] - v).abs().max().item(), k)
                   for k, v in base.state_dict().items() if not fusion.is_ffn_key(k))
    assert (diff, key) == expected and diff > 0


def test_snapshot_and_collect(ckpts):
    fused, _ = fuse.fuse_in_memory(ckpts["base"], ckpts["aligned"], verbose=False)
    snap = moe.snapshot_expert_weights(fused)
    assert sorted(snap) == sorted(f"layers.{i}.feed_forward.{w}"
                                  for i in range(2) for w in ("w1", "w2", "w3"))
    w = fused.layers[0].feed_forward.w1
    assert (torch.equal(snap["layers.0.feed_forward.w1"], w)
            and snap["layers.0.feed_forward.w1"].data_ptr() != w.data_ptr())
    with pytest.raises(RuntimeError, match="forward"):
        moe.collect_router_probs(fused)
    fused(tokens_for(B=1, T=4))
    probs = moe.collect_router_probs(fused)
    assert len(probs) == 2 and probs[0].shape == (1, 4, 3)


def test_bench_runs_on_tiny_shapes(capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                        "bench_moe.py")
    spec = importlib.util.spec_from_file_location("bench_moe", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tokens", "32", "--dim", "16", "--hidden", "32", "--repeats", "1", "--no-model"])
    out = capsys.readouterr().out
    for name in ("(a) ideal", "MoE slices", "(b) per-expert loop", "(c) dense", "decode forward"):
        assert name in out
    # (b), the HF-style loop, computes the same function as the MoE layer
    layer = make_layer()
    x = torch.randn(2, 5, 16)
    assert torch.allclose(bench.per_expert_loop(x, layer), layer(x), atol=1e-5)


def run_gpu_check(*args, timeout=300):
    """bench/gpu_check.py on this CPU at tiny shapes (one thread: small ops on a busy machine)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--small",
                             "--repeats", "1", *args], cwd=root, capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "FAILED" not in result.stdout, result.stdout
    return result.stdout


def test_gpu_check_script_runs_on_a_cpu_at_tiny_shapes():
    """bench/gpu_check.py is meant for a lent GPU (a few minutes, once); this makes sure its
    sections without compiling run, on CPU with tiny shapes
    (test_gpu_check_runs_every_section: all of them)."""
    out = run_gpu_check("--sections", "1,2")
    for line in ("x ideal", "the FLOP ratio", "MFU", "(2. training step:", "every section passed"):
        assert line in out, out


@pytest.mark.slow  # compiles decode steps and two training runs on the CPU: minutes
def test_gpu_check_runs_every_section(tmp_path):
    """--device cpu --small runs every section (the quick pipeline left to its own slow test) and
    writes what it prints to --log."""
    log = tmp_path / "gpu_check.log"
    out = run_gpu_check("--compile", "--log", str(log), timeout=1200)
    for line in ("x ideal", "compiled blocks time", "of the HBM bound", "compiled the step in",
                 "compiled vs eager logits", "train_expert.py --compile", "fuse.py --compile",
                 "stage 1 (FFN)", "stage 2 (fused)", "every section passed"):
        assert line in out, out
    assert out.count("compiled/eager") == 4  # dense and fused, batch 1 and 16
    assert log.read_text() in out  # the log holds everything printed (`wrote LOG` comes after)
