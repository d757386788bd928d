"""The README's main job, end to end: `python pipeline.py --quick` runs every stage and prints the table."""
import json
import os
import subprocess
import sys

import pytest

import model as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("base", "helpful", "harmless", "honest", "soup", "task_arith", "ties", "ensemble", "oracle", "sft",
        "h3fusion_ce", "h3fusion_gate", "h3fusion")


@pytest.mark.slow
def test_quick_pipeline_end_to_end(tmp_path):
    run_dir = str(tmp_path / "toy")
    cmd = [sys.executable, "pipeline.py", "--quick", "--run-dir", run_dir]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    table = open(os.path.join(run_dir, "eval", "results.md")).read()
    names = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:]
    assert sorted(names) == sorted(ROWS)
    assert "helpful" in table.splitlines()[0] and "harmful" in table.splitlines()[0]
    assert "routed right: per example" in table.splitlines()[0]
    results = json.load(open(os.path.join(run_dir, "eval", "results.json")))
    fused = [r for r in results["models"] if r["name"].startswith("h3fusion")]
    assert len(fused) == 3 and all(0 <= r["routing"]["routing_acc_example"] <= 1 for r in fused)
    for name in ("base", "helpful", "harmless", "honest", "sft", "h3fusion_ce", "h3fusion_gate", "h3fusion"):
        model, args = M.load_checkpoint(os.path.join(run_dir, name))  # every checkpoint loads
        assert args.n_experts == (3 if name.startswith("h3fusion") else 0)
    # a second run skips every training stage whose output exists
    again = subprocess.run(cmd + ["--until", "fused"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train_expert.py" not in again.stdout and "fuse.py" not in again.stdout
    # --seeds: seed 0 is the run above (skipped), seed 1 trains stages 1-2 on the same base, then seeds.py
    seeded = subprocess.run(cmd + ["--seeds", "0,1"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert seeded.returncode == 0, seeded.stdout[-3000:] + seeded.stderr[-3000:]
    assert "scratch" not in seeded.stdout  # the base is shared, not retrained
    assert os.path.exists(os.path.join(run_dir, "seed1", "h3fusion", "params.json"))
    summary = json.load(open(os.path.join(run_dir, "seeds", "seeds.json")))
    assert len(summary["seeds"]) == 2 and summary["target"] == "h3fusion"
    assert set(summary["margins"]) == set(ROWS) - {"h3fusion"}
    assert all(m["low"] <= m["delta"] <= m["high"] for m in summary["margins"].values())
