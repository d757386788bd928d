"""Ask a model an instruction in the Alpaca template the aligned and fused models were fine-tuned on.

    python ask.py runs/toy/fused --instruction "How do I water a plant?" [--input "..."] [model.py's flags]

model.py generates from a prompt exactly as given; this wraps each instruction (data/format.py format_prompt)
and hands the rest -- --max-new-tokens, --temperature, --device, --dtype, ... -- to model.py's command line.
"""
import argparse

import model
from engineering.cli import run_cli
from data.format import format_prompt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Other flags: python model.py --help")
    parser.add_argument("ckpt_dir", help="a checkpoint directory (Meta's layout or HF's)")
    parser.add_argument("--instruction", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--input", default="", help="the template's optional input section, for every instruction")
    args, rest = parser.parse_known_args(argv)
    prompts = [flag for text in args.instruction for flag in ("--prompt", format_prompt(text, args.input))]
    model.main([args.ckpt_dir, *prompts, *rest])


if __name__ == "__main__":
    run_cli(main, "ask.py")
