"""evaluation/drift_force.py: the gradient it averages against finite differences of the
objective, the holding γ against L_R's own pull, and the command on a fused checkpoint of a tiny
world."""
import pytest
import torch

import fuse
import fusion
import model as M
from engineering import checkpoints as C
from data.tokenizer import Tokenizer
from data import streams as S
from data.format import IGNORE_INDEX
from engineering.distributed import setup_distributed
from evaluation import drift_force
from losses import drift_loss
from moe import moe_layers, snapshot_expert_weights
from trainer import StepCounts
from toy_world import FAST, build_world


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    world = build_world(tmp_path_factory.mktemp("world"))
    out = str(world["root"] / "fused")
    fuse.main(["--base", world["base"], "--experts", ",".join(world["experts"]),
               "--data-dir", world["data"], "--out", out, "--steps", "3", "--lr", "3e-3"] + FAST)
    model = C.load_checkpoint(out)[0].double()
    tokenizer = Tokenizer(f"{out}/tokenizer.model")
    d = setup_distributed("cpu")
    _, stream, _ = S.instruction_data("pooled", world["data"], tokenizer, 64, 4, 0, d)
    return {"dir": out, "base": world["base"], "data": world["data"], "model": model,
            "batches": [stream.batch(i, 4, d) for i in range(3)]}


def objective(model, batches, lam):
    """The mean over batches of L_CE + λ L_G, computed afresh (no gradients)."""
    with torch.no_grad():
        total = 0.0
        for batch in batches:
            counts = StepCounts(float((batch["targets"] != IGNORE_INDEX).sum()),
                                float(len(batch["task"])))
            loss, _ = fusion.h3fusion_objective(model, batch, counts, lam=lam,
                                                gamma=[0.0, 0.0, 0.0], reg="drift",
                                                initial_experts={})
            total += float(loss) / len(batches)
    return total


def test_mean_gradient_matches_finite_differences_along_it(fused):
    """The derivative of the objective along the unit gradient direction is the gradient's norm."""
    model, batches = fused["model"], fused["batches"]
    grads = drift_force.objective_gradients(model, batches, lam=6.0)
    assert set(grads) == {n for n, _ in model.named_parameters() if ".feed_forward.w" in n}
    name = sorted(grads)[0]
    weight = dict(model.named_parameters())[name]
    for e in range(weight.shape[0]):
        g = grads[name][e]
        direction = g / g.norm()
        # the router's float32 softmax leaves ~1e-7 of noise in the loss: a small eps drowns in it
        eps = 1e-2
        with torch.no_grad():
            weight[e] += eps * direction
            up = objective(model, batches, 6.0)
            weight[e] -= 2 * eps * direction
            down = objective(model, batches, 6.0)
            weight[e] += eps * direction
        assert (up - down) / (2 * eps) == pytest.approx(float(g.norm()), rel=1e-2)
    # L_G reaches the experts' weights too
    without_gate = drift_force.objective_gradients(model, batches, lam=0.0)
    assert not torch.allclose(without_gate[name], grads[name])


def test_holding_gamma_is_where_drift_losss_pull_equals_the_gradient(fused):
    """L_R's gradient on one matrix away from W⁰ has norm γ / n_layers: the holding γ is
    n_layers · ‖∇‖."""
    model = fused["model"]
    grads = drift_force.objective_gradients(model, fused["batches"], lam=6.0)
    n_layers = len(moe_layers(model))
    held = drift_force.holding_gamma(grads, n_layers)
    assert len(held) == 3 and all(len(v) == len(grads) for v in held)
    name = sorted(grads)[1]
    weight = dict(model.named_parameters())[name]
    initial = snapshot_expert_weights(model)
    with torch.no_grad():
        weight[1] += 0.01  # expert 1 away from W⁰ on this one matrix only
    gamma = [0.0, held[1][sorted(grads).index(name)], 0.0]
    weight.requires_grad_(True)
    pull, = torch.autograd.grad(drift_loss(model, initial, gamma), [weight])
    assert float(pull[1].norm()) == pytest.approx(float(grads[name][1].norm()), rel=1e-6)
    assert float(pull[0].norm()) == 0 and float(pull[2].norm()) == 0


def test_command_prints_each_experts_range_and_refuses_a_dense_model(fused, capsys):
    per_expert = drift_force.main([fused["dir"], "--data-dir", fused["data"], "--batches", "2",
                                   "--batch-size", "4", "--seq-len", "64"])
    out = capsys.readouterr().out
    assert len(per_expert) == 3 and all(v >= 0 for values in per_expert for v in values)
    assert all(max(values) > 0 for values in per_expert)
    assert "helpful: min" in out and "harmless: min" in out and "honest: min" in out
    for argv in ([fused["dir"], "--data-dir", fused["data"], "--batches", "0"],
                 [fused["base"], "--data-dir", fused["data"]]):
        with pytest.raises(SystemExit):
            drift_force.main(argv)
        assert ("--batches 0" if "--batches" in argv else "a dense model") \
            in capsys.readouterr().err
