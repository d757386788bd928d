"""Write a checkpoint as a Hugging Face directory: LlamaForCausalLM, MixtralForCausalLM when fused.

    python -m engineering.export_hf runs/toy/h3fusion runs/toy/h3fusion-hf

The checkpoint is read through checkpoints.load_checkpoint (every file checked) and written by
hf_checkpoint.write_hf_checkpoint (safetensors in the checkpoint's dtype, one directory written as a
whole).
"""
import argparse
import os

from engineering.checkpoints import load_checkpoint, params_json
from engineering.cli import run_cli
from engineering.hf_checkpoint import write_hf_checkpoint


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m engineering.export_hf", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt_dir", help="a checkpoint directory (Meta's layout, or Hugging Face's)")
    p.add_argument("out_dir", help="the Hugging Face directory to write")
    args = p.parse_args(argv)
    tokenizer_path = os.path.join(args.ckpt_dir, "tokenizer.model")
    if os.path.isdir(args.ckpt_dir) and not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"{tokenizer_path}: not found; an exported model needs its "
                                f"tokenizer (copy the one it was trained with beside its weights)")
    model, model_args = load_checkpoint(args.ckpt_dir)
    out = write_hf_checkpoint(args.out_dir, params_json(model_args), model.state_dict(),
                              tokenizer_path)
    print("wrote", out)


if __name__ == "__main__":
    run_cli(main, "python -m engineering.export_hf")
