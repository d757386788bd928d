"""Wall time of stage 1 (the three experts and SFT) one after the other vs side by side:
pipeline.py --jobs 1 vs 2.

    python bench/bench_jobs.py RUN_DIR [--rounds 2] [--jobs 1,2]

RUN_DIR is a run directory with a world and a base (e.g. /tmp/idle-run after
`python pipeline.py --run-dir /tmp/idle-run`, or `--until base`). Each round retrains the experts
and SFT of RUN_DIR's seed 0 with every --jobs value in turn, alternating the order from round to
round (the 2-core VM's speed drifts within minutes), by
`pipeline.py --run-dir RUN_DIR --until sft --force aligned --jobs J`, and prints each run's wall
time and, per round, the ratio to the first --jobs value. The checkpoints it writes replace
RUN_DIR's (byte-identical on a machine where thread count does not change float results). Nothing
here is asserted by the tests.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_stage1(run_dir: str, jobs: int) -> float:
    cmd = [sys.executable, "pipeline.py", "--run-dir", run_dir, "--until", "sft",
           "--force", "aligned", "--jobs", str(jobs)]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--jobs", default="1,2",
                   help="comma-separated --jobs values; ratios are to the first")
    args = p.parse_args()
    if not os.path.exists(os.path.join(args.run_dir, "base", "params.json")):
        raise SystemExit(f"bench_jobs.py: {args.run_dir}/base/params.json not found: "
                         f"expected a run directory with a world and a base "
                         f"(python pipeline.py --run-dir {args.run_dir} --until base)")
    values = [int(j) for j in args.jobs.split(",")]
    times = {j: [] for j in values}
    print(f"stage 1 (3 experts + SFT) of {args.run_dir}, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds")
    for r in range(args.rounds):
        for j in values if r % 2 == 0 else values[::-1]:
            times[j].append(time_stage1(args.run_dir, j))
            print(f"round {r + 1}: --jobs {j}: {times[j][-1]:.0f} s", flush=True)
        ratios = ", ".join(f"--jobs {j}: {times[j][-1] / times[values[0]][-1]:.2f}x"
                           for j in values[1:])
        print(f"round {r + 1}: time relative to --jobs {values[0]}: {ratios}", flush=True)
    for j in values:
        print(f"--jobs {j}: median {statistics.median(times[j]):.0f} s (runs: "
              + ", ".join(f"{t:.0f}" for t in times[j]) + ")")


if __name__ == "__main__":
    main()
