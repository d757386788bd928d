"""evaluation/summary.py, what train_expert.py and fuse.py print at the end: the held test on
planted drifts, routing per example against a loop over examples, the next commands; and the
training log's routing figures (fusion.routing_metrics). The summary of real runs, in one process
and under torchrun, is tests/test_training.py's."""
import shlex
from types import SimpleNamespace

import pytest
import torch

from data.format import collate
from data.streams import val_batches_of
import fusion
from engineering.distributed import Dist
from evaluation import summary as S
from model import ModelArgs, Transformer
from moe import expert_parameters, moe_layers, snapshot_expert_weights
from trainer import TrainConfig, lr_at


def fused_model(seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, multiple_of=16,
                     max_seq_len=64, n_experts=3, top_k=2)
    model = Transformer(args).eval()
    with torch.no_grad():
        for m in moe_layers(model):
            m.router.weight.normal_(0, 1.0)  # a router that prefers different experts per token
    return model


def test_an_expert_is_held_while_it_moved_less_than_half_a_peak_step_per_weight():
    model, lr = fused_model(), 1e-3
    initial = snapshot_expert_weights(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, (name, w) in enumerate(expert_parameters(model).items()):
            rms = [0.3 * lr, 3 * lr, 3 * lr if i == 0 else 0.0]  # expert 2: one of 6 matrices moves
            for e, size in enumerate(rms):
                step = torch.randn(w[e].shape, generator=g)
                w[e] += size * step / step.pow(2).mean().sqrt()  # RMS change per weight = size
    moved = [x / lr for x in S.rms_change_per_weight(model, initial)]  # in peak-lr steps
    assert moved == pytest.approx([0.3, 3.0, 3.0 / 6 ** 0.5], rel=1e-4)  # 6 matrices of one size
    assert S.verdict(0.3, moved[0]).startswith("held at its aligned weights by L_R (moved 0.3 of")
    assert S.verdict(0.0, moved[0]).startswith("not held: γ = 0")  # even an expert that stayed
    assert S.verdict(0.3, moved[1]).startswith("not held: the data pulls harder than γ (moved 3 ")
    assert S.verdict(0.3, moved[2]).startswith("not held")


def test_peak_lr_is_the_largest_the_schedule_reached():
    assert S.peak_lr(TrainConfig(steps=30, lr=2e-3, warmup=10)) == pytest.approx(2e-3)
    short = TrainConfig(steps=4, lr=1e-2, warmup=10)  # still warming up when it ends
    assert S.peak_lr(short) == lr_at(3, 1e-2, 10, 4) == pytest.approx(4e-3)


def test_routed_right_per_example_matches_a_loop_over_examples():
    model = fused_model(seed=5)
    g = torch.Generator().manual_seed(3)
    examples = []
    for i in range(10):
        n = 3 + i % 4
        tokens = torch.randint(1, 40, (n,), generator=g).tolist()
        examples.append({"tokens": tokens, "targets": tokens, "task": i % 3})
    batches = [collate(examples[:6]), collate(examples[6:])]
    right, total = S.routed_right_by_dimension(model, batches, Dist())
    want_right, want_total = [0, 0, 0], [0, 0, 0]
    with torch.no_grad():
        for ex in examples:
            model(torch.tensor([ex["tokens"]]))
            probs = torch.stack([m.router_probs[0] for m in moe_layers(model)])  # [L, T, E]
            p_bar = probs.mean(dim=(0, 1))  # [E]
            want_total[ex["task"]] += 1
            want_right[ex["task"]] += int(p_bar.argmax()) == ex["task"]
    assert total.tolist() == want_total and right.tolist() == want_right
    assert 0 < sum(want_right) < 10  # the random router sends some examples right, some not


def stage_args(data, out="runs/toy/helpful", **kw):
    """train_expert.py's arguments as the summary reads them."""
    fields = {"init": "runs/toy/base", "data_dir": "runs/toy/data", "task": None, "lora_rank": 0}
    return SimpleNamespace(**(fields | {"data": data, "out": out} | kw))


def test_the_next_command_after_each_stage():
    cpu = Dist()
    after_base = S.next_after_stage(stage_args("corpus", out="runs/toy/base"), cpu)
    assert after_base.startswith("python train_expert.py --init runs/toy/base --data helpful "
                                 "--data-dir runs/toy/data --out runs/toy/helpful")
    after_harmless = S.next_after_stage(stage_args("harmless", out="my runs/harm"), cpu)
    words = shlex.split(after_harmless.split("   (")[0])  # a path with a space stays one word
    assert words[:2] == ["python", "fuse.py"]
    assert words[words.index("--experts") + 1] == "my runs/helpful,my runs/harm,my runs/honest"
    real = S.next_after_stage(stage_args("beavertails", out="runs/real/harmless"), cpu)
    assert "--data real-pooled" in real
    assert "runs/real/helpful,runs/real/harmless,runs/real/honest" in real
    sft = S.next_after_stage(stage_args("pooled", out="runs/toy/sft"), cpu)
    assert sft == "python evaluate.py runs/toy/sft --data runs/toy/data --out runs/toy/sft.eval"
    assert "--task" not in S.next_after_stage(stage_args("mine.jsonl", task="honest"), cpu)
    assert "--experts runs/toy/helpful,runs/toy/harmless,runs/toy/mine" in S.next_after_stage(
        stage_args("mine.jsonl", task="honest", out="runs/toy/mine"), cpu)


def test_the_next_command_after_fusion_fills_the_drift_column():
    args = SimpleNamespace(data="pooled", out="runs/toy/fused/", base="runs/toy/base",
                           data_dir="runs/toy/data",
                           expert_dirs=["runs/toy/helpful", "runs/toy/harmless", "runs/toy/honest"])
    toy = S.next_after_fusion(args, Dist())
    assert toy == ("python evaluate.py runs/toy/fused --baselines runs/toy/base,runs/toy/helpful,"
                   "runs/toy/harmless,runs/toy/honest --data runs/toy/data "
                   "--out runs/toy/fused.eval")
    args.data = "real-pooled"
    gpu = Dist(device=torch.device("cuda", 0))
    real = S.next_after_fusion(args, gpu)
    assert "--suite real --drift-from runs/toy/helpful,runs/toy/harmless,runs/toy/honest" in real
    assert "--device cuda --dtype bfloat16" in real


def test_saved_lines_name_the_format_and_the_log():
    lines = S.saved_lines("fuse.py", "runs/toy/fused/", "the fused model")
    assert lines[0] == "fuse.py: saved the fused model to runs/toy/fused"
    assert "Meta's LLaMA format (params.json, consolidated.00.pth, tokenizer.model)" in lines[1]
    assert lines[1].endswith("training log runs/toy/fused.train/log.jsonl")


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


def test_held_out_batches_cover_every_example_on_any_world_size():
    """One process: val_batches_of's batches. Two ranks, 5 examples: 3 + 2, and the short rank
    runs a copy with task -1 (routed_right_by_dimension does not count it): as many batches."""
    examples = [{"tokens": [1, 2 + i], "targets": [2 + i, 3], "task": i % 3} for i in range(5)]
    one = S.held_out_batches(examples, 2, Dist())
    want = val_batches_of(examples, collate, 2, Dist())
    assert len(one) == len(want)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(one, want))
    ranks = [S.held_out_batches(examples, 2, Dist(rank=r, world_size=2)) for r in range(2)]
    assert [len(r) for r in ranks] == [2, 2]
    tasks = [torch.cat([b["task"] for b in r]).tolist() for r in ranks]
    assert tasks == [[0, 2, 1], [1, 0, -1]]
    seen = sorted(int(b["tokens"][i, 1]) for r in ranks for b in r for i in range(len(b["task"]))
                  if b["task"][i] >= 0)
    assert seen == [2, 3, 4, 5, 6]  # every example once
