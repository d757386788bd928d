"""Host memory per rank while fuse.py builds the fused model under FSDP (2 gloo ranks on CPU).

Two ways to build, each in its own torchrun (peak RSS is per process), side by side in one run:
    lean   what fuse.py does under torchrun: the fused model on the meta device, fully_shard, then
           each rank reads only its rows of the checkpoint files
           (engineering/lean_fusion.py build_fused_model(shard=...))
    full   every rank first builds the whole fused model, then shards it (the naive build, for
           comparison)
For each rank it prints the peak resident memory (VmHWM, which counts the memory-mapped checkpoint
pages a rank touched too) minus the resident memory before building, against that rank's share of
the fused model's weights (the bytes of its local shards). Router init "hidden" (fuse.py's default)
runs a forward through the sharded model too (FSDP gathers one or two layers at a time).

    python bench/bench_fuse_memory.py                      # dim 1024, 8 layers, bf16 (~1 GB fused)
    python bench/bench_fuse_memory.py --layers 32          # 7B's depth, ~3.6 GB fused
    python bench/bench_fuse_memory.py --dim 64 --layers 2  # tiny: checks it runs, and the weights
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from engineering import checkpoints as C
from engineering.distributed import (end_process_group, full_state_dict,  # noqa: E402
                                     setup_distributed, shard_model)
from engineering.tiny import make_tiny_checkpoint  # noqa: E402
from engineering.lean_fusion import build_fused_model  # noqa: E402

PROMPTS = [["How do I bake bread?"], ["How do I pick a lock?"], ["Where was Ada born?"]]


def status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def make_checkpoints(root: str, dim: int, layers: int) -> tuple:
    """A bf16 base (as Meta ships them) and three aligned copies whose FFNs differ."""
    base = make_tiny_checkpoint(os.path.join(root, "base"), dim=dim, n_layers=layers,
                                n_heads=max(1, dim // 128), n_kv_heads=max(1, dim // 128),
                                dtype=torch.bfloat16, multiple_of=256)
    experts = []
    for i in range(3):
        model, _ = C.load_checkpoint(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".feed_forward." in name:
                    p.add_(0.01 * (i + 1))
        experts.append(C.save_checkpoint(model, os.path.join(root, f"expert{i}"),
                                         tokenizer_path=os.path.join(base, "tokenizer.model")))
        del model
    return base, experts


def worker(args):
    d = setup_distributed("cpu")
    # measure returns having freed its sharded model: only then may the process group end
    measure(args, d)
    end_process_group()


def measure(args, d):
    base, experts = args.base, args.experts.split(",")
    before = status_kib("VmRSS")

    def shard(model):
        return shard_model(model, d)

    if args.mode == "lean":
        model, _ = build_fused_model(base, experts, router_init=args.router_init,
                                     init_prompts=PROMPTS, dtype=torch.float32, verbose=False,
                                     shard=shard)
    else:
        model, _ = build_fused_model(base, experts, router_init=args.router_init,
                                     init_prompts=PROMPTS, dtype=torch.float32, verbose=False)
        model = shard(model)
    peak = status_kib("VmHWM")
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * 4
                for p in model.parameters())
    total = sum(p.numel() * 4 for p in model.parameters())
    record = {"mode": args.mode, "rank": d.rank, "rss_before_mib": before / 1024,
              "peak_mib": peak / 1024, "peak_minus_before_mib": (peak - before) / 1024,
              "share_mib": local / 2**20, "total_mib": total / 2**20}
    # the sharded weights, gathered, equal a single-process build of the same checkpoints
    if args.check:
        gathered = full_state_dict(model, d)
        reference, _ = build_fused_model(base, experts, router_init=args.router_init,
                                         init_prompts=PROMPTS, dtype=torch.float32, verbose=False)
        record["equal_to_single_process"] = all(torch.equal(gathered[k], v)
                                                for k, v in reference.state_dict().items())
    # one file per rank (stdout lines interleave)
    with open(os.path.join(args.results, f"{args.mode}{d.rank}.json"), "w") as f:
        json.dump(record, f)


def run_mode(mode: str, base: str, experts: list, check: bool, results: str,
             router_init: str) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.abspath(__file__), "--worker", "--mode", mode, "--base", base,
           "--experts", ",".join(experts), "--results", results, "--router-init", router_init]
    result = subprocess.run(cmd + (["--check"] if check else []), capture_output=True, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    if result.returncode:
        raise SystemExit(f"bench_fuse_memory.py: error: the {mode} run failed:\n"
                         f"{result.stderr[-3000:]}")
    return [json.load(open(os.path.join(results, f"{mode}{rank}.json"))) for rank in range(2)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--router-init", default="hidden", choices=["zero", "random", "hidden"])
    p.add_argument("--check", action="store_true",
                   help="also compare the gathered weights with a 1-process build")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["lean", "full"], help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--experts", help=argparse.SUPPRESS)
    p.add_argument("--results", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as root:
        base, experts = make_checkpoints(root, args.dim, args.layers)
        results = [r for mode in ("lean", "full")
                   for r in run_mode(mode, base, experts, args.check, root, args.router_init)]
    total = results[0]["total_mib"]
    print(f"fused model: dim {args.dim}, {args.layers} layers, 3 experts, float32: "
          f"{total:.0f} MiB; 2 gloo ranks on CPU; checkpoints bf16")
    print(f"{'build':6s} {'rank':>4s} {'RSS before':>11s} {'peak - before':>14s} {'share':>9s} "
          f"{'peak - before / share':>22s}")
    for r in results:
        print(f"{r['mode']:6s} {r['rank']:4d} {r['rss_before_mib']:8.0f} MiB "
              f"{r['peak_minus_before_mib']:10.0f} MiB {r['share_mib']:5.0f} MiB "
              f"{r['peak_minus_before_mib'] / r['share_mib']:21.2f}x"
              + ("" if "equal_to_single_process" not in r else
                 f"   gathered == 1-process build: {r['equal_to_single_process']}"))


if __name__ == "__main__":
    main()
