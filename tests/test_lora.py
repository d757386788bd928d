"""LoRA (engineering/lora.py): a zero delta changes nothing, merged = unmerged, its gradients are
those of the merged weight, L_R from the factors is ||W' - W^0|| of the merged weights, checkpoints
are plain, --resume keeps the factors, two FSDP ranks train what one process trains."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fuse
import fusion
from engineering import lora as L
import model as M
from engineering import checkpoints as C
import train_expert
import trainer
from toy_world import FAST, ROOT, build_world
from losses import drift_loss
from moe import MoE, snapshot_expert_weights



def tiny_model(n_experts=0, seed=0, dim=32):
    args = M.ModelArgs(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, multiple_of=16,
                       max_seq_len=64, n_experts=n_experts, top_k=2)
    torch.manual_seed(seed)
    model = M.Transformer(args)
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        # a router that spreads tokens over all experts
        torch.nn.init.normal_(moe.router.weight, std=0.5)
    return model


def same_model(model):
    twin = M.Transformer(model.params)
    twin.load_state_dict(model.state_dict())
    return twin


def with_random_lora(model, rank=4, alpha=8.0, seed=1):
    """model with deltas whose B is not zero (else every delta is 0 and nothing is tested)."""
    L.init_lora(L.add_lora(model, rank, alpha), seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in L.lora_modules(model):
            lora.B.copy_(0.2 * torch.randn(lora.B.shape, generator=generator))
    return model


def merged(model):
    plain = M.Transformer(model.params)
    plain.load_state_dict(L.merge_lora(model.state_dict(), L.lora_targets(model)))
    return plain


TOKENS = torch.randint(0, 61, (3, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("n_experts", [0, 3])
@pytest.mark.parametrize("backend", ["slices", "grouped_mm"])
def test_zero_B_gives_bit_identical_logits(n_experts, backend):
    model = tiny_model(n_experts)
    reference = model(TOKENS)
    adapted = same_model(model)
    L.init_lora(L.add_lora(adapted, 4, 8.0), seed=3)
    for moe in (m for m in adapted.modules() if isinstance(m, MoE)):
        moe.backend = backend
    assert all(bool((lora.A != 0).any()) for lora in L.lora_modules(adapted))  # A is random, B zero
    assert torch.equal(adapted(TOKENS), reference)


@pytest.mark.parametrize("n_experts", [0, 3])
@pytest.mark.parametrize("backend", ["slices", "grouped_mm"])
def test_merged_equals_unmerged_forward(n_experts, backend):
    model = with_random_lora(tiny_model(n_experts))
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.backend = backend
    plain = merged(model)
    assert not any(L.is_lora_name(k) for k in plain.state_dict())  # an ordinary model
    out, reference = model(TOKENS), plain(TOKENS)
    assert (out - tiny_model(n_experts)(TOKENS)).abs().max() > 1e-2  # the deltas do something
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_lora_gradient_matches_autograd_through_the_merged_weight():
    """Dense layer and stacked experts: the gradients of A and B (and of the input) computed
    through the low-rank path equal those of the same loss computed on W' = W + (alpha/r) B A,
    formed explicitly."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 20, bias=False).double()
    layer = L.LoRALinear(linear, rank=3, alpha=5.0).double()
    with torch.no_grad():
        layer.lora.A.normal_(), layer.lora.B.normal_()
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 20, dtype=torch.float64)
    (layer(x) - target).pow(2).sum().backward()
    A, B = (t.detach().clone().requires_grad_() for t in (layer.lora.A, layer.lora.B))
    x_ref = x.detach().clone().requires_grad_()
    (F.linear(x_ref, linear.weight + layer.lora.scale * B @ A) - target).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora.A.grad, A.grad)
    torch.testing.assert_close(layer.lora.B.grad, B.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert linear.weight.grad is None  # frozen

    for backend in ("slices", "grouped_mm"):  # stacked experts, through the MoE dispatch
        moe = MoE(dim=16, hidden_dim=24, n_experts=3, top_k=2)
        torch.nn.init.normal_(moe.router.weight)
        moe.backend = backend
        # the same router and experts, frozen, each matrix with a delta
        moe = L.LoRAMoE(moe, 4, 2.0)
        for w in ("w1", "w2", "w3"):
            (torch.nn.init.normal_(moe.lora[w].A, std=0.3),
             torch.nn.init.normal_(moe.lora[w].B, std=0.3))
        x = torch.randn(2, 9, 16)
        moe(x).pow(2).sum().backward()
        reference = MoE(dim=16, hidden_dim=24, n_experts=3, top_k=2)
        reference.router.weight.data.copy_(moe.router.weight)
        factors = {w: [t.detach().clone().requires_grad_() for t in (moe.lora[w].A, moe.lora[w].B)]
                   for w in ("w1", "w2", "w3")}
        # W' [E, out, in] = W + scale B A as a function of the factors
        for w, (A, B) in factors.items():
            del reference._parameters[w]
            setattr(reference, w, getattr(moe, w) + moe.lora[w].scale * B @ A)
        reference(x).pow(2).sum().backward()
        for w, (A, B) in factors.items():
            torch.testing.assert_close(moe.lora[w].A.grad, A.grad, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(moe.lora[w].B.grad, B.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["drift", "decay"])
def test_drift_loss_from_the_factors_is_the_merged_weights_distance(kind):
    """L_R read from A and B (no W' formed) = L_R of the merged model against W^0 = the experts it
    started from; its gradient with respect to the factors = autograd through the merged weights."""
    base = tiny_model(3)
    w0 = snapshot_expert_weights(base)
    model = with_random_lora(same_model(base))
    gamma = [0.1, 0.3, 0.2]
    value = L.lora_drift_loss(model, {}, gamma, kind)
    reference = drift_loss(merged(model), w0, gamma, kind)
    torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-6)
    assert value > 0.1

    value.backward()
    loras = L.expert_loras(model)
    factors = {name: [t.detach().clone().requires_grad_() for t in (lo.A, lo.B)]
               for name, lo in loras.items()}
    total = 0.0
    # the loss as losses.drift_loss defines it, on W' formed explicitly
    for name, (A, B) in factors.items():
        w = dict(model.named_parameters())[name]
        w_prime = w + loras[name].scale * B @ A  # [E, out, in]
        diff = w_prime - w0[name] if kind == "drift" else w_prime
        total = total + diff.pow(2).sum(dim=(1, 2)).sqrt()
    (torch.tensor(gamma) * total).sum().div(len(base.layers)).backward()
    for name, (A, B) in factors.items():
        torch.testing.assert_close(loras[name].A.grad, A.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(loras[name].B.grad, B.grad, rtol=1e-4, atol=1e-6)


def test_zero_delta_has_zero_drift_and_a_finite_gradient():
    model = same_model(tiny_model(3))
    L.init_lora(L.add_lora(model, 4, 4.0))
    value = L.lora_drift_loss(model, {}, [1.0, 1.0, 1.0])
    value.backward()
    assert value == 0 and all(torch.isfinite(lo.B.grad).all() for lo in L.lora_modules(model))


def test_only_the_factors_train_and_frozen_weights_keep_their_dtype():
    """add_lora freezes the adapted matrices; a bf16 model's frozen weights stay bf16 (the
    CUDA path: never a float32 copy), the factors and what else trains (the router) are
    float32, and under autocast (CPU here, as one GPU runs) forward and backward run and the
    factors get float32 gradients."""
    model = tiny_model(3).to(torch.bfloat16)
    fusion.set_trainable(model, "router+experts")
    L.init_lora(L.add_lora(model, 8, 8.0))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {n for n in trainable
                              if L.is_lora_name(n) or n.endswith("router.weight")}
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    with torch.no_grad():
        # a bf16 forward outside autocast (the router-init forward): the factors run in bf16
        model(TOKENS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(TOKENS).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable.values())
    share = sum(p.numel() for p in trainable.values()) / sum(p.numel() for p in model.parameters())
    assert share < 0.5  # (tiny dims; at 7B it is 0.23 %: bench/bench_memory.py)


def test_router_init_forward_sees_the_fused_model_exactly(tmp_path):
    """empty_model initialises the deltas (B = 0) before the router-init forward: a LoRA build gives
    the same weights as a plain build (the factors aside)."""
    from engineering.tiny import make_tiny_checkpoint
    from engineering.lean_fusion import build_fused_model
    base = make_tiny_checkpoint(str(tmp_path / "base"), dim=32, n_layers=2)
    experts = []
    for i in range(3):
        m, _ = C.load_checkpoint(base)
        with torch.no_grad():
            for name, p in m.named_parameters():
                if ".feed_forward." in name:
                    p.add_(0.01 * (i + 1))
        experts.append(C.save_checkpoint(m, str(tmp_path / f"e{i}"),
                                         tokenizer_path=os.path.join(base, "tokenizer.model")))
    prompts = [["the river"], ["a stone"], ["why because"]]
    plain, _ = build_fused_model(base, experts, router_init="hidden", init_prompts=prompts,
                                 verbose=False)
    adapted, _ = build_fused_model(base, experts, router_init="hidden", init_prompts=prompts,
                                   verbose=False, shard=lambda m: L.add_lora(m, 4, 4.0))
    sa = adapted.state_dict()
    for name, t in plain.state_dict().items():
        assert torch.equal(t, sa[name]), name
    assert all(bool((sa[k] == 0).all()) for k in sa if k.endswith(".B"))


# ---- the command lines ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("lora_world"), stage1_args=["--lora-rank", "4"])


def load_state(path):
    return C.load_checkpoint(str(path))[0].state_dict()


def test_stage1_lora_writes_a_plain_checkpoint_that_differs_only_in_the_ffn(world):
    base = load_state(world["base"])
    for expert in world["experts"]:
        state = load_state(expert)
        assert set(state) == set(base)  # no factor left: a plain dense checkpoint
        for name, t in state.items():
            assert torch.equal(t, base[name]) == (".feed_forward." not in name), name
        with open(os.path.join(expert + ".train", "run.json")) as f:
            assert json.load(f)["lora_rank"] == 4


def test_stage2_lora_trains_factors_and_router_and_writes_a_plain_fused_checkpoint(world, tmp_path,
                                                                                  capsys):
    out = tmp_path / "fused"
    fuse.main(["--base", world["base"], "--experts", ",".join(world["experts"]),
               "--data-dir", world["data"], "--out", str(out), "--steps", "3",
               "--lora-rank", "4", "--lora-alpha", "8"] + FAST)
    assert "LoRA r=4 alpha=8" in capsys.readouterr().out
    state = load_state(out)
    assert not any(L.is_lora_name(k) for k in state)
    aligned = [load_state(e) for e in world["experts"]]
    for name, t in state.items():
        if ".feed_forward.w" in name:  # every expert moved, through its delta
            assert not torch.equal(t, torch.stack([a[f"{name}.weight"] for a in aligned])), name
    lines = [json.loads(line) for line in open(str(out) + ".train/log.jsonl")]
    # L_R from B A: 0 at step 0
    assert all("reg" in r for r in lines) and lines[0]["reg"] == 0.0 < lines[-1]["reg"]


def test_lora_resume_continues_the_unmerged_factors(world, tmp_path, monkeypatch):
    """3 steps straight = a run stopped in step 3 after its step-2 save, then --resume: the saved
    state holds A and B (unmerged), so the resumed run ends on the same weights, bit for bit."""
    common = ["--base", world["base"], "--experts", ",".join(world["experts"]),
              "--data-dir", world["data"], "--lora-rank", "4", "--steps", "3", "--save-every", "2",
              "--gamma", "0.1,0.3,0.1"] + FAST
    fuse.main(common + ["--out", str(tmp_path / "straight")])
    check_finite = trainer.check_finite

    def stop_in_step_3(metrics, step, train_dir):
        if step == 2:
            raise KeyboardInterrupt("stopped in step 3")
        check_finite(metrics, step, train_dir)

    monkeypatch.setattr(trainer, "check_finite", stop_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        fuse.main(common + ["--out", str(tmp_path / "resumed")])
    monkeypatch.setattr(trainer, "check_finite", check_finite)
    fuse.main(common + ["--out", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = load_state(tmp_path / "straight"), load_state(tmp_path / "resumed")
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize("argv, message", [
    (["--lora-alpha", "4"], "--lora-alpha 4.0 without --lora-rank"),
    (["--lora-rank", "-1"], "--lora-rank -1: expected a rank >= 1"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha 0.0: expected a finite number > 0"),
    (["--lora-rank", "4", "--trainable", "router", "--gamma", "0,0,0"], "with --trainable router"),
])
def test_bad_lora_flags_of_fuse(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        fuse.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--init", "scratch", "--lora-rank", "8"], "with --init scratch"),
    (["--init", ROOT, "--data", "helpful", "--trainable", "all", "--lora-rank", "8"],
     "with --trainable all"),
])
def test_bad_lora_flags_of_train_expert(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_expert.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def torchrun(script, args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           script] + args
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_two_ranks_train_lora_as_one_process(world, tmp_path):
    """Stage 1 and stage 2 with LoRA, one process vs FSDP2 over 2 gloo ranks: the same losses, the
    same L_R (read from the sharded factors; both readings) and the same merged checkpoints."""
    common = ["--data-dir", world["data"], "--steps", "4", "--lora-rank", "4"] + FAST
    stage1 = ["--init", world["base"], "--data", "honest"] + common
    train_expert.main(stage1 + ["--out", str(tmp_path / "e1")])
    torchrun("train_expert.py", stage1 + ["--out", str(tmp_path / "e2")])
    stage2 = ["--base", world["base"], "--experts", ",".join(world["experts"]),
              "--gamma", "0.1,0.3,0.1"] + common
    fuse.main(stage2 + ["--out", str(tmp_path / "f1")])
    torchrun("fuse.py", stage2 + ["--out", str(tmp_path / "f2")])
    # ||W'|| from sharded W and factors
    fuse.main(stage2 + ["--reg", "decay", "--out", str(tmp_path / "d1")])
    torchrun("fuse.py", stage2 + ["--reg", "decay", "--out", str(tmp_path / "d2")])
    for one, two in (("e1", "e2"), ("f1", "f2"), ("d1", "d2")):
        a, b = ([json.loads(line) for line in open(str(tmp_path / name) + ".train/log.jsonl")]
                for name in (one, two))
        for key in ("lm", "gate", "reg"):
            assert [key in r for r in a] == [key in r for r in b], key
            values_a, values_b = [r[key] for r in a if key in r], [r[key] for r in b if key in r]
            assert values_a == pytest.approx(values_b, rel=1e-3, abs=1e-5), key
        sa, sb = load_state(tmp_path / one), load_state(tmp_path / two)
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-5)
