"""Training throughput of trainer.py: tokens/s and MFU, one process vs 2-rank FSDP, dense vs fused.

    python bench/bench_train.py [--steps 40] [--keep DIR]

Builds the synthetic world and a random base at the default size (dim 128, 4 layers), three
"aligned" copies whose FFNs differ, then times, each with the same data and batch (16 x 128
tokens):
    dense pretraining   train_expert.py --init scratch (all weights, 6N FLOPs/token)
    dense FFN-only      train_expert.py --trainable ffn (stage 1)
    fused               fuse.py, router + experts trainable (stage 2)
once in one process and once under torchrun with 2 ranks (FSDP2, gloo). tokens/s and MFU are read
from the runs' log.jsonl (the median of the log windows after the first, which includes warm-up);
MFU = model FLOPs/s over the float32 matmul peak the trainer measures at start-up. Nothing here is
asserted by the tests.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from engineering import checkpoints as C
from data.tokenizer import Tokenizer
import trainer as T  # noqa: E402


def sh(cmd, nproc=1):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                     "--standalone", f"--nproc_per_node={nproc}"]
    subprocess.run(launcher + cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def median_window(out):
    with open(out + ".train/log.jsonl") as f:
        rows = [json.loads(line) for line in f][1:]
    return (statistics.median(r["tokens_per_s"] for r in rows),
            statistics.median(r["mfu"] for r in rows))


def make_checkpoints(work):
    data = os.path.join(work, "data")
    subprocess.run([sys.executable, "-m", "data.toy", "--out", data], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    tok = Tokenizer(os.path.join(data, "tokenizer.model"))
    args = M.ModelArgs(dim=128, n_layers=4, n_heads=4, vocab_size=tok.n_words, multiple_of=32,
                       max_seq_len=512)
    torch.manual_seed(0)
    base = M.Transformer(args)
    C.save_checkpoint(base, os.path.join(work, "base"),
                      tokenizer_path=os.path.join(data, "tokenizer.model"))
    experts = []
    for i in range(3):
        state = {k: v + 0.01 * torch.randn_like(v) if ".feed_forward." in k else v
                 for k, v in base.state_dict().items()}
        experts.append(C.save_checkpoint(state, os.path.join(work, f"expert{i}"), args=args,
                                         tokenizer_path=os.path.join(data, "tokenizer.model")))
    return data, os.path.join(work, "base"), experts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--keep", default=None, help="keep the runs in this directory")
    a = p.parse_args()
    work = a.keep or tempfile.mkdtemp(prefix="bench_train_")
    data, base, experts = make_checkpoints(work)
    common = ["--data-dir", data, "--steps", str(a.steps), "--batch-size", "16", "--seq-len", "128",
              "--log-every", "5", "--overwrite"]
    runs = {
        "dense pretraining": lambda out: ["train_expert.py", "--init", "scratch",
                                          "--data", "corpus", "--out", out],
        "dense FFN-only (stage 1)": lambda out: ["train_expert.py", "--init", base,
                                                 "--data", "pooled", "--out", out],
        "fused router+experts (stage 2)": lambda out: ["fuse.py", "--base", base,
                                                       "--experts", ",".join(experts),
                                                       "--router-init", "zero", "--out", out],
    }
    results = {}
    for name, cmd in runs.items():
        for nproc in (1, 2):
            out = os.path.join(work, f"{name.split()[0]}{nproc}")
            sh(cmd(out) + common, nproc)
            results[name, nproc] = median_window(out)
    print(f"training throughput, dim 128 x 4 layers, batch 16 x 128, float32, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'run':<32} {'1 proc tok/s':>13} {'MFU':>6} {'2-rank FSDP tok/s':>18} {'MFU':>6} "
          f"{'FSDP/1':>7}")
    for name in runs:
        (t1, m1), (t2, m2) = results[name, 1], results[name, 2]
        print(f"{name:<32} {t1:>13.0f} {m1:>6.1%} {t2:>18.0f} {m2:>6.1%} {t2 / t1:>6.2f}x")
    dense_model = C.load_checkpoint(base)[0]
    for n, prm in dense_model.named_parameters():
        prm.requires_grad = ".feed_forward." in n
    fused_model = C.load_checkpoint(os.path.join(work, "fused1"))[0]
    for n, prm in fused_model.named_parameters():
        prm.requires_grad = ".feed_forward." in n
    flop_ratio = T.flops_per_token(fused_model, 128) / T.flops_per_token(dense_model, 128)
    time_ratio = (results["dense FFN-only (stage 1)", 1][0]
                  / results["fused router+experts (stage 2)", 1][0])
    print(f"fused / dense FFN-only, one process: step time ratio {time_ratio:.2f}x "
          f"vs FLOP ratio {flop_ratio:.2f}x (top-2 of 3 experts, same trainable set)")
    if not a.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
