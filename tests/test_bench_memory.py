"""bench/bench_memory.py: its parameter counts at LLaMA-2-7B against hand-computed values, its
weights / gradients / AdamW bytes at a small shape against the tensors of a real model (add_lora
included), and (slow) the measured validation: every predicted/measured ratio within 15 %."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_memory as BM  # noqa: E402
from trainer import build_optimizer  # noqa: E402

LLAMA_2_7B = BM.Shape(dim=4096, n_layers=32, n_heads=32, vocab=32000, hidden=11008)


def test_llama_2_7b_parameter_counts():
    dense = 6_738_415_616
    assert BM.ffn_hidden(4096, 256) == 11008
    assert BM.dense_params(LLAMA_2_7B) == dense
    assert BM.fused_params(LLAMA_2_7B) == dense + 2 * 32 * 3 * 4096 * 11008 + 32 * 3 * 4096
    assert BM.trainable_params(LLAMA_2_7B, 1, lora=True) == 32 * 3 * 8 * (4096 + 11008)
    assert BM.trainable_params(LLAMA_2_7B, 1, lora=False) == 32 * 3 * 4096 * 11008
    assert BM.trainable_params(LLAMA_2_7B, 2, lora=True) == \
        32 * (3 * 3 * 8 * (4096 + 11008) + 3 * 4096)
    share = BM.trainable_params(LLAMA_2_7B, 2, True) / BM.total_params(LLAMA_2_7B, 2, True)
    assert share <= 0.01  # the goal: LoRA trains at most 1 % of the fused model


SMALL = BM.Shape(dim=64, n_layers=2, n_heads=4, vocab=256, hidden=BM.ffn_hidden(64, 32),
                 seq_len=16, micro_batch=2)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("lora", [False, True])
def test_weights_gradients_optimizer_bytes_match_a_real_model(stage, lora):
    torch.manual_seed(0)
    run = BM.Run(stage, lora, device="cpu")
    model, loss_fn = BM.build_model(SMALL, run)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert BM.weight_bytes(SMALL, run) == tensor_bytes(model.parameters())
    assert BM.trainable_params(SMALL, stage, lora) == sum(p.numel() for p in trainable)
    optimizer = build_optimizer(model, 1e-4, 0.0)
    batch = BM.random_batch(SMALL)
    from trainer import StepCounts
    loss, _ = loss_fn(model, batch, StepCounts(float((batch["targets"] != -100).sum()),
                                               float(SMALL.micro_batch)))
    loss.backward()
    assert BM.gradient_bytes(SMALL, run) == tensor_bytes(p.grad for p in trainable)
    optimizer.step()
    moments = [t for state in optimizer.state.values() for k, t in state.items() if k != "step"]
    assert BM.optimizer_bytes(SMALL, run) == tensor_bytes(moments)
    if stage == 2 and not lora:  # W^0 of L_R: one copy of the experts
        experts = [p for n, p in model.named_parameters() if ".feed_forward.w" in n]
        assert BM.drift_reference_bytes(SMALL, run) == tensor_bytes(experts)


def test_table_prints_every_stage():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_memory.py"),
                          "--preset", "llama-2-7b", "--nproc", "1,8"],
                         capture_output=True, text=True, check=True).stdout
    assert "6,738,415,616" in out and out.count("stage 1 (FFN)") == 6 and "evaluation" in out


@pytest.mark.slow
def test_validation_ratios_within_15_percent():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_memory.py"), "--validate",
           "--dim", "384", "--n-layers", "2", "--n-heads", "6", "--vocab", "6000",
           "--seq-len", "192", "--micro-batch", "4"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ratios = [float(x) for line in out.splitlines() if re.match(r"(stage|evaluation)", line)
              for x in re.findall(r"\d+\.\d{3}\b", line)]
    assert len(ratios) == 10, out
    assert all(0.85 <= r <= 1.15 for r in ratios), out
