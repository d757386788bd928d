"""model.py benchmarks: KV-cache decoding speed, and peak memory loading a ~1 GB bf16 checkpoint.

    python bench/bench_model.py            # both
    python bench/bench_model.py --decode   # decode tokens/s with vs without the KV cache
    python bench/bench_model.py --memory   # peak RSS while loading / file size (target <= 1.3)

Ratios are measured side by side in one run; nothing here is asserted by the tests.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from engineering import checkpoints as C


@torch.inference_mode()
def decode_without_cache(model, prompt, n_new):
    """Greedy decoding that re-runs the whole sequence for every new token (what the KV cache
    avoids)."""
    tokens = torch.tensor([prompt])
    for _ in range(n_new):
        next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)  # [1, 1]
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[0, len(prompt):].tolist()


def bench_decode():
    torch.manual_seed(0)
    args = M.ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=512, multiple_of=32,
                       max_seq_len=1024)
    model = M.Transformer(args).eval()
    prompt = [1] + torch.randint(3, 512, (15,)).tolist()
    print(f"decode, dim={args.dim} layers={args.n_layers} float32, 1 prompt of 16 tokens, greedy")
    M.generate_tokens(model, [prompt], 8), decode_without_cache(model, prompt, 8)  # warm-up
    print(f"{'new tokens':>10} {'cache tok/s':>12} {'no-cache tok/s':>15} {'speed-up':>9}  "
          "same tokens")
    for n_new in (64, 256, 512):
        t = time.perf_counter()
        cached = M.generate_tokens(model, [prompt], n_new)[0]
        t_cache = time.perf_counter() - t
        t = time.perf_counter()
        plain = decode_without_cache(model, prompt, n_new)
        t_plain = time.perf_counter() - t
        print(f"{n_new:>10} {n_new / t_cache:>12.1f} {n_new / t_plain:>15.1f} "
              f"{t_plain / t_cache:>8.1f}x  {cached == plain}")


def write_big_checkpoint(path, dim=2048, n_layers=8, vocab=32000):
    """A ~1.1 GB bf16 Meta-format checkpoint with random weights, written without building a
    model."""
    args = M.ModelArgs(dim=dim, n_layers=n_layers, n_heads=16, vocab_size=vocab, max_seq_len=512)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in M.Transformer(args).state_dict().items()}
    state = {k: (torch.randn(s) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    C.save_checkpoint(state, path, args=args)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def peak_rss_bytes():
    """The process's peak resident set (VmHWM; unlike ru_maxrss it is not inherited across
    exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


@torch.no_grad()
def peak_rss_child(path):
    """Runs in a fresh process: peak RSS before loading, and after loading and reading every
    weight."""
    import model as M

    before = peak_rss_bytes()
    t = time.perf_counter()
    model, _ = C.load_checkpoint(path)
    load_s = time.perf_counter() - t
    total = sum(float(p.sum()) for p in model.parameters())
    after = peak_rss_bytes()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    print(json.dumps({"before": before, "after": after, "load_s": load_s, "dtypes": dtypes,
                      "checksum": total}))


def bench_memory():
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big")
        size = write_big_checkpoint(path)
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"sys.path.insert(0, "
                f"{os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
                f"import bench_model; bench_model.peak_rss_child({path!r})")
        out = json.loads(subprocess.check_output([sys.executable, "-c", code])
                         .decode().strip().splitlines()[-1])
    grown = out["after"] - out["before"]
    print(f"load a {size / 1e9:.2f} GB bf16 checkpoint (mmap=True, weights_only=True), "
          f"then read every weight:")
    print(f"  process RSS before load {out['before'] / 1e9:.2f} GB (python + torch), "
          f"peak after {out['after'] / 1e9:.2f} GB")
    print(f"  parameters stay {out['dtypes']}; load took {out['load_s']:.2f} s")
    print(f"  peak RSS growth / checkpoint size = {grown / size:.2f}   (target <= 1.3)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decode", action="store_true")
    parser.add_argument("--memory", action="store_true")
    a = parser.parse_args()
    both = not (a.decode or a.memory)
    if a.decode or both:
        bench_decode()
    if a.memory or both:
        bench_memory()
