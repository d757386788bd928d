"""Every command line, run as a user runs it, on bad input: one line
`SCRIPT: error: ...` on stderr, exit code 2, no traceback, nothing written
(engineering.cli.run_cli is the one convention)."""
import os
import subprocess
import sys

import pytest

from engineering.tiny import make_tiny_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, env=None):
    return subprocess.run([sys.executable] + list(args), cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))


def assert_clean_error(result, script, message):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines()
                   if line.startswith(f"{script}: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr[-2000:]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("cli") / "tiny"), dim=32, n_layers=1,
                                n_heads=2, n_kv_heads=2)


def test_generate_py(ckpt, tmp_path):
    assert_clean_error(run("generate.py", str(tmp_path / "nope"), "--prompt", "hi"),
                       "generate.py", "nope")
    assert_clean_error(run("generate.py", ckpt, "--prompt", "hi", "--dtype", "float8"),
                       "generate.py", "--dtype float8")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for name in os.listdir(ckpt):
        data = open(os.path.join(ckpt, name), "rb").read()
        open(truncated / name, "wb").write(data[: len(data) // 2] if name.endswith(".pth")
                                           else data)
    # a download cut short: the error names the file and its size
    result = run("generate.py", str(truncated), "--prompt", "hi")
    size = os.path.getsize(truncated / "consolidated.00.pth")
    assert_clean_error(result, "generate.py",
                       f"consolidated.00.pth: {size:,} bytes, and no zip central directory")


def test_train_expert_py(ckpt, tmp_path):
    out = tmp_path / "out"
    assert_clean_error(run("train_expert.py", "--init", ckpt,
                           "--data", str(tmp_path / "missing.jsonl"), "--out", str(out)),
                       "train_expert.py", "missing.jsonl")
    assert_clean_error(run("train_expert.py", "--init", ckpt, "--data", "helpful",
                           "--data-dir", str(tmp_path), "--out", str(out), "--lr", "-1"),
                       "train_expert.py", "--lr -1")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "a.txt").write_text("x")
    assert_clean_error(run("train_expert.py", "--init", ckpt, "--data", "helpful",
                           "--out", str(mine), "--overwrite"),
                       "train_expert.py", "not a checkpoint written by this project")
    assert (not out.exists() and not (tmp_path / "out.train").exists()
            and os.listdir(mine) == ["a.txt"])


def test_fuse_evaluate_and_seeds_py(ckpt, tmp_path):
    assert_clean_error(run("fuse.py", "--base", ckpt, "--experts", f"{ckpt},{ckpt},{ckpt}",
                           "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "f")),
                       "fuse.py", "missing.jsonl")
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.train").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "results.md").write_text("mine")
    assert_clean_error(run("evaluate.py", ckpt, "--out", str(mine)), "evaluate.py",
                       "not an evaluation")
    assert (mine / "results.md").read_text() == "mine"
    assert_clean_error(run("-m", "evaluation.seeds", str(tmp_path), "--out", str(tmp_path / "s")),
                       "python -m evaluation.seeds", "no results.json")
    assert_clean_error(run("-m", "evaluation.world_goals", str(tmp_path / "nope")),
                       "python -m evaluation.world_goals", "results.json")


def test_expected_errors_keep_their_traceback_on_request(ckpt, tmp_path):
    result = run("generate.py", str(tmp_path / "nope"), "--prompt", "hi",
                 env={"H3FUSION_TRACEBACK": "1"})
    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.slow
def test_under_torchrun_only_rank_0_speaks(ckpt, tmp_path):
    result = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "fuse.py", "--base", ckpt, "--experts", f"{ckpt},{ckpt},{ckpt}",
                 "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "f"))
    assert result.returncode != 0
    assert sum(line.startswith("fuse.py: error:")
               for line in result.stderr.splitlines()) == 1, result.stderr[-3000:]


# ---- every flag does what it says or is refused --------------------------------------------------


def cli_error(monkeypatch, capsys, main, script, *argv):
    """SCRIPT's command line, run in this process (fast): engineering.cli.run_cli(main) with
    sys.argv = [SCRIPT, *argv]. Returns what assert_clean_error reads (a failure that is not an
    expected error raises here, traceback and all)."""
    from types import SimpleNamespace

    from engineering.cli import run_cli

    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(main, script)
    return SimpleNamespace(returncode=stop.value.code, stderr=capsys.readouterr().err)


@pytest.fixture
def record_file(tmp_path):
    """A local record file: instruction data without a held-out split."""
    import json

    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w,
                                        "task": i % 3}) + "\n"
                            for i, w in enumerate(("yes", "no", "maybe"))))
    return str(path)


def test_fuse_refuses_flags_that_would_change_nothing(ckpt, tmp_path, record_file, monkeypatch,
                                                      capsys):
    import fuse

    base = ["--base", ckpt, "--experts", f"{ckpt},{ckpt},{ckpt}", "--out", str(tmp_path / "f")]
    cases = [  # (extra arguments, what the one error line says)
        (["--balance-coef", "-1"], "--balance-coef -1.0: expected a finite number >= 0"),
        (["--z-coef", "nan"], "--z-coef nan: expected a finite number >= 0"),
        (["--top-k", "3", "--balance-coef", "0.01"], "load-balancing loss is the constant 1"),
        (["--reg", "decay", "--gamma", "0,0,0"],
         "--reg decay with --gamma 0,0,0: every gamma_i is 0"),
        (["--data", record_file, "--eval-every", "2"],
         "--eval-every 2: --data " + record_file + " has no held-out"),
    ]
    for extra, message in cases:
        assert_clean_error(cli_error(monkeypatch, capsys, fuse.main, "fuse.py", *base, *extra),
                           "fuse.py", message)
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.train").exists()


def test_train_expert_refuses_flags_that_would_change_nothing(ckpt, tmp_path, record_file,
                                                              monkeypatch, capsys):
    import train_expert

    out = ["--out", str(tmp_path / "e")]
    cases = [  # (arguments, what the one error line says)
        (["--warmup", "-1"], "--warmup -1: expected >= 0"),
        (["--eval-every", "-2"], "--eval-every -2: expected >= 0"),
        (["--save-every", "-1"], "--save-every -1: expected >= 0"),
        (["--grad-clip", "0"], "--grad-clip 0.0: expected > 0"),
        (["--grad-clip", "-1"], "--grad-clip -1.0: expected > 0"),
        (["--resume", "--overwrite"], "--resume with --overwrite"),
        (["--init", ckpt, "--data", "helpful", "--dim", "64", "--n-kv-heads", "1"],
         "--dim --n-kv-heads with --init " + ckpt + ": the model size comes from the checkpoint"),
        (["--dim", "0"], "--dim 0: expected >= 1"),
        (["--n-layers", "0"], "--n-layers 0: expected >= 1"),
        (["--n-heads", "-2"], "--n-heads -2: expected >= 1"),
        (["--dim", "30"],  # 4 x 7.5
         "--dim 30 with --n-heads 4: expected dim = n_heads x an even head size"),
        (["--dim", "36"],  # 4 x 9: odd
         "--dim 36 with --n-heads 4: expected dim = n_heads x an even head size (RoPE rotates "
         "pairs), e.g. --dim 32"),
        (["--n-heads", "4", "--n-kv-heads", "3"],
         "--n-kv-heads 3: expected a divisor of --n-heads 4"),
        (["--data", "corpus", "--task", "honest"],
         "--task honest: for instruction data; --data corpus"),
        (["--data-path", "x.json"], "--data-path x.json: for instruction data; --data corpus"),
        (["--init", ckpt, "--data", record_file, "--eval-every", "3"],
         "--eval-every 3: --data " + record_file),
    ]
    for argv, message in cases:
        result = cli_error(monkeypatch, capsys, train_expert.main, "train_expert.py", *argv, *out)
        assert_clean_error(result, "train_expert.py", message)
    assert not (tmp_path / "e").exists() and not (tmp_path / "e.train").exists()
