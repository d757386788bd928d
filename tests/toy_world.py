"""A tiny synthetic world for the training tests: the world's data, a base pretrained for a few
steps, and three aligned models (stage 1) trained from it; shared by tests/test_training.py,
tests/test_lora.py and tests/test_drift_force.py."""
import os
import subprocess
import sys

import train_expert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim", "32", "--n-layers", "2", "--n-heads", "2", "--multiple-of", "16"]
FAST = ["--seq-len", "64", "--batch-size", "4", "--log-every", "1"]
TASKS = ("helpful", "harmless", "honest")


def build_world(root, stage1_args=()) -> dict:
    """root (a pathlib.Path): data/, base/ and one aligned model per task, each stage 1 run with
    stage1_args."""
    data = str(root / "data")
    subprocess.run([sys.executable, "-m", "data.toy", "--out", data], cwd=ROOT, check=True,
                   capture_output=True)
    base = str(root / "base")
    train_expert.main(["--init", "scratch", "--data-dir", data, "--out", base, "--steps", "6",
                       "--lr", "3e-3"] + TINY + FAST)
    experts = []
    for task in TASKS:
        out = str(root / task)
        train_expert.main(["--init", base, "--data", task, "--data-dir", data, "--out", out,
                           "--steps", "4", "--lr", "3e-3"] + FAST + list(stage1_args))
        experts.append(out)
    return {"root": root, "data": data, "base": base, "experts": experts}
