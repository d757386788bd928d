"""The whole H3Fusion pipeline on the synthetic world, one command:

    python pipeline.py                  # data -> base -> 3 aligned experts -> SFT baseline
                                        #   -> fusion -> evaluation table (about 10 min on 2 cores)
    python pipeline.py --ablations      # also the ablations of the loss: L_CE only,
                                        #   L_CE + lambda L_G (2 fusions)
    python pipeline.py --quick          # the same stages, tiny budgets (about half a minute on
                                        #   2 idle cores; the numbers mean little)
    python pipeline.py --nproc 2        # fusion under torchrun with FSDP2 over 2 processes
    python pipeline.py --jobs 1         # stages 1-2 one training at a time (default 2 side by side)
    python pipeline.py --sweep-gamma    # then fuse with gamma_harmless in {0, 0.1, 0.3, 1, 3}
                                        #   and compare
    python pipeline.py --sweep-gamma helpful  # the same sweep of gamma_helpful (RUN/sweep_helpful/)
    python pipeline.py --seeds 0,1,2    # stages 1-2 + evaluation per seed (world and base shared),
                                        #   then evaluation/seeds.py: mean ± std per cell, paired
                                        #   bootstrap intervals of H3Fusion's margin
    python pipeline.py --lora-rank 8    # stages 1-2 (experts, SFT, fusions) train LoRA deltas
                                        #   (engineering/lora.py), merged on save; world and base
                                        #   shared, models under RUN/lora_r8/
    python pipeline.py --run-dir runs/toy-d256 --dim 256  # another base size; stages 1-2 inherit it
    python pipeline.py --until aligned  # stop after a stage (data, base, aligned, sft, fused, eval)
    python pipeline.py --force fused    # redo a stage (and all after it) even if its outputs exist

Every stage is an ordinary command of this repository, printed before it runs, so you can copy any
of them:
    python -m data.toy      the synthetic world + tokenizer       -> RUN/data
    python train_expert.py  stage 0: pretrain base (all weights)  -> RUN/base
                            stage 1: FFN-only, one per dimension  -> RUN/helpful, harmless, honest
                            baseline: FFN-only on the pooled data -> RUN/sft
    python fuse.py          stage 2: L_CE + lambda L_G + L_R      -> RUN/h3fusion
                            (--nproc 2: under torchrun, FSDP2 over 2 processes)
                            (--ablations) L_CE; L_CE + lambda L_G -> RUN/h3fusion_ce, h3fusion_gate
    python evaluate.py      every model + soup, task arithmetic,
                            TIES, ensemble, oracle                -> RUN/eval/results.md
    python -m evaluation.seeds
                            (--seeds) one table over seeds,
                            with intervals                        -> RUN/seeds/seeds.md
Seeds other than --seed (the world's and the base's, default 0) write their models and evaluation
under RUN/seedN/. A stage whose output already exists is skipped (delete it, or pass --force STAGE,
to redo it).
"""
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from data import TASK_NAMES  # helpful, harmless, honest: the aligned models, in expert order

STAGES = ("data", "base", "aligned", "sft", "fused", "eval")

# Budgets, calibrated on 2 CPU cores (see README "Results"): full = the default run,
# quick = the CI smoke run.
BUDGETS = {
    "full": dict(base=["--steps", "1200", "--lr", "2e-3", "--warmup", "40", "--batch-size", "16"],
                 # --epochs: see expert_budget
                 expert=["--epochs", "3", "--lr", "1e-3", "--batch-size", "16"],
                 sft=["--steps", "600", "--lr", "1e-3", "--batch-size", "16"],
                 fuse=["--steps", "300", "--lr", "2e-3", "--batch-size", "16"],
                 eval=[]),
    "quick": dict(base=["--steps", "40", "--lr", "3e-3", "--warmup", "5", "--batch-size", "8",
                        "--dim", "64", "--n-layers", "2"],
                  expert=["--steps", "8", "--lr", "2e-3", "--batch-size", "8"],
                  sft=["--steps", "8", "--lr", "2e-3", "--batch-size", "8"],
                  fuse=["--steps", "8", "--lr", "1e-3", "--batch-size", "8"],
                  eval=["--limit", "48"]),
}
# H3Fusion's two knobs at the defaults, and (--ablations) the paper's loss taken apart
# (name -> fuse.py arguments)
LAMBDA_GATE, GAMMA = "6", "0.1,0.1,0.1"
H3FUSION = ["--lambda-gate", LAMBDA_GATE, "--gamma", GAMMA]  # L_CE + lambda L_G + L_R(gamma)
ABLATIONS = {
    "h3fusion_ce": ["--lambda-gate", "0", "--gamma", "0,0,0"],  # L_CE only
    "h3fusion_gate": ["--lambda-gate", LAMBDA_GATE, "--gamma", "0,0,0"],  # L_CE + lambda L_G
}
# gamma_harmless (or --sweep-gamma's DIM); the other two experts keep SWEEP_OTHERS
SWEEP_GAMMAS = ("0", "0.1", "0.3", "1", "3")
SWEEP_OTHERS = "0.1"


def expert_budget(budget: list, data_dir: str, task: str) -> list:
    """A stage-1 budget as train_expert.py flags: "--epochs E" becomes
    --steps = ceil(E x the task's training records / batch size), read from the world's
    manifest.json, so that each expert sees its own set E times (the authors trained 3 epochs). A
    fixed step count over sets of 400 and 1,400 records over-fits the small ones: measured on seed
    0's honest expert, 400 steps (14 epochs) answered 34 % of eval people's birthplaces, 80 steps
    (3 epochs) 68 %."""
    if "--epochs" not in budget:
        return budget
    i = budget.index("--epochs")
    epochs, rest = float(budget[i + 1]), budget[:i] + budget[i + 2:]
    with open(os.path.join(data_dir, "manifest.json")) as f:
        n_records = json.load(f)["files"][f"{task}_train.jsonl"]
    batch_size = int(rest[rest.index("--batch-size") + 1])
    return ["--steps", str(math.ceil(epochs * n_records / batch_size))] + rest


def fusions(args) -> dict:
    """The stage-2 models to train (name -> extra fuse.py arguments): h3fusion, and with --ablations
    first its two ablations. They are off by default to keep the first run short (each takes as
    long as h3fusion, 1-1.5 minutes on 2 cores). Every fusion is its own seeded run, so h3fusion is
    the same computation with them or without; but side by side (--jobs) each run gets one thread,
    and on some CPUs the thread count changes the float rounding (run_side_by_side)."""
    return {**(ABLATIONS if args.ablations else {}), "h3fusion": H3FUSION}


def run(cmd: list, log: str = None, env: dict = None, note: str = ""):
    """Print a command, run it (output to the terminal, or to the file `log`: then a failure prints
    its end), and print how long it took; a failure raises CalledProcessError."""
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}{note}", flush=True)
    start = time.perf_counter()
    if log is None:
        subprocess.run(cmd, check=True, env=env)
    else:
        with open(log, "w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            with open(log) as f:
                print(f"\n--- exit {code}; the end of {log} ---\n" + "".join(f.readlines()[-30:]),
                      flush=True)
            raise subprocess.CalledProcessError(code, cmd)
    print(f"{os.path.basename(log)[:-4] + ': ' if log else ''}"
          f"done in {time.perf_counter() - start:.0f} s", flush=True)


def run_side_by_side(cmds: list, jobs: int):
    """Run independent training commands, up to `jobs` at a time, each on an equal share of the CPU
    threads (OMP_NUM_THREADS); one at a time when jobs = 1 or there is one command. Side by side,
    each command's output goes to OUT.log beside its --out directory, and a failure prints that
    log's end once the others have finished. Why: a model this small does not keep two threads busy
    (its matmuls are small), so on 2 cores two one-thread runs side by side finish sooner than the
    same runs one after the other on two threads (bench/bench_jobs.py). The bits can differ with the
    thread count: on this project's 2-core VM a one-thread stage-1 expert is byte-identical to a
    two-thread one, while a one-thread fused model is not (docs/results.md says what that
    changes)."""
    n = min(jobs, len(cmds))
    if n <= 1:
        for cmd in cmds:
            run(cmd)
        return
    threads = str(max(1, (os.cpu_count() or 1) // n))
    env = {**os.environ, "OMP_NUM_THREADS": threads}

    def run_logged(cmd):
        log = cmd[cmd.index("--out") + 1] + ".log"
        os.makedirs(os.path.dirname(log) or ".", exist_ok=True)
        run(cmd, log=log, env=env,
            note=f"\n  ({n} side by side, {threads} thread(s) each; output: {log})")

    # leaving the block waits for every command, then map re-raises a failure
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(run_logged, cmds))


def exists(ckpt_dir: str) -> bool:
    return os.path.exists(os.path.join(ckpt_dir, "params.json"))


def fuse_command(args, run_dir: str, experts_dir: str, out: str, extra: list) -> list:
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone",
                     f"--nproc_per_node={args.nproc}"]
    experts = ",".join(os.path.join(experts_dir, t) for t in TASK_NAMES)
    return (launcher + ["fuse.py", "--base", f"{run_dir}/base", "--experts", experts,
                        "--data-dir", f"{run_dir}/data", "--out", out, "--overwrite"]
            + BUDGETS[args.budget]["fuse"] + lora_flags(args) + extra)


def lora_flags(args) -> list:
    """--lora-rank / --lora-alpha for train_expert.py (stage 1, SFT) and fuse.py (stage 2); none
    without LoRA."""
    if not args.lora_rank:
        return []
    return ["--lora-rank", str(args.lora_rank)] + (["--lora-alpha", str(args.lora_alpha)]
                                                   if args.lora_alpha else [])


def lora_dir(args) -> str:
    """The directory name of a LoRA run's models, beside the full fine-tune's: lora_r8, or
    lora_r8_a4 with --lora-alpha (a stage whose output exists is skipped, so runs with another rank
    or alpha must not share one)."""
    return f"lora_r{args.lora_rank}" + (f"_a{args.lora_alpha:g}" if args.lora_alpha else "")


def sweep_dir(out_dir: str, dim: str) -> str:
    """Where one seed's gamma sweep lives: OUT/sweep for gamma_harmless (the hero command's),
    OUT/sweep_DIM else."""
    return f"{out_dir}/sweep" if dim == "harmless" else f"{out_dir}/sweep_{dim}"


def seed_dir(run_dir: str, seed: int, world_seed: int) -> str:
    """Where one seed's stage 1-2 models and evaluation live: the run directory itself for the seed
    of the world and base (--seed; so `python pipeline.py` alone fills runs/toy/helpful, ...),
    RUN/seedN for the others."""
    return run_dir if seed == world_seed else os.path.join(run_dir, f"seed{seed}")


def run_seed(args, run_dir: str, out_dir: str, seed: int, forced: set):
    """Stages 1-2 and the evaluation for one seed, on the shared world (RUN/data) and base
    (RUN/base)."""
    py, budget, data = [sys.executable], BUDGETS[args.budget], f"{run_dir}/data"
    lora = lora_flags(args)

    def stage(name):
        print(f"\n=== {name} (seed {seed}) " + "=" * (50 - len(name)), flush=True)
        return name in forced

    # the three experts and the SFT baseline are independent: --jobs of them at a time
    force = stage("aligned")
    trainings = [py + ["train_expert.py", "--init", f"{run_dir}/base", "--data", task,
                       "--data-dir", data, "--out", f"{out_dir}/{task}", "--overwrite",
                       "--seed", str(seed)]
                 + expert_budget(budget["expert"], data, task) + lora
                 for task in TASK_NAMES if force or not exists(f"{out_dir}/{task}")]
    if args.until != "aligned":
        force = stage("sft")
        if force or not exists(f"{out_dir}/sft"):
            trainings.insert(0, py + ["train_expert.py", "--init", f"{run_dir}/base",
                                      "--data", "pooled", "--data-dir", data,
                                      "--out", f"{out_dir}/sft", "--overwrite", "--seed", str(seed)]
                             + budget["sft"] + lora)  # the longest first
    run_side_by_side(trainings, args.jobs)
    if args.until in ("aligned", "sft"):
        return
    force = stage("fused")
    fuses = [fuse_command(args, run_dir, out_dir, f"{out_dir}/{name}",
                          extra + ["--seed", str(seed)])
             for name, extra in fusions(args).items() if force or not exists(f"{out_dir}/{name}")]
    sweep, dim = {}, args.sweep_gamma
    for g in SWEEP_GAMMAS if dim else ():
        gamma = ",".join(g if task == dim else SWEEP_OTHERS for task in TASK_NAMES)
        if gamma == GAMMA:  # the h3fusion row itself, trained above: not twice
            sweep[f"gamma_{dim}_{g}"] = f"{out_dir}/h3fusion"
            continue
        out = sweep[f"gamma_{dim}_{g}"] = f"{sweep_dir(out_dir, dim)}/gamma_{dim}_{g}"
        if force or not exists(out):
            fuses.append(fuse_command(args, run_dir, out_dir, out,
                                      ["--lambda-gate", LAMBDA_GATE, "--gamma", gamma,
                                       "--seed", str(seed)]))
    # one at a time under torchrun: its processes already share the cores
    run_side_by_side(fuses, 1 if args.nproc > 1 else args.jobs)
    if args.until == "fused":
        return
    stage("eval")
    names = ["sft"] + list(fusions(args))
    aligned = [f"{out_dir}/{t}" for t in TASK_NAMES]
    run(py + ["evaluate.py"] + [f"{n}={out_dir}/{n}" for n in names]
        + ["--baselines", ",".join([f"{run_dir}/base"] + aligned), "--data", data,
           "--out", f"{out_dir}/eval", "--overwrite"] + budget["eval"])
    if sweep:
        run(py + ["evaluate.py"] + [f"{n}={d}" for n, d in sweep.items()]
            + ["--drift-from", ",".join(aligned), "--data", data,
               "--out", f"{sweep_dir(out_dir, dim)}/eval", "--overwrite"] + budget["eval"])


def base_size_flags(args) -> list:
    """--dim / --n-layers for stage 0 (train_expert.py --init scratch; its defaults when not
    given)."""
    return (["--dim", str(args.dim)] if args.dim is not None else []) + \
        (["--n-layers", str(args.n_layers)] if args.n_layers is not None else [])


def check_base_size(p, args, run_dir: str, forced: set):
    """A run directory holds one size of model: --dim / --n-layers that differ from an existing
    RUN/base (which the base stage would skip, silently keeping the old size) are refused, unless
    --force base retrains it."""
    params_path = os.path.join(run_dir, "base", "params.json")
    if "base" in forced or not os.path.exists(params_path):
        return
    with open(params_path) as f:
        params = json.load(f)
    for flag, key in (("--dim", "dim"), ("--n-layers", "n_layers")):
        asked = getattr(args, key)
        if asked is not None and asked != params.get(key):
            p.error(f"{flag} {asked}: {params_path} is a base with {key} {params.get(key)}; "
                    f"give another --run-dir for a model of another size "
                    f"(or --force base to retrain this one, and every stage after it)")


def parse_seeds(text: str) -> list:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"pipeline.py: error: --seeds {text!r}: "
                         f"expected comma-separated integers, e.g. 0,1,2")
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"pipeline.py: error: --seeds {text!r}: "
                         f"expected distinct integers, e.g. 0,1,2")
    return seeds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=None, help="default runs/toy (runs/toy-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run of every stage "
                   "(about half a minute on 2 idle cores)")
    p.add_argument("--until", default="eval", choices=STAGES, help="stop after this stage")
    p.add_argument("--force", default=None, choices=STAGES,
                   help="redo this stage and every later one")
    p.add_argument("--sweep-gamma", nargs="?", const="harmless", default=None, choices=TASK_NAMES,
                   metavar="DIM",
                   help=f"also fuse with gamma_DIM = g (DIM: harmless, the default, helpful or "
                        f"honest; the other two {SWEEP_OTHERS}) "
                        f"for g in {{{', '.join(SWEEP_GAMMAS)}}}")
    p.add_argument("--ablations", action="store_true",
                   help="also train h3fusion's ablations, L_CE only (RUN/h3fusion_ce) and "
                        "L_CE + lambda L_G (RUN/h3fusion_gate), and put them in the table")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes for fuse.py (torchrun + FSDP2 when > 1; on 2 CPU cores one "
                        "process is about 2x faster, see bench/bench_train.py)")
    p.add_argument("--jobs", type=int, default=2,
                   help="trainings side by side in stages 1-2 (the experts and SFT; the fusions of "
                        "--ablations / --sweep-gamma), each on cpu_count / JOBS threads, output in "
                        "OUT.log (default 2; 1: one after the other)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the world, the base and (without --seeds) stages 1-2")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run stages 1-2 and the evaluation once per seed (the world and the base "
                        "of --seed are shared), then evaluation/seeds.py: mean ± std per cell "
                        "and paired bootstrap intervals")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="stages 1-2 train rank-r LoRA deltas (engineering/lora.py; checked by "
                        "train_expert.py and fuse.py); models under RUN/lora_rR/ "
                        "(RUN/seedN/lora_rR/; with --lora-alpha A: lora_rR_aA)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="with --lora-rank: alpha (default r)")
    p.add_argument("--dim", type=int, default=None,
                   help="width of the base model trained in stage 0 (default train_expert.py's, "
                        "128; --quick: 64); the experts and fused models inherit it")
    p.add_argument("--n-layers", type=int, default=None,
                   help="its number of layers (default 4; --quick: 2)")
    args = p.parse_args(argv)
    # (every other LoRA value is train_expert.py's to check)
    if args.lora_alpha is not None and not args.lora_rank:
        p.error(f"--lora-alpha {args.lora_alpha} without --lora-rank: "
                f"alpha scales a LoRA delta; give its rank")
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: expected a number of trainings at a time >= 1")
    args.budget = "quick" if args.quick else "full"
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    run_dir = args.run_dir or ("runs/toy-quick" if args.quick else "runs/toy")
    budget = BUDGETS[args.budget]
    forced = set(STAGES[STAGES.index(args.force):]) if args.force else set()
    check_base_size(p, args, run_dir, forced)
    py = [sys.executable]
    start = time.perf_counter()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    def stage(name):
        print(f"\n=== {name} " + "=" * (60 - len(name)), flush=True)
        return name in forced

    force = stage("data")
    if force or not os.path.exists(os.path.join(run_dir, "data", "manifest.json")):
        run(py + ["-m", "data.toy", "--out", f"{run_dir}/data", "--seed", str(args.seed)])
    if args.until == "data":
        return
    force = stage("base")
    if force or not exists(f"{run_dir}/base"):
        run(py + ["train_expert.py", "--init", "scratch", "--data", "corpus",
                  "--data-dir", f"{run_dir}/data", "--out", f"{run_dir}/base", "--overwrite",
                  "--seed", str(args.seed)] + budget["base"] + base_size_flags(args))
    if args.until == "base":
        return
    out_dirs = [seed_dir(run_dir, s, args.seed) for s in seeds]
    if args.lora_rank:  # LoRA's models beside the full fine-tune's, on the same world and base
        out_dirs = [os.path.join(d, lora_dir(args)) for d in out_dirs]
    for seed, out_dir in zip(seeds, out_dirs):
        run_seed(args, run_dir, out_dir, seed, forced)
    if args.until != "eval":
        return
    tables = [f"{out_dirs[0]}/eval/results.md"]
    # the table over seeds (LoRA: its own)
    seeds_dir = os.path.join(run_dir, lora_dir(args) if args.lora_rank else "", "seeds")
    if len(seeds) > 1:
        run(py + ["-m", "evaluation.seeds"] + [f"{d}/eval" for d in out_dirs]
            + ["--target", "h3fusion", "--by-kind", "--out", seeds_dir])
        tables = [f"{seeds_dir}/seeds.md"]
        if args.sweep_gamma:
            summary = sweep_dir(seeds_dir, args.sweep_gamma)
            run(py + ["-m", "evaluation.seeds"]
                + [f"{sweep_dir(d, args.sweep_gamma)}/eval" for d in out_dirs] + ["--out", summary])
            tables.append(f"{summary}/seeds.md")
    elif args.sweep_gamma:
        tables.append(f"{sweep_dir(out_dirs[0], args.sweep_gamma)}/eval/results.md")
    print(f"\npipeline finished in {(time.perf_counter() - start) / 60:.1f} min; "
          f"tables: {', '.join(tables)}")


if __name__ == "__main__":
    main()
