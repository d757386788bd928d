"""fusion.routing_metrics, the training log's routing figures, against a loop over examples."""
import pytest
import torch

import fusion
from data.format import collate
from model import ModelArgs, Transformer
from moe import moe_layers


def fused_model(seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=16,
                     max_seq_len=64, n_experts=3, top_k=2)
    model = Transformer(args).eval()
    with torch.no_grad():
        for m in moe_layers(model):
            m.router.weight.normal_(0, 1.0)  # a router that prefers different experts per token
    return model


def test_the_logs_routing_figures_say_per_example_and_per_token():
    """fusion.routing_metrics (the training log) by hand: per example = p̄ peaks at the example's
    expert; per token = the share of an example's (real token, layer) pairs whose top-1 expert is
    its own, averaged over examples."""
    model = fused_model(seed=5)
    g = torch.Generator().manual_seed(3)
    examples = []
    for i in range(6):
        tokens = torch.randint(1, 40, (3 + i % 4,), generator=g).tolist()
        examples.append({"tokens": tokens, "targets": tokens, "task": i % 3})
    batch = collate(examples)
    with torch.no_grad():
        model(batch["tokens"])
    got = fusion.routing_metrics(model, batch, examples_per_rank=6.0)
    assert "route_acc" not in got
    per_example = per_token = 0.0
    with torch.no_grad():
        for ex in examples:
            model(torch.tensor([ex["tokens"]]))
            probs = torch.stack([m.router_probs[0] for m in moe_layers(model)])  # [L, T, E]
            per_example += (int(probs.mean(dim=(0, 1)).argmax()) == ex["task"]) / 6
            per_token += float((probs.argmax(-1) == ex["task"]).double().mean()) / 6
    assert got["routed_right_per_example"] == pytest.approx(per_example)
    assert got["routed_right_per_token"] == pytest.approx(per_token)
