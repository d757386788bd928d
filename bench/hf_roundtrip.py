"""Does an exported checkpoint survive transformers? AutoTokenizer's ids, greedy generate() vs ours.

    python bench/hf_roundtrip.py RUN/helpful RUN/h3fusion --eval RUN/data/eval.jsonl
    python bench/hf_roundtrip.py RUN/helpful --eval RUN/data/eval.jsonl --generate 40 \
        --max-new-tokens 48

Each checkpoint (Meta's layout, as pipeline.py writes them) is exported as
`python -m engineering.export_hf CKPT OUT` does, into a temporary directory; then, on the world's
eval prompts (data.format.format_prompt(instruction, input)):
  ids      AutoTokenizer.from_pretrained(OUT)(prompt)["input_ids"] vs our
           Tokenizer.encode(prompt, bos=True, eos=False), on every prompt
  greedy   AutoModelForCausalLM.generate(do_sample=False) vs model.generate_tokens (temperature 0),
           on --generate prompts spread evenly over the file; and how many answers the world's
           scorer (data.toy_scoring.did_right_thing) calls right, each way
  before   the ids AutoTokenizer gives from tokenizer.model alone, without the tokenizer files
           the export writes beside it
Needs transformers (pip install transformers tokenizers); without it, it says so and exits. Nothing
is asserted here: tests/test_hf_tokenizer.py asserts the same on tiny models.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import model as M  # noqa: E402
from engineering import checkpoints as C  # noqa: E402
from engineering import export_hf  # noqa: E402
from data.format import format_prompt  # noqa: E402
from data.tokenizer import Tokenizer  # noqa: E402
from data.toy_scoring import did_right_thing  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def count_equal_ids(transformers, hf_dir, ours, prompts) -> str:
    """"k/n" prompts AutoTokenizer encodes as we do, or why it could not load."""
    try:
        theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # (any failure of transformers is the finding here)
        return f"AutoTokenizer fails: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
    equal = sum(theirs(p)["input_ids"] == ours.encode(p, bos=True, eos=False) for p in prompts)
    return f"{equal}/{len(prompts)} ids equal"


def hf_greedy(transformers, hf_dir, prompts, max_new_tokens, eos_id) -> tuple:
    """transformers' greedy new tokens for each prompt, cut before </s> (as generate_tokens does),
    and their text as AutoTokenizer decodes it."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out, texts = [], []
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=eos_id)
        new = tokens[0, inputs["input_ids"].shape[1]:].tolist()
        out.append(new[: new.index(eos_id)] if eos_id in new else new)
        texts.append(tokenizer.decode(out[-1], skip_special_tokens=True))
    return out, texts


def roundtrip(transformers, ckpt, records, n_generate, max_new_tokens, tmp):
    """Print the three comparisons for one checkpoint."""
    hf_dir, before_dir = os.path.join(tmp, "hf"), os.path.join(tmp, "before")
    export_hf.main([ckpt, hf_dir])
    model, _ = C.load_checkpoint(ckpt)
    shutil.copytree(hf_dir, before_dir, ignore=shutil.ignore_patterns(*TOKENIZER_FILES))
    ours = Tokenizer(os.path.join(ckpt, "tokenizer.model"))
    prompts = [format_prompt(r["instruction"], r["input"]) for r in records]
    print(f"{ckpt}:")
    print(f"  ids     {count_equal_ids(transformers, hf_dir, ours, prompts)}")
    print(f"  before  {count_equal_ids(transformers, before_dir, ours, prompts)} "
          f"(tokenizer.model alone)")
    step = max(1, len(records) // n_generate)
    chosen = list(range(0, len(records), step))[:n_generate]
    ids = [ours.encode(prompts[i], bos=True, eos=False) for i in chosen]
    expected = M.generate_tokens(model.eval(), ids, max_new_tokens, eos_id=ours.eos_id)
    got, texts = hf_greedy(transformers, hf_dir, [prompts[i] for i in chosen], max_new_tokens,
                           ours.eos_id)
    same = sum(a == b for a, b in zip(expected, got))
    right_ours = sum(did_right_thing(records[i], ours.decode(t)) for i, t in zip(chosen, expected))
    right_hf = sum(did_right_thing(records[i], text) for i, text in zip(chosen, texts))
    print(f"  greedy  {same}/{len(chosen)} answers token for token equal ({max_new_tokens} new "
          f"tokens at most); right by the world's scorer: ours {right_ours}/{len(chosen)}, "
          f"transformers {right_hf}/{len(chosen)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="Meta-layout checkpoint directories")
    parser.add_argument("--eval", required=True, help="the world's RUN/data/eval.jsonl")
    parser.add_argument("--generate", type=int, default=40, help="prompts to generate from")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    try:
        import transformers
    except ImportError:
        return print("transformers is not installed (pip install transformers tokenizers): "
                     "nothing to compare")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    with open(args.eval, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for ckpt in args.checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            roundtrip(transformers, ckpt, records, args.generate, args.max_new_tokens, tmp)


if __name__ == "__main__":
    main()
