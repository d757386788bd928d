"""Generate text from a checkpoint (dense or fused; Meta's layout or Hugging Face's).

    python generate.py runs/toy/h3fusion --instruction "Where does Thuhan live?"
    python generate.py runs/toy/base --prompt "Thuhan lives in" --prompt "Once upon a time"

--instruction wraps each instruction in the Alpaca template the aligned and fused models were
fine-tuned on (data/format.py format_prompt); --prompt is given to the model as it is. Decoding is
model.generate_tokens: a batch of ragged prompts, the KV cache, greedy unless --temperature > 0.
On CUDA its one-token step runs compiled on a static cache (engineering/compiled_decode.py; the time
it takes to compile is printed apart from the tokens/s); --no-compile-decode decodes eagerly, and
--compile-decode compiles on a CPU too.
The checkpoint is read through engineering/checkpoints.py (every file checked first). To write a
checkpoint as a Hugging Face directory instead: python -m engineering.export_hf CKPT OUT.
"""
import argparse
import time

import torch

from data.format import format_prompt
from data.tokenizer import Tokenizer
from engineering.checkpoints import load_checkpoint
from engineering.cli import parse_dtype, run_cli
from engineering.compiled_decode import (add_compile_decode_flag, compile_decode_wanted,
                                         compiled_or_eager)
from model import generate_tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help="params.json + consolidated.NN.pth + tokenizer.model "
                   "(or a Hugging Face directory: config.json, ...)")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", action="append", help="raw text; repeat for a batch")
    text.add_argument("--instruction", action="append",
                      help="an instruction, in the Alpaca template; repeat for a batch")
    p.add_argument("--input", default="", help="with --instruction: the template's input section")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", help="float32 (CPU default) | bfloat16 | float16")
    add_compile_decode_flag(p)
    args = p.parse_args(argv)
    dtype = parse_dtype(args.dtype)
    prompts = args.prompt or [format_prompt(text, args.input) for text in args.instruction]
    torch.manual_seed(args.seed)
    model, _ = load_checkpoint(args.ckpt_dir, device=args.device, dtype=dtype)
    model.eval()
    if compile_decode_wanted(args.compile_decode, args.device):
        model = compiled_or_eager(model)  # the same model, its one-token step compiled
    tokenizer = Tokenizer(f"{args.ckpt_dir}/tokenizer.model")
    start = time.perf_counter()
    prompt_tokens = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    new = generate_tokens(model, prompt_tokens, args.max_new_tokens, args.temperature,
                          args.top_p, tokenizer.eos_id)
    compiling = getattr(model, "compile_seconds", 0.0)
    seconds = time.perf_counter() - start - compiling
    for prompt, tokens in zip(prompts, new):
        print(f"{prompt}{tokenizer.decode(tokens)}\n" + "-" * 40)
    n_new = sum(len(t) for t in new)
    if compiling:
        print(f"compiled the decode step in {compiling:.1f} s (not counted below)")
    print(f"{n_new} tokens in {seconds:.2f} s = {n_new / seconds:.1f} tokens/s")


if __name__ == "__main__":
    run_cli(main, "generate.py")
