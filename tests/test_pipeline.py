"""The README's main job, end to end: `python pipeline.py --quick` runs every
stage and prints the table."""
import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
from engineering import checkpoints as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ("base", "helpful", "harmless", "honest", "soup", "task_arith", "ties", "ensemble", "oracle",
        "sft", "h3fusion")
ABLATIONS = ("h3fusion_ce", "h3fusion_gate")


def test_fusions_are_h3fusion_and_with_ablations_its_two_ablations():
    """Stage 2 trains h3fusion with the defaults; --ablations adds L_CE only and
    L_CE + lambda L_G (gamma 0)."""
    import pipeline
    assert pipeline.fusions(argparse.Namespace(ablations=False)) == {
        "h3fusion": ["--lambda-gate", "6", "--gamma", "0.1,0.1,0.1"]}
    with_ablations = pipeline.fusions(argparse.Namespace(ablations=True))
    assert list(with_ablations) == ["h3fusion_ce", "h3fusion_gate", "h3fusion"]
    assert with_ablations["h3fusion_ce"] == ["--lambda-gate", "0", "--gamma", "0,0,0"]
    assert with_ablations["h3fusion_gate"] == ["--lambda-gate", "6", "--gamma", "0,0,0"]


def test_expert_budget_turns_epochs_into_steps_per_expert(tmp_path):
    """--epochs E becomes --steps ceil(E x that expert's training records / batch size), from the
    world's manifest; a budget in steps passes unchanged."""
    import pipeline
    with open(tmp_path / "manifest.json", "w") as f:
        json.dump({"files": {"helpful_train.jsonl": 1292, "honest_train.jsonl": 448}}, f)
    budget = ["--epochs", "3", "--lr", "1e-3", "--batch-size", "16"]
    # 3 x 1292 / 16 = 242.25, rounded up
    assert pipeline.expert_budget(budget, str(tmp_path), "helpful") == [
        "--steps", "243", "--lr", "1e-3", "--batch-size", "16"]
    # 3 x 448 / 16 = 84
    assert pipeline.expert_budget(budget, str(tmp_path), "honest")[:2] == ["--steps", "84"]
    steps = ["--steps", "8", "--lr", "2e-3", "--batch-size", "8"]
    assert pipeline.expert_budget(steps, str(tmp_path), "honest") == steps
    assert pipeline.BUDGETS["full"]["expert"][:2] == ["--epochs", "3"]


def test_side_by_side_runs_commands_at_once_on_a_share_of_the_threads(tmp_path, capsys):
    import pipeline
    # each command writes its thread budget, then waits for the other's file: only
    # two at a time can both finish
    wait_for_other = ("import os, sys, time; out = sys.argv[2]; open(out + '.threads', 'w').write("
                      "os.environ['OMP_NUM_THREADS']); other = sys.argv[3]; "
                      "deadline = time.time() + 60\n"
                      "while not os.path.exists(other) and time.time() < deadline: "
                      "time.sleep(0.05)\n"
                      "print('saw', other); sys.exit(0 if os.path.exists(other) else 3)")
    a, b = str(tmp_path / "a"), str(tmp_path / "sub" / "b")
    cmds = [[sys.executable, "-c", wait_for_other, "--out", a, b + ".threads"],
            [sys.executable, "-c", wait_for_other, "--out", b, a + ".threads"]]
    pipeline.run_side_by_side(cmds, jobs=2)
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert open(a + ".threads").read() == open(b + ".threads").read() == threads
    assert open(a + ".log").read().strip() == f"saw {b}.threads"  # each command's output in OUT.log
    assert "2 side by side" in capsys.readouterr().out
    # a failing command: the others still run, then its log's end is printed and the error raised
    fail = [sys.executable, "-c", "import sys; print('the reason'); sys.exit(4)",
            "--out", str(tmp_path / "bad")]
    ok = [sys.executable, "-c", "open(__import__('sys').argv[2] + '.ran', 'w')",
          "--out", str(tmp_path / "ok")]
    with pytest.raises(subprocess.CalledProcessError) as e:
        pipeline.run_side_by_side([fail, ok], jobs=2)
    assert e.value.returncode == 4 and os.path.exists(tmp_path / "ok.ran")
    assert "the reason" in capsys.readouterr().out


def test_jobs_must_be_positive():
    result = subprocess.run([sys.executable, "pipeline.py", "--jobs", "0"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--jobs 0" in result.stderr


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
    assert len(fused) == 1 and 0 <= fused[0]["routing"]["routing_acc_example"] <= 1
    # ablations are trained only with --ablations
    assert not any(os.path.exists(os.path.join(run_dir, name)) for name in ABLATIONS)
    for name in ("base", "helpful", "harmless", "honest", "sft", "h3fusion"):
        model, args = C.load_checkpoint(os.path.join(run_dir, name))  # every checkpoint loads
        assert args.n_experts == (3 if name.startswith("h3fusion") else 0)
    # a second run skips every training stage whose output exists
    again = subprocess.run(cmd + ["--until", "fused"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert (again.returncode == 0 and "train_expert.py" not in again.stdout
            and "fuse.py" not in again.stdout)
    # --seeds --ablations: seed 0 is the run above (only its ablations are trained now), seed 1
    # trains stages 1-2 on the same base, then evaluation/seeds.py
    seeded = subprocess.run(cmd + ["--seeds", "0,1", "--ablations"], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert seeded.returncode == 0, seeded.stdout[-3000:] + seeded.stderr[-3000:]
    assert "scratch" not in seeded.stdout  # the base is shared, not retrained
    assert seeded.stdout.count("fuse.py") == 2 + 3  # seed 0's two ablations, seed 1's three fusions
    for name in ABLATIONS:
        assert C.load_checkpoint(os.path.join(run_dir, name))[1].n_experts == 3
    assert os.path.exists(os.path.join(run_dir, "seed1", "h3fusion", "params.json"))
    summary = json.load(open(os.path.join(run_dir, "seeds", "seeds.json")))
    assert len(summary["seeds"]) == 2 and summary["target"] == "h3fusion"
    assert set(summary["margins"]) == set(ROWS + ABLATIONS) - {"h3fusion"}
    assert all(m["low"] <= m["delta"] <= m["high"] for m in summary["margins"].values())
    assert all(np.mean(m["per_seed"]) == pytest.approx(m["delta"]) and len(m["per_seed"]) == 2
               and m["next_seed"]["low"] <= m["delta"] <= m["next_seed"]["high"]
               for m in summary["margins"].values())
    # --lora-rank: stages 1-2 with LoRA on the same world and base, beside the full
    # fine-tune; plain checkpoints
    lora = subprocess.run(cmd + ["--lora-rank", "4"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert lora.returncode == 0, lora.stdout[-3000:] + lora.stderr[-3000:]
    # trained with LoRA: the 3 experts, sft, h3fusion
    assert "scratch" not in lora.stdout and lora.stdout.count("--lora-rank 4") == 5
    lora_table = open(os.path.join(run_dir, "lora_r4", "eval", "results.md")).read()
    lora_names = [line.split("|")[1].strip() for line in lora_table.splitlines()
                  if line.startswith("| ")][1:]
    assert sorted(lora_names) == sorted(ROWS)
    base = C.load_checkpoint(os.path.join(run_dir, "base"))[0].state_dict()
    for name in ("helpful", "sft", "h3fusion"):
        state = C.load_checkpoint(os.path.join(run_dir, "lora_r4", name))[0].state_dict()
        assert not any(".lora." in k for k in state)  # merged on save
        if name != "h3fusion":
            assert all(torch.equal(t, base[k]) == (".feed_forward." not in k)
                       for k, t in state.items())
    # --sweep-gamma helpful: gamma_helpful in {0, 0.1, 0.3, 1, 3}, the others 0.1
    # (0.1 is the h3fusion row itself)
    swept = subprocess.run(cmd + ["--sweep-gamma", "helpful", "--until", "fused"], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    for g in ("0", "0.3", "1", "3"):
        run_json = json.load(open(os.path.join(run_dir, "sweep_helpful", f"gamma_helpful_{g}.train",
                                               "run.json")))
        assert run_json["gamma"] == f"{g},0.1,0.1"
    assert not os.path.exists(os.path.join(run_dir, "sweep_helpful", "gamma_helpful_0.1"))


def test_dim_and_n_layers_reach_the_base_command(tmp_path, monkeypatch):
    """--dim / --n-layers are appended to stage 0's train_expert.py command, after the budget's own
    size (--quick has one), so that they win; without them the command is the budget's alone."""
    import pipeline
    run_dir = tmp_path / "toy"
    (run_dir / "data").mkdir(parents=True)
    # the data stage is skipped: its output exists
    (run_dir / "data" / "manifest.json").write_text("{}")
    commands = []
    monkeypatch.setattr(pipeline, "run", lambda cmd, **kw: commands.append(cmd))
    pipeline.main(["--quick", "--run-dir", str(run_dir), "--until", "base",
                   "--dim", "48", "--n-layers", "3"])
    (base,) = commands
    assert base[base.index("--out") + 1] == f"{run_dir}/base"
    # --dim twice: the budget's 64, then 48
    assert base[-4:] == ["--dim", "48", "--n-layers", "3"] and base.count("--dim") == 2
    commands.clear()
    pipeline.main(["--run-dir", str(run_dir), "--until", "base"])
    assert "--dim" not in commands[0] and commands[0][-len(pipeline.BUDGETS["full"]["base"]):] == \
        pipeline.BUDGETS["full"]["base"]


def test_a_size_unlike_the_existing_base_is_refused(tmp_path):
    """An existing RUN/base would be skipped, keeping its size: another --dim / --n-layers is
    an error naming its params.json (nothing runs), the same size is not; --force base would
    retrain it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text("{}")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "params.json").write_text(json.dumps({"dim": 128, "n_layers": 4}))
    cmd = [sys.executable, "pipeline.py", "--run-dir", str(tmp_path), "--until", "base"]
    for flags, message in ((["--dim", "256"], "--dim 256"), (["--n-layers", "8"], "--n-layers 8")):
        result = subprocess.run(cmd + flags, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr
        assert (os.path.join(str(tmp_path), "base", "params.json") in result.stderr
                and "--run-dir" in result.stderr)
        assert "train_expert.py" not in result.stdout
    same = subprocess.run(cmd + ["--dim", "128", "--n-layers", "4"], cwd=ROOT, capture_output=True,
                          text=True)
    assert same.returncode == 0 and "train_expert.py" not in same.stdout  # the base exists: skipped
