"""How fast is moe.MoE's sorted, grouped dispatch? One MoE layer's forward+backward vs three others:

    (a) ideal   the same SwiGLU expert matmuls on tokens that arrive already grouped by expert: no
                router, no sort, no gather, no weighting, no scatter -- a lower bound for any
                dropless dispatch
    (b) loop    a per-expert Python loop: torch.where(expert_idx == e), gather, FFN, weight,
                index_add (the way HF transformers' Mixtral does it)
    (c) dense   every expert on every token, masked by the top-k gate (moe.dense_moe_reference;
                E/k x FLOPs)

moe.MoE is timed with both of its backends (dispatch_grouped: torch._grouped_mm; dispatch_slices:
one expert at a time over the sorted rows). All variants run round-robin, `--repeats` times after a
warm-up; medians (and minima) are printed side by side, so a noisy shared machine slows them all
alike. Then decode shapes (T = 1, 8; forward only, no grad) and a whole fused-model vs dense-model
training step against their FLOP ratio.

    python bench/bench_moe.py                 # T=4096, dim 512, hidden 1376, E=3, k=2, float32
    python bench/bench_moe.py --repeats 9 --no-model
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import moe as moe_lib  # noqa: E402
from model import ModelArgs, Transformer  # noqa: E402
# training FLOPs per token, as trainer.py's MFU counts them
from trainer import flops_per_token  # noqa: E402


def ideal(x_groups, layer):
    """(a): tokens already grouped, one contiguous tensor per expert; only the expert matmuls."""
    return [moe_lib.swiglu(xg, layer.w1[e], layer.w2[e], layer.w3[e])
            for e, xg in enumerate(x_groups)]


def per_expert_loop(x, layer):
    """(b): the HF Mixtral way -- route, then for each expert find its tokens, run it, index_add
    back."""
    B, T, D = x.shape
    x_flat = x.reshape(-1, D)  # [N, D]
    logits = F.linear(x_flat.float(), layer.router.weight.float())  # [N, E]
    _, expert_idx, expert_weight = moe_lib.route(logits, layer.top_k)  # [N, k] [N, k]
    out = torch.zeros_like(x_flat)  # [N, D]
    for e in range(layer.n_experts):
        token, slot = torch.where(expert_idx == e)  # [n_e] [n_e]
        y = moe_lib.swiglu(x_flat[token], layer.w1[e], layer.w2[e], layer.w3[e])  # [n_e, D]
        out.index_add_(0, token, y * expert_weight[token, slot, None].to(y.dtype))
    return out.view(B, T, D)


def fused_moe(backend):
    def run(x, layer):
        layer.backend = backend
        return layer(x)
    return run


def fwd_bwd_step(fn, layer, x, grad_out):
    """One timed unit: forward fn(x, layer) and backward with grad_out, from fresh gradients."""
    def step():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        fn(x, layer).backward(grad_out)
    return step


# --clock cpu: time.process_time (with 1 thread: CPU time, blind to time slicing)
CLOCK = time.perf_counter


def time_round_robin(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: fn()} -> {name: (median, min) seconds}; every repeat runs every fn once, in turn."""
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            start = CLOCK()
            fn()
            if r >= warmup:
                times[name].append(CLOCK() - start)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def layer_benchmark(T, dim, hidden, E, k, dtype, repeats):
    torch.manual_seed(0)
    layer = moe_lib.MoE(dim, hidden, E, k).to(dtype)
    torch.nn.init.normal_(layer.router.weight, std=dim ** -0.5)  # spread tokens over all experts
    x = torch.randn(1, T, dim, dtype=dtype, requires_grad=True)  # [1, T, D]
    grad_out = torch.randn(1, T, dim, dtype=dtype)  # [1, T, D]
    with torch.no_grad():
        layer(x)
    counts = torch.bincount(layer.expert_idx.reshape(-1), minlength=E).tolist()
    # pre-grouped tokens
    x_groups = [torch.randn(c, dim, dtype=dtype, requires_grad=True) for c in counts]
    grad_groups = [torch.randn(c, dim, dtype=dtype) for c in counts]

    def fwd_bwd(fn):
        return fwd_bwd_step(fn, layer, x, grad_out)

    def ideal_step():
        layer.zero_grad(set_to_none=True)
        torch.autograd.backward(ideal(x_groups, layer), grad_groups)

    fns = {"(a) ideal": ideal_step, "MoE grouped_mm": fwd_bwd(fused_moe("grouped_mm")),
           "MoE slices": fwd_bwd(fused_moe("slices")),
           "(b) per-expert loop": fwd_bwd(per_expert_loop),
           "(c) dense": fwd_bwd(lambda x, layer: moe_lib.dense_moe_reference(layer, x))}
    if not moe_lib.grouped_mm_supported(x.reshape(-1, dim), layer.w1):
        del fns["MoE grouped_mm"]
    print(f"\nMoE layer forward+backward  T={T} dim={dim} hidden={hidden} E={E} k={k} {dtype} "
          f"threads={torch.get_num_threads()} tokens per expert={counts} median of {repeats}")
    res = time_round_robin(fns, repeats)
    (a_med, a_min), (b_med, b_min) = res["(a) ideal"], res["(b) per-expert loop"]
    print(f"  {'':22s} {'median':>8s}      {'/(a)':>5s}   {'/(b)':>5s}   |  "
          f"{'min':>7s}   {'/(a)':>5s}   {'/(b)':>5s}")
    for name, (t, m) in res.items():
        print(f"  {name:22s} {t * 1e3:8.1f} ms   {t / a_med:5.2f}   {t / b_med:5.2f}   |  "
              f"{m * 1e3:7.1f}   {m / a_min:5.2f}   {m / b_min:5.2f}")
    return res


def decode_benchmark(dim, hidden, E, k, dtype, repeats, batch=1):
    torch.manual_seed(0)
    layer = moe_lib.MoE(dim, hidden, E, k).to(dtype)
    torch.nn.init.normal_(layer.router.weight, std=dim ** -0.5)
    for T in (1, 8):
        x = torch.randn(batch, T, dim, dtype=dtype)
        fns = {"MoE grouped_mm": lambda: fused_moe("grouped_mm")(x, layer),
               "MoE slices": lambda: fused_moe("slices")(x, layer),
               "(b) per-expert loop": lambda: per_expert_loop(x, layer),
               "(c) dense": lambda: moe_lib.dense_moe_reference(layer, x)}
        if not moe_lib.grouped_mm_supported(x.reshape(-1, dim), layer.w1):
            del fns["MoE grouped_mm"]
        with torch.no_grad():
            res = time_round_robin(fns, repeats * 10, warmup=3)
        print(f"\ndecode forward (no grad) B={batch} T={T}, median of {repeats * 10}")
        b_med = res["(b) per-expert loop"][0]
        for name, (t, _) in res.items():
            print(f"  {name:22s} {t * 1e6:8.0f} us   {t / b_med:5.2f}x (b)")


def model_benchmark(repeats, dim=512, n_layers=2, seq_len=1024, vocab=512):
    torch.manual_seed(0)
    dense_args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=8, vocab_size=vocab, multiple_of=32)
    fused_args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=8, vocab_size=vocab, multiple_of=32,
                           n_experts=3, top_k=2)
    models = {"dense": Transformer(dense_args), "fused E=3 k=2": Transformer(fused_args)}
    for m in moe_lib.moe_layers(models["fused E=3 k=2"]):
        torch.nn.init.normal_(m.router.weight, std=dim ** -0.5)
    tokens = torch.randint(0, vocab, (1, seq_len))

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(tokens).view(-1, vocab), tokens.view(-1)).backward()
        return run

    med = {name: t for name, (t, _) in time_round_robin(
        {name: step(m) for name, m in models.items()}, repeats).items()}
    fpt = {name: flops_per_token(m, seq_len) for name, m in models.items()}
    flop_ratio = fpt["fused E=3 k=2"] / fpt["dense"]
    print(f"\nwhole-model training step (fwd+bwd) dim={dim} layers={n_layers} T={seq_len} "
          f"vocab={vocab}, median of {repeats}")
    for name, t in med.items():
        print(f"  {name:22s} {t * 1e3:8.1f} ms")
    print(f"  time ratio fused/dense = {med['fused E=3 k=2'] / med['dense']:.2f}x, "
          f"FLOP ratio = {flop_ratio:.2f}x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1376)
    p.add_argument("--experts", type=int, default=3)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall = perf_counter; cpu = this process's CPU time with 1 thread "
                        "(robust on a busy machine)")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--no-model", action="store_true")
    a = p.parse_args(argv)
    global CLOCK
    if a.clock == "cpu":
        CLOCK, a.threads = time.process_time, 1  # CPU time only means "work" for a single thread
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"clock: {a.clock}, threads: {torch.get_num_threads()}")
    dtype = getattr(torch, a.dtype)
    layer_benchmark(a.tokens, a.dim, a.hidden, a.experts, a.top_k, dtype, a.repeats)
    if not a.no_decode:
        decode_benchmark(a.dim, a.hidden, a.experts, a.top_k, dtype, a.repeats)
    if not a.no_model:
        model_benchmark(a.repeats)


if __name__ == "__main__":
    main()
