"""The command-line conventions every script of this project shares.

  run_cli           every main() runs through it: an expected failure (bad path, file or value) is
                    one line `SCRIPT: error: ...` and exit code 2; the process group ends before the
                    interpreter does
  parse_dtype       --dtype float32 | bfloat16 | float16
  add_data_args     --data-path, --task: local copies of the real datasets, and files of records
  add_train_args    the training flags of train_expert.py and fuse.py; check_train_args refuses bad
                    values before any compute; config_from_args makes them a trainer.TrainConfig
  add_lora_args     --lora-rank, --lora-alpha of both scripts; check_lora
  check_held_out    --eval-every needs a held-out split
  parse_list        '0.1,0.3,0.1' -> [0.1, 0.3, 0.1]
  fuse.py's flags   check_gamma, check_top_k, check_frozen_experts_gamma, check_loss_weights,
                    check_reg, check_balance_coef (one check per input, parser.error before any
                    compute), and check_fuse_checkpoints (the checkpoints are there and share the
                    base's tokenizer)
  train_expert.py   check_data_given, check_model_size_flags, check_corpus_flags, check_init
The method's functions check their own inputs where they are defined (losses.py: logits, router
probabilities, task labels; trainer.py: the loop's guards); check_drift_inputs, at the end of this
file, checks once what losses.drift_loss trusts (gamma, W^0) when fuse.py has built the model.
"""
import os
import sys

import torch

from data import TASK_NAMES
from engineering.lora import expert_loras
from moe import expert_parameters, moe_layers
from trainer import TrainConfig
from engineering.distributed import end_process_group
from engineering.hf_checkpoint import config_path


def run_cli(main, script: str):
    """Every command line of this project runs its main() through this. An expected failure -- a bad
    path, file or value, a refused overwrite (FileNotFoundError, FileExistsError,
    NotADirectoryError, ValueError) -- prints one line `SCRIPT: error: ...` (only rank 0 under
    torchrun) and exits 2. Anything else is a bug and keeps its traceback; H3FUSION_TRACEBACK=1
    shows the traceback of expected failures too. Under torchrun the process group ends here
    (engineering/distributed.py end_process_group), after main() has returned and dropped its
    sharded model."""
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
    """--data-path and --task, for real datasets and local files (shared by train_expert.py and
    fuse.py)."""
    parser.add_argument("--data-path", default=None,
                        help="a local copy of the --data dataset (file or directory: e.g. "
                             "alpaca_data.json, a BeaverTails download, TruthfulQA.csv); "
                             "for --data real-pooled: "
                             "alpaca-small=PATH,beavertails=PATH,truthfulqa=PATH")
    parser.add_argument("--task", default=None, choices=TASK_NAMES,
                        help="with --data FILE: the dimension of every record "
                             "that has no 'task' field")


def add_train_args(parser, steps, batch_size, lr, warmup, seq_len, weight_decay=0.1):
    g = parser.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="examples per micro-step, all ranks together")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimiser step")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warmup steps")
    g.add_argument("--weight-decay", type=float, default=weight_decay,
                   help=f"AdamW decoupled weight decay on matrices (default {weight_decay})")
    g.add_argument("--grad-clip", type=float, default=1.0)
    g.add_argument("--seq-len", type=int, default=seq_len,
                   help="tokens per training sequence (max_len)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--eval-every", type=int, default=0,
                   help="held-out loss every N steps (0 = at the end)")
    g.add_argument("--save-every", type=int, default=0,
                   help="resumable state every N steps (0 = at the end)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--peak-tflops", type=float, default=0.0,
                   help="peak matmul TFLOP/s of one device, the denominator of MFU (default: "
                        "measured at start-up in the dtype the matmuls run in: bf16 on CUDA, "
                        "float32 on CPU)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer block (one process or under torchrun; on "
                        "an H100 the dense training step went from 38 %% to 61 %% MFU: "
                        "bench/gpu_check.py --compile); the first steps compile")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--resume", action="store_true", help="continue the run in OUT.train/state")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in OUT")


def add_lora_args(parser, where: str):
    """--lora-rank, --lora-alpha (engineering/lora.py): train LoRA deltas instead of the weights
    themselves (train_expert.py and fuse.py); saved checkpoints hold the merged weights."""
    g = parser.add_argument_group("LoRA (the authors' setting; engineering/lora.py)")
    g.add_argument("--lora-rank", type=int, default=0,
                   help=f"r > 0: train a rank-r delta (alpha/r) B A on {where} instead of the "
                        f"matrices themselves; 0 (the default) trains the matrices")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="alpha of the delta's scale alpha/r (default: r, a scale of 1; the "
                        "authors' stage 1: --lora-rank 8 --lora-alpha 4)")


def check_lora(parser, args, full_training: str = None):
    """--lora-rank >= 0, --lora-alpha > 0 and only with a rank; full_training names a flag choice
    that LoRA cannot go with (train_expert.py: training every weight; fuse.py: frozen experts)."""
    if args.lora_rank < 0:
        parser.error(f"--lora-rank {args.lora_rank}: expected a rank >= 1 (or 0: no LoRA)")
    if args.lora_alpha is not None and not args.lora_rank:
        parser.error(f"--lora-alpha {args.lora_alpha} without --lora-rank: alpha scales a LoRA "
                     f"delta; give its rank")
    if args.lora_alpha is not None and not 0 < args.lora_alpha < float("inf"):
        parser.error(f"--lora-alpha {args.lora_alpha}: expected a finite number > 0")
    if args.lora_rank and full_training:
        parser.error(f"--lora-rank {args.lora_rank} with {full_training}: LoRA trains deltas on "
                     f"the FFN (expert) matrices only; leave one of them out")
    args.lora_alpha = args.lora_alpha or float(args.lora_rank)


def check_train_args(args):
    """Refuse a bad training flag by name, before torchrun's process group starts and before any
    compute."""
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 1")
    if not args.lr > 0:
        raise ValueError(f"--lr {args.lr}: expected > 0")
    if not args.weight_decay >= 0:
        raise ValueError(f"--weight-decay {args.weight_decay}: expected >= 0")
    if not 0 <= args.peak_tflops < float("inf"):
        raise ValueError(f"--peak-tflops {args.peak_tflops}: "
                         f"expected a positive number (0 = measure it)")
    for name in ("warmup", "eval_every", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected >= 0")
    if not args.grad_clip > 0:  # 0 would zero every gradient, a negative value flip it (ascent)
        raise ValueError(f"--grad-clip {args.grad_clip}: "
                         f"expected > 0 (the largest gradient norm; inf = no clipping)")
    if args.resume and args.overwrite:
        raise ValueError("--resume with --overwrite: --resume continues the run in --out, "
                         "--overwrite replaces it; pass one of them")


def config_from_args(args) -> TrainConfig:
    """The TrainConfig of add_train_args' flags, each checked first (check_train_args)."""
    check_train_args(args)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       lr=args.lr, warmup=min(args.warmup, args.steps),
                       weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                       log_every=args.log_every, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed,
                       peak_flops=args.peak_tflops * 1e12, compile=args.compile)


def check_held_out(eval_every: int, val_batches, data: str):
    """--eval-every needs held-out batches; only the synthetic world (its sets, pooled, the corpus)
    has a val split."""
    if eval_every and val_batches is None:
        raise ValueError(f"--eval-every {eval_every}: --data {data} has no held-out split "
                         f"(only the synthetic world's sets have one), so there is nothing to "
                         f"evaluate; leave --eval-every out")


def parse_list(text: str, name: str, cast=float) -> list:
    """'0.1,0.3,0.1' -> [0.1, 0.3, 0.1]; a bad item is an error that names --NAME."""
    try:
        return [cast(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} {text!r}: "
                         f"expected comma-separated numbers, e.g. 0.1,0.3,0.1") from None


# --------------------------------------------------------------------------------------------------
# fuse.py's flags: one check per input, each refused with parser.error (exit 2) before any compute


def check_gamma(parser, args, n_experts: int):
    """--gamma: one finite gamma_i >= 0 per expert (the only place gamma is checked on fuse.py's
    path)."""
    if len(args.gamma_values) != n_experts:
        parser.error(f"--gamma {args.gamma}: {len(args.gamma_values)} values for {n_experts} "
                     f"experts; give one per expert")
    if not all(0 <= g < float("inf") for g in args.gamma_values):  # also refuses nan
        parser.error(f"--gamma {args.gamma}: values must be finite numbers >= 0")


def check_top_k(parser, args, n_experts: int):
    if not 1 <= args.top_k <= n_experts:
        parser.error(f"--top-k {args.top_k}: "
                     f"expected 1 <= k <= {n_experts} (the number of experts)")


def check_frozen_experts_gamma(parser, args, n_experts: int):
    """--trainable router (an extra) with some gamma_i > 0: L_R would be a constant."""
    if args.trainable == "router" and any(args.gamma_values):
        parser.error(f"--gamma {args.gamma} with --trainable router: L_R measures the experts' "
                     f"drift, and frozen experts never drift (L_R would be a constant); "
                     f"pass --gamma {','.join(['0'] * n_experts)} or train the experts")


def check_loss_weights(parser, args):
    """--lambda-gate, --balance-coef, --z-coef: finite numbers >= 0 (nan refused too)."""
    for name in ("lambda_gate", "balance_coef", "z_coef"):
        if not 0 <= getattr(args, name) < float("inf"):
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: "
                         f"expected a finite number >= 0")


def check_reg(parser, args):
    """--reg decay (an extra) needs some gamma_i > 0 to do anything."""
    if args.reg == "decay" and not any(args.gamma_values):
        parser.error(f"--reg decay with --gamma {args.gamma}: every gamma_i is 0, so L_R is off "
                     f"and --reg changes nothing; "
                     f"give some expert a gamma_i > 0 or leave --reg out")


def check_balance_coef(parser, args, n_experts: int):
    """--balance-coef (an extra) with top-k = E: the load-balancing loss is the constant 1."""
    if args.balance_coef and args.top_k == n_experts:
        parser.error(f"--balance-coef {args.balance_coef} with --top-k {n_experts}: every token "
                     f"uses all {n_experts} experts, so the load-balancing loss is the constant 1 "
                     f"and changes nothing; lower --top-k or leave --balance-coef out")


def check_fuse_checkpoints(args, run_dir: str):
    """fuse.py's checkpoints, before any compute (recovered first, by engineering/checkpoints.py
    recover_checkpoint): every one is there (or say exactly how to make it), and every expert shares
    the base's tokenizer (an expert trained from another base is not an H3Fusion expert;
    --allow-foreign-experts, an extra, fuses it anyway)."""
    missing = [d for d in [args.base] + args.expert_dirs
               if not os.path.exists(config_path(d))]  # Meta's or HF's config
    if not missing:
        with open(os.path.join(args.base, "tokenizer.model"), "rb") as f:
            base_tokenizer = f.read()
        for d in args.expert_dirs:
            with open(os.path.join(d, "tokenizer.model"), "rb") as f:
                if f.read() != base_tokenizer and not args.allow_foreign_experts:
                    raise ValueError(f"--experts {d}: its tokenizer.model differs from the base's "
                                     f"({args.base}); an H3Fusion expert is an FFN-only fine-tune "
                                     f"of the base "
                                     f"(pass --allow-foreign-experts to fuse it anyway)")
        return
    lines = [f"fuse.py: missing checkpoint(s): {', '.join(missing)}"]
    if all(os.path.dirname(os.path.normpath(d)) == run_dir for d in missing):
        lines.append("Build the synthetic world's base and aligned models with:\n"
                     "    python pipeline.py --until aligned")
        lines.append("or stage by stage:\n"
                     f"    python -m data.toy --out {args.data_dir}\n"
                     f"    python train_expert.py --init scratch --data corpus --out {args.base}")
        for d, task in zip(args.expert_dirs, TASK_NAMES):
            lines.append(f"    python train_expert.py --init {args.base} --data {task} --out {d}")
    if os.environ.get("RANK", "0") == "0":  # under torchrun: say it once
        print("\n".join(lines), file=sys.stderr)
    raise SystemExit(2)


# --------------------------------------------------------------------------------------------------
# train_expert.py's flags


def check_data_given(parser, args):
    if args.data is None:
        parser.error("--data is required when fine-tuning "
                     "(helpful | harmless | honest | pooled | a dataset | a file)")


def check_model_size_flags(parser, args, names):
    """The model-size flags (argparse.SUPPRESS: absent unless given) set the size of a new model
    only."""
    given = [f"--{name.replace('_', '-')}" for name in names if hasattr(args, name)]
    if given and args.init != "scratch":
        parser.error(f"{' '.join(given)} with --init {args.init}: the model size comes from the "
                     f"checkpoint; these set the size of a new model (--init scratch)")


def check_model_size(parser, args):
    """The size of a new model: positive, whole heads (dim = n_heads x head_dim), an even head_dim
    (RoPE rotates pairs of coordinates), and query heads in whole groups per key/value head."""
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} {value}: expected >= 1")
    if args.dim % args.n_heads or (args.dim // args.n_heads) % 2:
        parser.error(f"--dim {args.dim} with --n-heads {args.n_heads}: "
                     f"expected dim = n_heads x an even head size (RoPE rotates pairs), "
                     f"e.g. --dim {args.n_heads * 2 * max(1, round(args.dim / args.n_heads / 2))}")
    if args.n_kv_heads is not None and args.n_heads % args.n_kv_heads:
        parser.error(f"--n-kv-heads {args.n_kv_heads}: expected a divisor of --n-heads "
                     f"{args.n_heads} (each key/value head serves a whole group of query heads)")


def check_corpus_flags(parser, args):
    """--data-path and --task are for instruction data, not the pretraining corpus."""
    for flag, value in (("--data-path", args.data_path), ("--task", args.task)):
        if value and args.data == "corpus":
            parser.error(f"{flag} {value}: for instruction data; --data corpus is the synthetic "
                         f"world's pretraining text in --data-dir")


def check_init(parser, args):
    if args.init != "scratch" and not os.path.isdir(args.init):
        parser.error(f"--init {args.init}: not 'scratch' and not a checkpoint directory")


def check_drift_inputs(model, initial_expert_weights, gamma, kind="drift"):
    """Everything losses.drift_loss trusts, checked once when fuse.py has built the model and
    snapshotted W^0 (the flag itself was check_gamma's): kind, gamma (one finite value >= 0 per
    expert) and, for kind="drift", a W^0 (moe.snapshot_expert_weights) of the parameter's shape for
    every stacked expert matrix (a matrix with a LoRA delta is its own W^0: frozen,
    engineering/lora.py lora_drift_loss)."""
    if kind not in ("drift", "decay"):
        raise ValueError(f"drift_loss: kind={kind!r}; expected 'drift' or 'decay'")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("drift_loss: the model has no MoE layer")
    gamma = [float(g) for g in gamma]
    if len(gamma) != layers[0].n_experts:
        raise ValueError(f"drift_loss: gamma has {len(gamma)} values {gamma}, "
                         f"expected one per expert ({layers[0].n_experts})")
    if any(g < 0 or g != g for g in gamma):
        raise ValueError(f"drift_loss: gamma {gamma} must be non-negative")
    loras = expert_loras(model)
    for key, w in expert_parameters(model).items() if kind == "drift" else ():
        if key in loras:
            continue
        if key not in initial_expert_weights:
            raise KeyError(f"drift_loss: no initial weight for {key}; take "
                           f"moe.snapshot_expert_weights(model) of this model right after "
                           f"building it")
        if tuple(initial_expert_weights[key].shape) != tuple(w.shape):
            raise ValueError(f"drift_loss: {key} is {tuple(w.shape)} but its initial weight is "
                             f"{tuple(initial_expert_weights[key].shape)}")
