"""Stages 0 and 1 of H3Fusion: pretrain the synthetic world's base model, or align a copy of a base
model on one dimension by fine-tuning its FFNs only.

    python train_expert.py --init scratch --data corpus --out runs/toy/base      # stage 0: toy base
    python train_expert.py --init runs/toy/base --data helpful                   # stage 1: FFN only
    python train_expert.py --init runs/toy/base --data pooled --out runs/toy/sft  # multi-task SFT
    python train_expert.py --init runs/toy/base --data honest --lora-rank 8 --lora-alpha 4  # LoRA
    torchrun --nproc_per_node=2 train_expert.py --init runs/toy/base --data harmless  # 2 ranks

--out defaults to runs/toy/<dataset>; --lora-rank is the authors' setting.

The paper (Sec. 3) aligns three copies of LLaMA-2 on helpful / harmless / honest data, training only
the FFN (SwiGLU) weights with attention frozen, so that the three aligned models differ from the
base in their FFNs alone -- the property fuse.py relies on to turn those FFNs into experts. The loss
is L_CE (losses.lm_loss) on response tokens. The training loop itself is trainer.train; at the end
it says where the model went, in which format, and the next command (evaluation/summary.py).
"""
import argparse
import os

import torch

import model as M
from engineering import checkpoints as C
from data.tokenizer import Tokenizer
from engineering.cli import (add_data_args, config_from_args, add_lora_args, add_train_args,
                             check_corpus_flags, check_data_given, check_held_out, check_init,
                             check_lora, check_model_size, check_model_size_flags, run_cli)
from data import streams as S
from data.toy import load_corpus_documents
from engineering.distributed import Dist, setup_distributed, shard_model
from engineering.lora import add_lora, init_lora
from losses import lm_loss
from engineering.rundir import Run, check_run_dir, start_run_dir
from evaluation.summary import print_summary, stage_summary
from trainer import StepCounts, compute_dtype, seed_everything, train

DEFAULT_DATA_DIR = "runs/toy/data"
# the model's size with --init scratch (a checkpoint has its own)
MODEL_SIZE = {"dim": 128, "n_layers": 4, "n_heads": 4, "n_kv_heads": None, "multiple_of": 32}

# --------------------------------------------------------------------------------------------------
# 1. The method: stage 1 trains the FFNs alone, on L_CE


def freeze_all_but_ffn(model):
    """Stage 1 of the paper: only layers.N.feed_forward.* learns; attention, norms, embeddings and
    output stay frozen."""
    for name, p in model.named_parameters():
        p.requires_grad = ".feed_forward." in name


def lm_objective(model, batch, counts: StepCounts):
    """L_CE on this rank's part of the micro-batch: summed over its target tokens /
    counts.targets_per_rank (the step's target tokens over all ranks / world size:
    trainer.StepCounts), so the trainer's accumulated gradient is that of the step's mean."""
    logits = model(batch["tokens"])  # [B, T, V]
    loss = lm_loss(logits, batch["targets"], normalizer=counts.targets_per_rank)
    return loss, {"lm": loss.detach()}


# --------------------------------------------------------------------------------------------------
# 2. The run: model, data, the loop


def load_model(args, d: Dist):
    """A new model (its vocabulary from the world's tokenizer) or a checkpoint, in float32
    (LoRA: bf16 on CUDA)."""
    if args.init == "scratch":
        tokenizer_path = os.path.join(args.data_dir, "tokenizer.model")
        tokenizer = Tokenizer(tokenizer_path)
        margs = M.ModelArgs(dim=args.dim, n_layers=args.n_layers, n_heads=args.n_heads,
                            n_kv_heads=args.n_kv_heads, vocab_size=tokenizer.n_words,
                            multiple_of=args.multiple_of, max_seq_len=args.seq_len * 4)
        torch.manual_seed(args.seed)
        return M.Transformer(margs), tokenizer, tokenizer_path
    tokenizer_path = os.path.join(args.init, "tokenizer.model")
    model, _ = C.load_checkpoint(args.init,
                                 dtype=compute_dtype(d.device) if args.lora_rank else torch.float32)
    return model, Tokenizer(tokenizer_path), tokenizer_path


def load_streams(args, tokenizer, d: Dist):
    """(training stream, held-out batches) for pretraining text or instruction data."""
    if args.data == "corpus":
        docs = load_corpus_documents(args.data_dir)
        # the last 2 % of the documents are held out
        train_docs, val_chunks = S.split_corpus([tokenizer.encode(doc, bos=True, eos=True)
                                                 for doc in docs], args.seq_len)
        val = S.val_batches_of(val_chunks, S.collate_packed, args.batch_size, d)
        return S.PackedCorpusStream(train_docs, args.seq_len, args.seed), val
    _, stream, val = S.instruction_data(args.data, args.data_dir, tokenizer, args.seq_len,
                                        args.batch_size, args.seed, d, path=args.data_path,
                                        task=args.task)
    return stream, val


def main(argv=None):
    args = parse_args(argv)
    cfg = config_from_args(args)  # every flag checked before torchrun's process group starts
    d = setup_distributed(args.device)
    train_dir = check_run_dir(args.out, vars(args), args.resume, args.overwrite, d)
    seed_everything(args.seed)
    model, tokenizer, tokenizer_path = load_model(args, d)
    stream, val = load_streams(args, tokenizer, d)
    check_held_out(args.eval_every, val, args.data)
    start_run_dir(train_dir, vars(args), args.resume, args.overwrite, d)  # inputs good: now write
    if args.trainable == "ffn":
        freeze_all_but_ffn(model)
    # the authors' stage 1: a rank-r delta on each FFN matrix trains, not the matrix
    # (engineering/lora.py)
    if args.lora_rank:
        init_lora(add_lora(model, args.lora_rank, args.lora_alpha), args.seed)
    model = shard_model(model.to(d.device), d, torch.bfloat16 if d.device.type == "cuda" else None)
    if d.is_main:
        n = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        lora = f", LoRA r={args.lora_rank} alpha={args.lora_alpha:g}" if args.lora_rank else ""
        print(f"{args.out}: {n / 1e6:.2f} M parameters, {n_train / 1e6:.2f} M trainable "
              f"({args.trainable}{lora}), data={args.data}, world_size={d.world_size}, "
              f"device={d.device}")
    run = Run(d, args.out, train_dir, tokenizer_path, cfg.steps, cfg.log_every, resume=args.resume)
    train(model, stream, lm_objective, cfg, run, val_batches=val, seq_len=args.seq_len)
    print_summary(stage_summary(args, d), d)  # where the model went, in which format, what next


# --------------------------------------------------------------------------------------------------
# 3. The command line (its checks are engineering/cli.py's)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--init", default="scratch",
                   help="'scratch' (pretrain a new model) or a checkpoint dir to fine-tune")
    p.add_argument("--data", default=None,
                   help="corpus (pretraining text) | helpful | harmless | honest | pooled "
                        "(synthetic world) | a real dataset name (alpaca-small, beavertails, "
                        "truthfulqa) | a local file")
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                   help="synthetic world directory (python -m data.toy)")
    p.add_argument("--out", default=None,
                   help="output checkpoint dir (default runs/toy/<base|data>)")
    add_data_args(p)
    p.add_argument("--trainable", default=None, choices=["ffn", "all"],
                   help="ffn = FFN weights only, the rest frozen (default when fine-tuning); all "
                        "(default from scratch)")
    m = p.add_argument_group("model size (with --init scratch; a checkpoint has its own)")
    # SUPPRESS: absent unless given, so that a given one can be refused
    for name, default in MODEL_SIZE.items():
        m.add_argument(f"--{name.replace('_', '-')}", type=int, default=argparse.SUPPRESS,
                       help="default: the same as --n-heads" if default is None
                            else f"default {default}")
    add_lora_args(p, "each FFN matrix")
    add_train_args(p, steps=300, batch_size=16, lr=1e-3, warmup=20, seq_len=128)
    args = p.parse_args(argv)
    scratch = args.init == "scratch"
    args.data = args.data or ("corpus" if scratch else None)
    check_data_given(p, args)
    check_model_size_flags(p, args, MODEL_SIZE)
    for name, default in MODEL_SIZE.items():
        setattr(args, name, getattr(args, name, default))
    if scratch:
        check_model_size(p, args)
    check_corpus_flags(p, args)
    args.trainable = args.trainable or ("all" if scratch else "ffn")
    check_lora(p, args,
               full_training="--init scratch (pretraining trains every weight)" if scratch else
                             "--trainable all" if args.trainable == "all" else None)
    args.out = args.out or os.path.join(os.path.dirname(DEFAULT_DATA_DIR), "base" if scratch else
                                        os.path.splitext(os.path.basename(args.data))[0])
    check_init(p, args)
    return args


if __name__ == "__main__":
    run_cli(main, "train_expert.py")
