"""The command-line conventions every script of this project shares.

  run_cli           every main() runs through it: an expected failure (bad path, file or value) is one line
                    `SCRIPT: error: ...` and exit code 2; the process group ends before the interpreter does
  parse_dtype       --dtype float32 | bfloat16 | float16
  add_data_args     --data-path, --task: local copies of the real datasets, and files of records
  add_train_args    the training flags of train_expert.py and fuse.py; check_train_args refuses bad values
                    before any compute (trainer.config_from_args turns them into a TrainConfig)
  check_held_out    --eval-every needs a held-out split
"""
import os
import sys

import torch

from data import TASK_NAMES
from distributed import end_process_group


def run_cli(main, script: str):
    """Every command line of this project runs its main() through this. An expected failure -- a bad path, file
    or value, a refused overwrite (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) -- prints
    one line `SCRIPT: error: ...` (only rank 0 under torchrun) and exits 2. Anything else is a bug and keeps its
    traceback; H3FUSION_TRACEBACK=1 shows the traceback of expected failures too. Under torchrun the process
    group ends here, after main() has returned and dropped its sharded model (distributed.end_process_group)."""
    try:
        main()
    except (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError) as e:
        if os.environ.get("H3FUSION_TRACEBACK"):
            raise
        if os.environ.get("RANK", "0") == "0":
            print(f"{script}: error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        end_process_group()


def parse_dtype(name: str):
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"--dtype {name}: expected one of {sorted(dtypes)}")
    return dtypes[name]


def add_data_args(parser):
    """--data-path and --task, for real datasets and local files (shared by train_expert.py and fuse.py)."""
    parser.add_argument("--data-path", default=None, help="a local copy of the --data dataset (file or directory: "
                        "e.g. alpaca_data.json, a BeaverTails download, TruthfulQA.csv); for --data real-pooled: "
                        "alpaca-small=PATH,beavertails=PATH,truthfulqa=PATH")
    parser.add_argument("--task", default=None, choices=TASK_NAMES,
                        help="with --data FILE: the dimension of every record that has no 'task' field")


def add_train_args(parser, steps, batch_size, lr, warmup, seq_len, weight_decay=0.1):
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=batch_size, help="examples per micro-step, all ranks together")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"AdamW decoupled weight decay on matrices (default {weight_decay})")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seq-len", type=int, default=seq_len, help="tokens per training sequence (max_len)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=0, help="held-out loss every N steps (0 = at the end)")
    g.add_argument("--save-every", type=int, default=0, help="resumable state every N steps (0 = at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak matmul TFLOP/s of one device, the denominator of MFU (default: measured at start-up "
                        "in the dtype the matmuls run in: bf16 on CUDA, float32 on CPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer block (one process or under torchrun; on an H100 the dense "
                        "training step went from 38 %% to 61 %% MFU: bench/gpu_check.py --compile); the first steps "
                        "compile")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT.train/state")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in OUT")


def check_train_args(args):
    """Refuse a bad training flag by name, before torchrun's process group starts and before any compute."""
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: expected > 0")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay {args.weight_decay}: expected >= 0")
    if not 0 <= args.peak_tflops < float("inf"):
        raise ValueError(f"--peak-tflops {args.peak_tflops}: expected a positive number (0 = measure it)")
    for name in ("warmup", "eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 0")
    if not args.grad_clip > 0:  # 0 would zero every gradient, a negative value flip it (gradient ascent)
        raise ValueError(f"--grad-clip {args.grad_clip}: expected > 0 (the largest gradient norm; inf = no clipping)")
    if args.resume and args.overwrite:
        raise ValueError("--resume with --overwrite: --resume continues the run in --out, --overwrite replaces it; "
                         "pass one of them")


def check_held_out(eval_every: int, val_batches, data: str):
    """--eval-every needs held-out batches; only the synthetic world (its sets, pooled, the corpus) has a val split."""
    if eval_every and val_batches is None:
        raise ValueError(f"--eval-every {eval_every}: --data {data} has no held-out split (only the synthetic world's "
                         f"sets have one), so there is nothing to evaluate; leave --eval-every out")
