"""The whole H3Fusion pipeline on the synthetic world, one command:

    python pipeline.py                  # data -> base -> 3 aligned experts -> SFT baseline -> fusion + ablations
                                        #   -> evaluation table                         (about 8 min on 2 CPU cores)
    python pipeline.py --quick          # the same stages, tiny budgets (under a minute; numbers mean little)
    python pipeline.py --nproc 2        # fusion under torchrun with FSDP2 over 2 processes
    python pipeline.py --sweep-gamma    # then fuse with gamma_harmless in {0, 0.1, 0.3, 1} and compare
    python pipeline.py --until aligned  # stop after a stage (data, base, aligned, sft, fused, eval)
    python pipeline.py --force fused    # redo a stage (and everything after it) even if its outputs exist

Every stage is an ordinary command of this repository, printed before it runs, so you can copy any of them:
    python -m data.toy             the synthetic world + tokenizer                   -> RUN/data
    python train_expert.py         stage 0: pretrain the base (all weights)          -> RUN/base
                                   stage 1: FFN-only fine-tune per dimension         -> RUN/helpful, harmless, honest
                                   baseline: FFN-only fine-tune on the pooled data   -> RUN/sft
    python fuse.py                 stage 2: H3Fusion (L_CE + lambda L_G + L_R)       -> RUN/h3fusion
                                   (--nproc 2: under torchrun, FSDP2 over 2 processes)
                                   ablations: L_CE only, L_CE + lambda L_G           -> RUN/h3fusion_ce, h3fusion_gate
    python evaluate.py             every model + soup, task arithmetic, TIES, ensemble -> RUN/eval/results.md
A stage whose output already exists is skipped (delete it, or pass --force STAGE, to redo it).
"""
import argparse
import os
import shlex
import subprocess
import sys
import time

STAGES = ("data", "base", "aligned", "sft", "fused", "eval")
TASKS = ("helpful", "harmless", "honest")

# Budgets, calibrated on 2 CPU cores (see README "Results"): full = the default run, quick = the CI smoke run.
BUDGETS = {
    "full": dict(base=["--steps", "1200", "--lr", "2e-3", "--warmup", "40", "--batch-size", "16"],
                 expert=["--steps", "400", "--lr", "1e-3", "--batch-size", "16"],
                 sft=["--steps", "600", "--lr", "1e-3", "--batch-size", "16"],
                 fuse=["--steps", "300", "--lr", "1e-3", "--batch-size", "16"],
                 eval=[]),
    "quick": dict(base=["--steps", "40", "--lr", "3e-3", "--warmup", "5", "--batch-size", "8", "--dim", "64",
                        "--n-layers", "2"],
                  expert=["--steps", "8", "--lr", "2e-3", "--batch-size", "8"],
                  sft=["--steps", "8", "--lr", "2e-3", "--batch-size", "8"],
                  fuse=["--steps", "8", "--lr", "1e-3", "--batch-size", "8"],
                  eval=["--limit", "48"]),
}
# H3Fusion's two knobs at the defaults, and the ablations of the paper's loss (name -> extra fuse.py arguments)
LAMBDA_GATE, GAMMA = "1", "0.1,0.1,0.1"
FUSIONS = {
    "h3fusion_ce": ["--lambda-gate", "0", "--gamma", "0,0,0"],  # L_CE only
    "h3fusion_gate": ["--lambda-gate", LAMBDA_GATE, "--gamma", "0,0,0"],  # L_CE + lambda L_G
    "h3fusion": ["--lambda-gate", LAMBDA_GATE, "--gamma", GAMMA],  # L_CE + lambda L_G + L_R(gamma)
}
SWEEP_GAMMAS = ("0", "0.1", "0.3", "1")


def run(cmd: list, log_prefix=""):
    print(f"\n$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"{log_prefix}done in {time.perf_counter() - start:.0f} s", flush=True)


def exists(ckpt_dir: str) -> bool:
    return os.path.exists(os.path.join(ckpt_dir, "params.json"))


def fuse_command(args, run_dir: str, out: str, extra: list) -> list:
    launcher = [sys.executable]
    if args.nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    experts = ",".join(os.path.join(run_dir, t) for t in TASKS)
    return launcher + ["fuse.py", "--base", f"{run_dir}/base", "--experts", experts, "--data-dir", f"{run_dir}/data",
                       "--out", out, "--overwrite"] + BUDGETS[args.budget]["fuse"] + extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", default=None, help="default runs/toy (runs/toy-quick with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny budgets: a 2-minute smoke run of every stage")
    p.add_argument("--until", default="eval", choices=STAGES, help="stop after this stage")
    p.add_argument("--force", default=None, choices=STAGES, help="redo this stage and every later one")
    p.add_argument("--sweep-gamma", action="store_true", help="also fuse with gamma_harmless in {0, 0.1, 0.3, 1}")
    p.add_argument("--nproc", type=int, default=1, help="processes for fuse.py (torchrun + FSDP2 when > 1; on 2 CPU "
                   "cores one process is about 2x faster, see bench/bench_train.py)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.budget = "quick" if args.quick else "full"
    run_dir = args.run_dir or ("runs/toy-quick" if args.quick else "runs/toy")
    budget = BUDGETS[args.budget]
    forced = set(STAGES[STAGES.index(args.force):]) if args.force else set()
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
        run(py + ["train_expert.py", "--init", "scratch", "--data", "corpus", "--data-dir", f"{run_dir}/data",
                  "--out", f"{run_dir}/base", "--overwrite", "--seed", str(args.seed)] + budget["base"])
    if args.until == "base":
        return
    force = stage("aligned")
    for task in TASKS:
        if force or not exists(f"{run_dir}/{task}"):
            run(py + ["train_expert.py", "--init", f"{run_dir}/base", "--data", task, "--data-dir", f"{run_dir}/data",
                      "--out", f"{run_dir}/{task}", "--overwrite", "--seed", str(args.seed)] + budget["expert"])
    if args.until == "aligned":
        return
    force = stage("sft")
    if force or not exists(f"{run_dir}/sft"):
        run(py + ["train_expert.py", "--init", f"{run_dir}/base", "--data", "pooled", "--data-dir", f"{run_dir}/data",
                  "--out", f"{run_dir}/sft", "--overwrite", "--seed", str(args.seed)] + budget["sft"])
    if args.until == "sft":
        return
    force = stage("fused")
    for name, extra in FUSIONS.items():
        if force or not exists(f"{run_dir}/{name}"):
            run(fuse_command(args, run_dir, f"{run_dir}/{name}", extra + ["--seed", str(args.seed)]))
    sweep = {}
    if args.sweep_gamma:
        for g in SWEEP_GAMMAS:
            out = f"{run_dir}/sweep/gamma_harmless_{g}"
            sweep[f"gamma_harmless_{g}"] = out
            if force or not exists(out):
                run(fuse_command(args, run_dir, out, ["--lambda-gate", LAMBDA_GATE, "--gamma", f"0.1,{g},0.1",
                                                      "--seed", str(args.seed)]))
    if args.until == "fused":
        return
    stage("eval")
    names = ["sft"] + list(FUSIONS)
    baselines = ",".join([f"{run_dir}/base"] + [f"{run_dir}/{t}" for t in TASKS])
    run(py + ["evaluate.py"] + [f"{n}={run_dir}/{n}" for n in names] + ["--baselines", baselines, "--data",
              f"{run_dir}/data", "--out", f"{run_dir}/eval"] + budget["eval"])
    if sweep:
        run(py + ["evaluate.py"] + [f"{n}={d}" for n, d in sweep.items()] + ["--data", f"{run_dir}/data",
                  "--out", f"{run_dir}/sweep/eval"] + budget["eval"])
    print(f"\npipeline finished in {(time.perf_counter() - start) / 60:.1f} min; table: {run_dir}/eval/results.md")


if __name__ == "__main__":
    main()
