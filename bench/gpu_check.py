"""One prepared check of the real path on one GPU (sized for about 6 minutes on an H100). Every
figure is a ratio of two things measured side by side in this run (CUDA-synchronised), never
against a number from elsewhere:

  1. the MoE layer at LLaMA-2-7B FFN shapes (dim 4096, hidden 11008, E=3, k=2, 8192 tokens, bf16,
     forward + backward): moe.MoE (auto backend) against the ideal pre-grouped expert matmuls, the
     HF-style per-expert loop and the dense every-expert reference; TFLOP/s as a share of the
     measured bf16 matmul peak
  2. a whole training step (forward + backward + AdamW, bf16 autocast, float32 master weights),
     dense and fused, dim 2048, 8 layers, seq 2048, batch 4, vocab 32000: MFU against the measured
     bf16 peak, and the fused/dense time ratio against their FLOP ratio (trainer.flops_per_token);
     --compile adds the same models with every TransformerBlock torch.compile'd
  3. decoding, dense and fused, dim 4096, 8 layers, bf16, batch 1 and 16: model.generate_tokens
     eagerly and with its one-token step compiled (engineering/compiled_decode.py): tokens/s against
     the HBM bound batch x (measured copy bandwidth / weight bytes), the compile time, and how far
     the compiled step's logits are from the eager ones
  4. train_expert.py --compile and fuse.py --compile as a user runs them, dim 2048, 8 layers, seq
     2048: stage 0 on the synthetic world's packed corpus, then stage 2 from that base (its three
     "experts" are the base itself) on a file of long records; the MFU of the last window of the
     trainer's own log (OUT.train/log.jsonl), after the steps that compile
  5. LoRA memory: training steps of stage 1 and stage 2 with rank 8 at dim 4096, 4 layers, the
     model set up as train_expert.py / fuse.py set it up with --lora-rank 8 on one GPU (frozen
     weights bf16, deltas float32, bf16 autocast): torch.cuda.max_memory_allocated against
     bench/bench_memory.py's formula for the same shape
  6. (only when asked: --sections ...,6) `python pipeline.py --quick` end to end
Each section that fails prints its traceback and the script goes on; the exit status says whether
all passed. Everything printed also goes to --log (on a GPU, by default
bench/results/gpu_check_GPU_DATE.log), with each section's wall time.

    python bench/gpu_check.py [--compile]            # on the GPU (--compile: more rows in 2.)
    python bench/gpu_check.py --sections 3           # one section again
    python bench/gpu_check.py --device cpu --small   # tiny shapes on a CPU: checks that it runs
"""
import argparse
import copy
import datetime
import json
import os
import re
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
import bench_memory as BM  # noqa: E402
import moe as moe_lib  # noqa: E402
import trainer as T  # noqa: E402
from bench_moe import fwd_bwd_step, ideal, per_expert_loop  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from data.toy import load_corpus_documents  # noqa: E402
from engineering.compiled_decode import CompiledDecoder, step_logits, synchronize  # noqa: E402
from model import ModelArgs, Transformer, generate_tokens  # noqa: E402


def time_round_robin(fns: dict, repeats: int, device, warmup: int = 2) -> dict:
    """{name: fn} -> {name: median seconds}; every repeat runs every fn once, in turn,
    synchronised."""
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
    """Best FLOP/s of an n x n matmul in `dtype` over `repeats` timed runs (the MFU denominator of
    this run)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype),
            torch.randn(n, n, device=device, dtype=dtype))
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
    x = torch.randn(1, T_tokens, dim, device=device, dtype=torch.bfloat16,
                    requires_grad=True)  # [1, T, D]
    grad_out = torch.randn_like(x)
    with torch.no_grad():
        layer(x)
    counts = torch.bincount(layer.expert_idx.reshape(-1), minlength=3).tolist()
    groups = [torch.randn(c, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
              for c in counts]
    group_grads = [torch.randn_like(g) for g in groups]

    def fwd_bwd(fn):
        return fwd_bwd_step(fn, layer, x, grad_out)

    fns = {"(a) ideal, pre-grouped": lambda: torch.autograd.backward(ideal(groups, layer),
                                                                     group_grads),
           "moe.MoE (auto)": fwd_bwd(lambda x, layer: layer(x)),
           "(b) HF-style loop": fwd_bwd(per_expert_loop),
           "(c) dense": fwd_bwd(lambda x, layer: moe_lib.dense_moe_reference(layer, x))}
    res = time_round_robin(fns, repeats, device)
    # fwd + bwd (x3) of 3 matmuls over the k=2 rows per token, 2 FLOPs a multiply-add
    flops = 3 * 2 * 3 * dim * hidden * T_tokens * 2
    print(f"\n1. MoE layer fwd+bwd  T={T_tokens} dim={dim} hidden={hidden} E=3 k=2 bf16 "
          f"backend={moe_lib.pick_backend(x, layer.w1, layer.w2)}, median of {repeats}")
    for name, t in res.items():
        print(f"   {name:24s} {t * 1e3:8.2f} ms  {t / res['(a) ideal, pre-grouped']:5.2f}x ideal  "
              f"{flops / t / 1e12:7.1f} TFLOP/s = {flops / t / peak:5.1%} of the bf16 peak")


def train_step_check(device, dim, n_layers, seq, batch, vocab, repeats, peak, compile_blocks=False):
    """Dense vs fused training steps as trainer.train runs them on one GPU (autocast bf16, float32
    weights, AdamW). With compile_blocks, two more rows: the same models with every TransformerBlock
    torch.compile'd (a copy of each model, so eager and compiled run side by side in one
    round-robin)."""
    torch.manual_seed(0)
    common = dict(dim=dim, n_layers=n_layers, n_heads=dim // 128, vocab_size=vocab,
                  multiple_of=256, max_seq_len=seq)
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
        backend = moe_lib.pick_backend(torch.empty(1, dim, device=device), fused_layer.w1,
                                       fused_layer.w2)
    res = time_round_robin({name: step(name) for name in models}, repeats, device)
    fpt = {name: T.flops_per_token(m, seq) for name, m in models.items()}
    print(f"\n2. training step (fwd+bwd+AdamW, bf16 autocast, MoE backend {backend}) "
          f"dim={dim} layers={n_layers} seq={seq} batch={batch} vocab={vocab}, median of {repeats}")
    for name, t in res.items():
        print(f"   {name:30s} {t * 1e3:8.1f} ms  MFU {fpt[name] * batch * seq / t / peak:6.1%}")
    for suffix in ("", ", compiled blocks") if compile_blocks else ("",):
        dense, fused = "dense" + suffix, "fused E=3 k=2" + suffix
        time_ratio, flop_ratio = res[fused] / res[dense], fpt[fused] / fpt[dense]
        print(f"   fused/dense{suffix} time {time_ratio:.2f}x, FLOP ratio {flop_ratio:.2f}x -> "
              f"{time_ratio / flop_ratio:.2f}x the FLOP ratio")


# --------------------------------------------------------------------------------------------------
# 3. Decoding: eager against the compiled step


def decode_model(device, dim: int, n_layers: int, vocab: int, n_experts: int, max_seq_len: int):
    """A random bf16 model for decoding, built on the device; a fused one with a random router (so
    that tokens spread over the experts as a trained router spreads them)."""
    torch.manual_seed(0)
    args = ModelArgs(dim=dim, n_layers=n_layers, n_heads=dim // 128, vocab_size=vocab,
                     multiple_of=256, max_seq_len=max_seq_len, n_experts=n_experts, top_k=2)
    with torch.device(device):
        model = Transformer(args)
    for layer in moe_lib.moe_layers(model):
        torch.nn.init.normal_(layer.router.weight, std=dim ** -0.5)
    return model.to(torch.bfloat16).eval()


def decode_tokens_per_s(model, prompts: list, new_tokens: int, device) -> float:
    """New tokens per second of model.generate_tokens after a warm-up generation (where a
    CompiledDecoder compiles its step and captures its graph)."""
    generate_tokens(model, prompts, 4, temperature=0.0)  # warm-up
    synchronize(device)
    start = time.perf_counter()
    generate_tokens(model, prompts, new_tokens, temperature=0.0)  # no </s>: all tokens
    synchronize(device)
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def decode_check(device, dim, n_layers, vocab, new_tokens, bandwidth):
    print(f"\n3. decoding, bf16, dim={dim} layers={n_layers}, {new_tokens} new tokens after a "
          f"prompt of 16, eager and compiled (engineering/compiled_decode.py); copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s; HBM bound = batch x bandwidth / weight bytes")
    for kind, n_experts in (("dense", 0), ("fused", 3)):
        model = decode_model(device, dim, n_layers, vocab, n_experts, 64 + new_tokens)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"   {kind} ({weight_bytes / 2**30:.2f} GiB of weights)")
        for batch in (1, 16):
            prompts = [torch.randint(3, vocab, (16,)).tolist() for _ in range(batch)]
            bound = batch * bandwidth / weight_bytes  # every step reads every weight once
            decoder = CompiledDecoder(model)  # its own static cache of `batch` rows
            rates = {"eager": decode_tokens_per_s(model, prompts, new_tokens, device),
                     "compiled": decode_tokens_per_s(decoder, prompts, new_tokens, device)}
            if decoder.fallback_reason:
                raise RuntimeError(f"the compiled step fell back: {decoder.fallback_reason}")
            shares = ", ".join(f"{name} {rate:8.1f} tokens/s = {rate / bound:5.1%}"
                               for name, rate in rates.items())
            print(f"   {kind} batch {batch:2d}: {shares} of the HBM bound ({bound:.0f} tokens/s); "
                  f"compiled/eager {rates['compiled'] / rates['eager']:.2f}x; compiled the step in "
                  f"{decoder.compile_seconds:.1f} s")
        # the batch-16 decoder again, on sequences as long as the timed ones: no new shape
        tokens = torch.randint(3, vocab, (16, 16 + new_tokens), device=device)  # [B, L]
        eager = step_logits(model, tokens, 16)  # [B, new_tokens, V]
        compiled = step_logits(decoder, tokens, 16)  # [B, new_tokens, V]
        same = (eager.argmax(-1) == compiled.argmax(-1)).float().mean().item()
        difference = (compiled - eager).abs().max().item()
        print(f"   {kind}: compiled vs eager logits, {new_tokens} steps of 16 rows: max "
              f"|difference| {difference:.4f}, the logits' std {eager.std().item():.4f}; same "
              f"greedy token {same:.1%}")
        del model, decoder


# --------------------------------------------------------------------------------------------------
# 4. train_expert.py --compile and fuse.py --compile, as a user runs them


def run_command(args: list, what: str) -> float:
    """Run `python ARGS` in the repository; its wall time, or RuntimeError with its output's end."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable] + args, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n"
                           f"{(result.stdout + result.stderr)[-3000:]}")
    return time.perf_counter() - start


def last_logged_window(out_dir: str) -> tuple:
    """(the last record of OUT.train/log.jsonl, the step its window began after)."""
    with open(out_dir + ".train/log.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    before = records[-2]["step"] if len(records) > 1 else 0
    return records[-1], before


def write_long_records(data_dir: str, path: str, seq_len: int, n_records: int = 24):
    """A records file (instruction, output, task) whose outputs are runs of the world's corpus
    documents longer than seq_len tokens, so that fuse.py trains on full sequences of seq_len (its
    --data pooled examples are a few dozen tokens). Dimensions 0, 1, 2 in turn."""
    documents = load_corpus_documents(data_dir)
    tokenizer = Tokenizer(os.path.join(data_dir, "tokenizer.model"))
    lengths = [len(tokenizer.encode(doc, bos=False, eos=False)) for doc in documents]
    records, i = [], 0
    for n in range(n_records):
        chosen, tokens = [], 0
        while tokens <= seq_len:
            chosen.append(documents[i % len(documents)])
            tokens += lengths[i % len(documents)] + 1
            i += 1
        records.append({"instruction": "Tell me about the world.", "input": "",
                        "output": " ".join(chosen), "task": n % 3})
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def compiled_training_check(device, size: list, seq_len: int, batch: int, steps: int):
    log_every = max(1, steps // 3)
    common = ["--seq-len", str(seq_len), "--batch-size", str(batch), "--steps", str(steps),
              "--log-every", str(log_every), "--compile", "--device", device.type]
    print(f"\n4. --compile runs as a user starts them: {' '.join(size)}, seq {seq_len}, batch "
          f"{batch}, {steps} steps, MFU of the trainer's last log window (after compiling)")
    with tempfile.TemporaryDirectory() as tmp:
        data, base, fused = (os.path.join(tmp, name) for name in ("data", "base", "fused"))
        seconds = run_command(["-m", "data.toy", "--out", data], "python -m data.toy")
        print(f"   the synthetic world (python -m data.toy): {seconds:.0f} s")
        records = os.path.join(tmp, "long_records.jsonl")
        write_long_records(data, records, seq_len)
        runs = {"train_expert.py --compile (stage 0: every weight, the packed corpus)":
                ["train_expert.py", "--init", "scratch", "--data", "corpus", "--data-dir", data,
                 "--out", base] + size + common,
                "fuse.py --compile (stage 2: router + experts, long records)":
                ["fuse.py", "--base", base, "--experts", ",".join([base] * 3), "--data", records,
                 "--data-dir", data, "--out", fused] + common}
        for (name, args), out in zip(runs.items(), (base, fused)):
            seconds = run_command(args, name.split(" (")[0])
            last, before = last_logged_window(out)
            print(f"   {name}: MFU {last['mfu']:.1%}, {last['tokens_per_s']:,.0f} tokens/s over "
                  f"steps {before + 1}-{last['step']}; {seconds:.0f} s in all (start, compiling, "
                  f"saving)")


# --------------------------------------------------------------------------------------------------
# 5. LoRA training memory against bench_memory.py's formula


def allocated(device) -> int:
    """Bytes in use now: the CUDA allocator's tensors, or on a CPU the resident memory (VmRSS)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return BM.status_kib("VmRSS") * 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        BM.reset_peak()


def peak(device) -> int:
    """Bytes at the peak since reset_peak: torch.cuda.max_memory_allocated, or VmHWM on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return BM.status_kib("VmHWM") * 1024


def under_autocast(loss_fn, device):
    """The objective as the trainer runs it on one GPU: in bf16 autocast (on a CPU: as it is)."""
    def run(model, batch, counts):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            return loss_fn(model, batch, counts)
    return run


def measure_lora_training(shape, run, device) -> tuple:
    """(peak of the 2nd training step - memory before the model was built, the same peak - memory at
    that step's start) for bench_memory.build_model's model with LoRA, set up as train_expert.py and
    fuse.py set it up with --lora-rank on `device`: the frozen weights in trainer.compute_dtype
    (bf16 on CUDA, as they load them), the deltas (and fuse.py's router) float32."""
    before = allocated(device)
    model, loss_fn = BM.build_model(shape, run, device)
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(T.compute_dtype(device))
    optimizer = T.build_optimizer(model, 1e-4, 0.1 if run.stage == 1 else 0.0)
    batch = {k: v.to(device) for k, v in BM.random_batch(shape).items()}
    loss_fn = under_autocast(loss_fn, device)
    BM.training_step(model, optimizer, loss_fn, batch)  # AdamW's state exists from here on
    synchronize(device)
    reset_peak(device)
    step_start = allocated(device)
    BM.training_step(model, optimizer, loss_fn, batch)
    synchronize(device)
    measured = peak(device)
    del model, optimizer
    return measured - before, measured - step_start


def lora_memory_check(device, shape):
    how = "torch.cuda.max_memory_allocated" if device.type == "cuda" else (
        "VmHWM (on a CPU at tiny shapes the libraries' own memory dominates: a smoke run)")
    print(f"\n5. LoRA r={shape.lora_rank} training memory, dim {shape.dim}, {shape.n_layers} "
          f"layers, hidden {shape.hidden}, vocab {shape.vocab}, micro-batch {shape.micro_batch} x "
          f"seq {shape.seq_len}: {how} against bench/bench_memory.py (MiB; total = the 2nd step's "
          f"peak - memory before the model; step = that peak - memory at the step's start)")
    for stage in (1, 2):
        run = BM.Run(stage, lora=True, device=device.type)
        measured = measure_lora_training(shape, run, device)
        cells = [f"{what}: predicted {want / 2**20:9.1f}, measured {got / 2**20:9.1f}, ratio "
                 + (f"{want / got:5.3f}" if got > 0 else "  n/a")
                 for what, want, got in zip(("total", "step"), BM.predicted(shape, run), measured)]
        print(f"   {BM.STAGE_NAMES[stage]:16s} " + ";  ".join(cells))
        if device.type == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# 6. The quick pipeline, and the command line


def pipeline_check(device):
    with tempfile.TemporaryDirectory() as run_dir:
        seconds = run_command(["pipeline.py", "--quick", "--run-dir", run_dir],
                              "pipeline.py --quick")
    print(f"\n6. python pipeline.py --quick on {device.type}: ok in {seconds:.0f} s")


# The shapes of each section: on the GPU, and --small (a smoke run of the script on a CPU)
SHAPES = {
    "gpu": dict(matmul=8192, copy_bytes=2**31,
                moe=dict(T_tokens=8192, dim=4096, hidden=11008),
                train=dict(dim=2048, n_layers=8, seq=2048, batch=4, vocab=32000),
                decode=dict(dim=4096, n_layers=8, vocab=32000, new_tokens=128),
                compiled_runs=dict(size=["--dim", "2048", "--n-layers", "8", "--n-heads", "16",
                                         "--multiple-of", "256"], seq_len=2048, batch=4, steps=30),
                lora=BM.Shape(dim=4096, n_layers=4, n_heads=32, vocab=32000,
                              hidden=BM.ffn_hidden(4096, 256), seq_len=512, micro_batch=4)),
    "small": dict(matmul=256, copy_bytes=2**24,
                  moe=dict(T_tokens=64, dim=64, hidden=128),
                  train=dict(dim=256, n_layers=2, seq=64, batch=2, vocab=512),
                  decode=dict(dim=256, n_layers=2, vocab=512, new_tokens=8),
                  compiled_runs=dict(size=["--dim", "64", "--n-layers", "2", "--n-heads", "4",
                                           "--multiple-of", "32"], seq_len=64, batch=2, steps=4),
                  lora=BM.Shape(dim=64, n_layers=2, n_heads=4, vocab=256,
                                hidden=BM.ffn_hidden(64, 32), seq_len=32, micro_batch=2)),
}


def run_section(name, fn) -> bool:
    """Run one section and print its wall time; a failure prints its traceback and the script goes
    on to the next section."""
    start = time.perf_counter()
    try:
        fn()
        return True
    except Exception:
        print(f"\n{name}: FAILED\n{traceback.format_exc()}")
        return False
    finally:
        print(f"   ({name}: {time.perf_counter() - start:.0f} s)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Tee:
    """Writes to the terminal and to the log file at once."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)

    def flush(self):
        for stream in self.streams:
            stream.flush()


def default_log(device_name: str) -> str:
    """bench/results/gpu_check_<the GPU's name>_<today>.log: a log to commit next to the others."""
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    return os.path.join(ROOT, "bench", "results", f"gpu_check_{slug}_{datetime.date.today()}.log")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes (a smoke run of the script)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--compile", action="store_true",
                   help="section 2: also time the training step with compiled blocks")
    p.add_argument("--sections", default="1,2,3,4,5",
                   help="which sections to run, e.g. 3 to rerun decoding; 6 = pipeline.py --quick")
    p.add_argument("--no-pipeline", action="store_true",
                   help="leave out section 6 even if --sections names it (it is off by default)")
    p.add_argument("--log", default=None, help="also write the output here (default on a GPU: "
                   "bench/results/gpu_check_GPU_DATE.log; none on a CPU)")
    args = p.parse_args(argv)
    numbers = args.sections.split(",")
    if not all(n in ("1", "2", "3", "4", "5", "6") for n in numbers):
        p.error(f"--sections {args.sections}: expected numbers 1-6, e.g. 3 or 1,2,3")
    args.wanted = sorted({int(n) for n in numbers} - ({6} if args.no_pipeline else set()))
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: error: --device cuda but torch sees no GPU "
                         "(use --device cpu --small)")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    log_path = args.log or (default_log(name) if device.type == "cuda" else None)
    log = open(log_path, "w") if log_path else None
    if log:
        sys.stdout = Tee(sys.__stdout__, log)
    start = time.perf_counter()
    command = " ".join(sys.argv[1:] if argv is None else argv)
    now = datetime.datetime.now()
    print(f"gpu_check on {name}, torch {torch.__version__}, {now:%Y-%m-%d %H:%M}: "
          f"python bench/gpu_check.py {command}")
    shapes = SHAPES["small" if args.small else "gpu"]
    peak = matmul_peak(device, torch.bfloat16, shapes["matmul"])
    print(f"measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    sections = {
        1: ("1. MoE layer", lambda: moe_layer_check(device, **shapes["moe"], repeats=args.repeats,
                                                    peak=peak)),
        2: ("2. training step", lambda: train_step_check(
            device, **shapes["train"], repeats=args.repeats, peak=peak,
            compile_blocks=args.compile)),
        3: ("3. decoding", lambda: decode_check(
            device, **shapes["decode"], bandwidth=copy_bandwidth(device, shapes["copy_bytes"]))),
        4: ("4. --compile runs",
            lambda: compiled_training_check(device, **shapes["compiled_runs"])),
        5: ("5. LoRA memory", lambda: lora_memory_check(device, shapes["lora"])),
        6: ("6. pipeline --quick", lambda: pipeline_check(device)),
    }
    ok = all([run_section(*sections[number]) for number in args.wanted])
    print(f"\ntotal {time.perf_counter() - start:.0f} s; " + ("every section passed" if ok else
                                                             "some section FAILED"))
    if log:
        sys.stdout = sys.__stdout__
        log.close()
        print(f"wrote {os.path.relpath(log_path)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
