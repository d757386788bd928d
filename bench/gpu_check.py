"""One prepared check of the real path on one GPU (under 5 minutes on an H100). Every figure is a ratio of two
things measured side by side in this run (round-robin, CUDA-synchronised), never against a number from elsewhere:

  1. the MoE layer at LLaMA-2-7B FFN shapes (dim 4096, hidden 11008, E=3, k=2, 8192 tokens, bf16, forward +
     backward): moe.MoE (auto backend) against the ideal pre-grouped expert matmuls, the HF-style per-expert
     loop and the dense every-expert reference; TFLOP/s as a share of the measured bf16 matmul peak
  2. a whole training step (forward + backward + AdamW, bf16 autocast, float32 master weights), dense and fused,
     dim 2048, 8 layers, seq 2048, batch 4, vocab 32000: MFU against the measured bf16 peak, and the fused/dense
     time ratio against their FLOP ratio (trainer.flops_per_token); --compile adds the same models with every
     TransformerBlock torch.compile'd
  3. decoding (model.generate_tokens, KV cache, bf16, dim 4096, 8 layers) at batch 1 and 16: tokens/s against
     the HBM bound, batch x (measured copy bandwidth / weight bytes)
  4. `python pipeline.py --quick` end to end (the trainer picks CUDA by itself)
Each section that fails prints its traceback and the script goes on; the exit status says whether all passed.

    python bench/gpu_check.py [--compile]            # on the GPU machine (--compile: + compiled-block rows in 2.)
    python bench/gpu_check.py --device cpu --small   # tiny shapes on a CPU: checks that the script runs
"""
import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import moe as moe_lib  # noqa: E402
import trainer as T  # noqa: E402
from bench_moe import fwd_bwd_step, ideal, per_expert_loop  # noqa: E402
from model import ModelArgs, Transformer, generate_tokens  # noqa: E402


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(fns: dict, repeats: int, device, warmup: int = 2) -> dict:
    """{name: fn} -> {name: median seconds}; every repeat runs every fn once, in turn, synchronised."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def matmul_peak(device, dtype, n: int, repeats: int = 20) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` over `repeats` timed runs (the MFU denominator of this run)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def copy_bandwidth(device, n_bytes: int) -> float:
    """Bytes/s of a large device-to-device copy (read + write), the bound decoding approaches."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    t = time_round_robin({"copy": lambda: dst.copy_(src)}, 10, device)["copy"]
    return 2 * n_bytes / t


def moe_layer_check(device, T_tokens, dim, hidden, repeats, peak):
    torch.manual_seed(0)
    layer = moe_lib.MoE(dim, hidden, 3, 2).to(device, torch.bfloat16)
    torch.nn.init.normal_(layer.router.weight, std=dim ** -0.5)
    x = torch.randn(1, T_tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)  # [1, T, D]
    grad_out = torch.randn_like(x)
    with torch.no_grad():
        layer(x)
    counts = torch.bincount(layer.expert_idx.reshape(-1), minlength=3).tolist()
    groups = [torch.randn(c, dim, device=device, dtype=torch.bfloat16, requires_grad=True) for c in counts]
    group_grads = [torch.randn_like(g) for g in groups]

    def fwd_bwd(fn):
        return fwd_bwd_step(fn, layer, x, grad_out)

    fns = {"(a) ideal, pre-grouped": lambda: torch.autograd.backward(ideal(groups, layer), group_grads),
           "moe.MoE (auto)": fwd_bwd(lambda x, layer: layer(x)),
           "(b) HF-style loop": fwd_bwd(per_expert_loop),
           "(c) dense": fwd_bwd(lambda x, layer: moe_lib.dense_moe_reference(layer, x))}
    res = time_round_robin(fns, repeats, device)
    flops = 3 * 2 * 3 * dim * hidden * T_tokens * 2  # fwd + bwd (x3) of 3 matmuls over the k=2 rows per token
    print(f"\n1. MoE layer fwd+bwd  T={T_tokens} dim={dim} hidden={hidden} E=3 k=2 bf16 "
          f"backend={moe_lib.pick_backend(x, layer.w1, layer.w2)}, median of {repeats}")
    for name, t in res.items():
        print(f"   {name:24s} {t * 1e3:8.2f} ms  {t / res['(a) ideal, pre-grouped']:5.2f}x ideal  "
              f"{flops / t / 1e12:7.1f} TFLOP/s = {flops / t / peak:5.1%} of the bf16 peak")


def train_step_check(device, dim, n_layers, seq, batch, vocab, repeats, peak, compile_blocks=False):
    """Dense vs fused training steps as trainer.train runs them on one GPU (autocast bf16, float32 weights,
    AdamW). With compile_blocks, two more rows: the same models with every TransformerBlock torch.compile'd
    (a copy of each model, so eager and compiled run side by side in one round-robin)."""
    torch.manual_seed(0)
    common = dict(dim=dim, n_layers=n_layers, n_heads=dim // 128, vocab_size=vocab, multiple_of=256, max_seq_len=seq)
    models = {"dense": Transformer(ModelArgs(**common)).to(device),
              "fused E=3 k=2": Transformer(ModelArgs(**common, n_experts=3, top_k=2)).to(device)}
    for m in moe_lib.moe_layers(models["fused E=3 k=2"]):
        torch.nn.init.normal_(m.router.weight, std=dim ** -0.5)
    if compile_blocks:
        for name in list(models):
            compiled = copy.deepcopy(models[name])
            for block in compiled.layers:
                block.compile()
            models[name + ", compiled blocks"] = compiled
    tokens = torch.randint(0, vocab, (batch, seq), device=device)
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-5, fused=device.type == "cuda")
                  for name, m in models.items()}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(name):
        def run():
            model, opt = models[name], optimizers[name]
            with autocast:
                logits = model(tokens)  # [B, T, V]
            F.cross_entropy(logits.float().view(-1, vocab), tokens.view(-1)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    fused_layer = moe_lib.moe_layers(models["fused E=3 k=2"])[0]
    with autocast:  # what "auto" picks for the fused model's float32 weights under bf16 autocast
        backend = moe_lib.pick_backend(torch.empty(1, dim, device=device), fused_layer.w1, fused_layer.w2)
    res = time_round_robin({name: step(name) for name in models}, repeats, device)
    fpt = {name: T.flops_per_token(m, seq) for name, m in models.items()}
    print(f"\n2. training step (fwd+bwd+AdamW, bf16 autocast, MoE backend {backend}) dim={dim} layers={n_layers} "
          f"seq={seq} batch={batch} vocab={vocab}, median of {repeats}")
    for name, t in res.items():
        print(f"   {name:30s} {t * 1e3:8.1f} ms  MFU {fpt[name] * batch * seq / t / peak:6.1%}")
    for suffix in ("", ", compiled blocks") if compile_blocks else ("",):
        dense, fused = "dense" + suffix, "fused E=3 k=2" + suffix
        time_ratio, flop_ratio = res[fused] / res[dense], fpt[fused] / fpt[dense]
        print(f"   fused/dense{suffix} time {time_ratio:.2f}x, FLOP ratio {flop_ratio:.2f}x -> "
              f"{time_ratio / flop_ratio:.2f}x the FLOP ratio")


def decode_check(device, dim, n_layers, vocab, new_tokens, bandwidth):
    torch.manual_seed(0)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=dim // 128, vocab_size=vocab, multiple_of=256,
                     max_seq_len=64 + new_tokens)
    model = Transformer(args).to(device, torch.bfloat16).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n3. decoding, bf16, dim={dim} layers={n_layers} ({weight_bytes / 2**30:.2f} GiB of weights), "
          f"{new_tokens} new tokens, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    for batch in (1, 16):
        prompts = [torch.randint(3, vocab, (16,)).tolist() for _ in range(batch)]
        generate_tokens(model, prompts, 4, temperature=0.0, eos_id=-1)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        generate_tokens(model, prompts, new_tokens, temperature=0.0, eos_id=-1)
        synchronize(device)
        tokens_per_s = batch * new_tokens / (time.perf_counter() - start)
        bound = batch * bandwidth / weight_bytes  # every step reads every weight once
        print(f"   batch {batch:2d}: {tokens_per_s:8.1f} tokens/s = {tokens_per_s / bound:5.1%} of the HBM bound "
              f"({bound:.0f} tokens/s)")
    del model


def pipeline_check(device):
    with tempfile.TemporaryDirectory() as run_dir:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "pipeline.py", "--quick", "--run-dir", run_dir], cwd=ROOT,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - start
    status = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
    print(f"\n4. python pipeline.py --quick on {device.type}: {status} in {seconds:.0f} s")
    if result.returncode:
        print((result.stdout + result.stderr)[-3000:])
    return result.returncode


def run_section(name, fn, *args, **kwargs) -> bool:
    """Run one section; a failure prints its traceback and the script goes on to the next section."""
    try:
        fn(*args, **kwargs)
        return True
    except Exception:
        print(f"\n{name}: FAILED\n{traceback.format_exc()}")
        return False
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run of the script itself)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true", help="also time the training step with compiled blocks")
    p.add_argument("--no-pipeline", action="store_true")
    p.add_argument("--sections", default="1,2,3", help="which of sections 1-3 to run (e.g. 3 to rerun decoding)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: --device cuda but torch sees no GPU (use --device cpu --small)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, torch {torch.__version__}")
    s = args.small
    peak = matmul_peak(device, torch.bfloat16, 256 if s else 8192)
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    sections = {int(x) for x in args.sections.split(",")}
    ok = 1 not in sections or run_section("1. MoE layer", moe_layer_check, device, 64 if s else 8192, 64 if s else 4096,
                     128 if s else 11008, args.repeats, peak)
    ok &= 2 not in sections or run_section("2. training step", train_step_check, device, 256 if s else 2048, 2 if s else 8,
                      64 if s else 2048, 2 if s else 4, 512 if s else 32000, args.repeats, peak, args.compile)
    ok &= 3 not in sections or run_section("3. decoding", lambda: decode_check(device, 256 if s else 4096, 2 if s else 8,
                                                          512 if s else 32000, 8 if s else 128,
                                                          copy_bandwidth(device, 2**24 if s else 2**31)))
    if not args.no_pipeline:
        ok &= pipeline_check(device) == 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
