"""train_expert.py / fuse.py / trainer.py: frozen weights, the effect of lambda and
gamma, FSDP equivalence, kill-and-resume, and every bad input. All on a tiny model
trained on the synthetic world."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from engineering import fileio
import fuse
import model as M
from engineering import checkpoints as C
from data.tokenizer import Tokenizer
from engineering import export_hf
from engineering import rundir as runstate
import evaluate
import train_expert
import trainer as T
from engineering.distributed import Dist
from data.streams import ExampleStream, PackedCorpusStream, split_corpus
from evaluation import baselines
from moe import moe_layers
from toy_world import FAST, ROOT, TINY, build_world



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("world"))


def run_fuse(world, out, *extra):
    argv = ["--base", world["base"], "--experts", ",".join(world["experts"]),
            "--data-dir", world["data"], "--out", str(out)] + FAST + list(extra)
    fuse.main(argv)
    return C.load_checkpoint(str(out))[0]


def state(path):
    return C.load_checkpoint(path)[0].state_dict()


def log_lines(out):
    with open(str(out) + ".train/log.jsonl") as f:
        return [json.loads(line) for line in f]


# ---- what trains and what stays frozen -----------------------------------------------------------


def test_stage1_changes_only_ffn_weights(world):
    base = state(world["base"])
    for path in world["experts"]:
        aligned = state(path)
        for k, v in base.items():
            if ".feed_forward." in k:
                assert not torch.equal(aligned[k], v), f"{path}: {k} did not train"
            else:
                assert torch.equal(aligned[k], v), f"{path}: frozen {k} changed"
    log = log_lines(world["experts"][0])
    assert [r["step"] for r in log] == [1, 2, 3, 4] and "val_loss" in log[-1] and log[-1]["mfu"] > 0


def test_mfu_stays_a_fraction_when_the_peak_is_too_low(world, tmp_path, capsys):
    """A peak measured in a busy moment (here: given absurdly low) must not print an MFU above 1:
    the achieved model FLOP/s is a lower bound of the peak, and the loop raises the peak to it."""
    assert T.mfu(5.0, 10.0) == 0.5 and T.mfu(30.0, 10.0) == 1.0
    out = tmp_path / "slow_peak"
    train_expert.main(["--init", world["base"], "--data", "honest", "--data-dir", world["data"],
                       "--out", str(out), "--steps", "3", "--peak-tflops", "1e-9"] + FAST)
    log = log_lines(out)
    assert log[0]["mfu"] == 1.0 and all(0 < r["mfu"] <= 1 for r in log)
    # the ETA: steps left x the last window's time per step, on the log and on every step line
    assert log[0]["eta_s"] > 0 and log[-1]["eta_s"] == 0
    assert re.search(r"^step 2/3 .* eta=\d\d:\d\d$", capsys.readouterr().out, re.M)
    assert T.compute_dtype(torch.device("cpu")) == torch.float32
    assert T.compute_dtype(torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(ValueError, match="--peak-tflops -1"):
        train_expert.main(["--init", world["base"], "--data", "honest", "--data-dir", world["data"],
                           "--out", str(tmp_path / "x"), "--peak-tflops", "-1"])


def test_real_datasets_train_offline_from_local_copies(world, tmp_path):
    """Stage 1 and stage 2 on local copies of the paper's datasets (generated files in the hub
    schemas): no hub, no network. A record file without 'task' fields is labelled with --task."""
    from data.real import write_fixtures

    fx = write_fixtures(str(tmp_path / "real"))
    common = ["--data-dir", world["data"], "--steps", "2"] + FAST
    out = tmp_path / "alpaca"
    train_expert.main(["--init", world["base"], "--data", "alpaca-small",
                       "--data-path", fx["alpaca"], "--out", str(out)] + common)
    assert C.load_checkpoint(str(out))[1].n_experts == 0 and log_lines(out)[-1]["step"] == 2
    train_expert.main(["--init", world["base"], "--data", fx["alpaca"], "--task", "helpful",
                       "--out", str(tmp_path / "file")] + common)
    pooled = (f"alpaca-small={fx['alpaca']},beavertails={fx['beavertails']},"
              f"truthfulqa={fx['truthfulqa_csv']}")
    fused = run_fuse(world, tmp_path / "fused_real", "--data", "real-pooled", "--data-path", pooled,
                     "--steps", "2")
    assert fused.params.n_experts == 3
    with pytest.raises(ValueError, match="no 'task' field"):
        train_expert.main(["--init", world["base"], "--data", fx["alpaca"],
                           "--out", str(tmp_path / "x")] + common)
    with pytest.raises(ValueError, match="--data-path .*only for the real datasets"):
        train_expert.main(["--init", world["base"], "--data", "honest", "--data-path", fx["alpaca"],
                           "--out", str(tmp_path / "y")] + common)
    with pytest.raises(ValueError, match="--task honest: only for --data FILE"):
        train_expert.main(["--init", world["base"], "--data", "alpaca-small", "--task", "honest",
                           "--out", str(tmp_path / "z")] + common)


def test_stage2_trains_router_and_experts_only(world, tmp_path):
    fused = run_fuse(world, tmp_path / "fused", "--steps", "3",
                     "--router-init", "zero").state_dict()
    base = state(world["base"])
    aligned = [state(p) for p in world["experts"]]
    for k, v in fused.items():
        if k.endswith("router.weight"):
            assert v.abs().sum() > 0, "router did not train from its zero init"
        elif ".feed_forward.w" in k:
            before = torch.stack([a[k + ".weight"] for a in aligned])
            assert not torch.equal(v, before), f"{k} did not train"
        else:
            assert torch.equal(v, base[k]), f"frozen {k} changed"
    only_router = run_fuse(world, tmp_path / "router", "--steps", "2", "--trainable", "router",
                           "--gamma", "0,0,0").state_dict()
    for k, v in only_router.items():
        if ".feed_forward.w" in k:  # experts are still exactly the aligned FFNs
            assert torch.equal(v, torch.stack([a[k + ".weight"] for a in aligned]))


def routing_on_held_out(model, world):
    """Per example, as L_G trains it (independent loop): p̄ = router softmax averaged over the
    example's real tokens and all layers. Returns (share of examples with argmax p̄ == task,
    mean -log p̄[task])."""
    from data.records import load_records
    from data.format import collate, encode_example

    tok = Tokenizer(os.path.join(world["base"], "tokenizer.model"))
    records = load_records("pooled", world["data"], "val")[::3]
    batch = collate([encode_example(tok, r, 64) for r in records])
    with torch.no_grad():
        model(batch["tokens"])
    layers = moe_layers(model)
    hits, nll = 0, 0.0
    for b in range(len(records)):
        real = batch["mask"][b]
        p_bar = sum(layer.router_probs[b][real].double().mean(0)
                    for layer in layers) / len(layers)  # [E]
        task = int(batch["task"][b])
        hits += int(p_bar.argmax()) == task
        nll -= math.log(float(p_bar[task]))
    return hits / len(records), nll / len(records)


def test_gating_loss_raises_routing_accuracy(world, tmp_path):
    common = ["--steps", "40", "--warmup", "2", "--lr", "3e-2", "--trainable", "router",
              "--router-init", "zero", "--batch-size", "16", "--gamma", "0,0,0"]
    without = run_fuse(world, tmp_path / "l0", *common, "--lambda-gate", "0")
    with_gate = run_fuse(world, tmp_path / "l1", *common, "--lambda-gate", "1")
    (acc0, nll0), (acc1, nll1) = (routing_on_held_out(without, world),
                                  routing_on_held_out(with_gate, world))
    assert acc1 > acc0 + 0.1, (acc0, acc1)
    assert nll1 < nll0 - 0.05, (nll0, nll1)  # L_G on held-out examples
    assert log_lines(tmp_path / "l1")[-1]["gate"] < log_lines(tmp_path / "l0")[-1]["gate"]


def expert_drift(fused_state, aligned_states, expert):
    sq = 0.0
    for k, v in fused_state.items():
        if ".feed_forward.w" in k:
            sq += float((v[expert] - aligned_states[expert][k + ".weight"]).pow(2).sum())
    return sq ** 0.5


def test_larger_gamma_keeps_that_expert_closer(world, tmp_path):
    aligned = [state(p) for p in world["experts"]]
    common = ["--steps", "8", "--lr", "1e-2", "--router-init", "zero", "--top-k", "3"]
    free = run_fuse(world, tmp_path / "g0", *common, "--gamma", "0,0,0").state_dict()
    held = run_fuse(world, tmp_path / "g1", *common, "--gamma", "0,50,0").state_dict()
    assert expert_drift(held, aligned, 1) < 0.5 * expert_drift(free, aligned, 1)
    # the others still move
    assert expert_drift(held, aligned, 0) > 0.5 * expert_drift(free, aligned, 0)
    assert log_lines(tmp_path / "g1")[-1]["reg"] > 0


# ---- what fuse.py and train_expert.py print when they end ---------------------------------


def summary_of(text: str) -> dict:
    """fuse.py's summary, read back: the saved line, {dimension: (gamma, drift, verdict)}, the two
    routing lines and the next command."""
    experts = {}
    for line in text.splitlines():
        found = re.match(r"^\s+(helpful|harmless|honest)  γ (\S+)\s+drift (\S+)\s+(.*)$", line)
        if found:
            name, gamma, drift, verdict = found.groups()
            experts[name] = (float(gamma), drift, verdict)
    lines = text.splitlines()
    routing = next(i for i, line in enumerate(lines) if line.startswith("routed right per example"))
    return {"experts": experts, "saved": [x for x in lines if x.startswith("fuse.py: saved")],
            "routing": lines[routing:routing + 2],
            "next": [x for x in lines if x.startswith("next: ")]}


def test_fuse_ends_with_what_gamma_did_matching_evaluates_drift_column(world, tmp_path, capsys):
    """A gamma that holds its expert prints "held", gamma 0 does not, a tiny gamma prints the drift;
    each drift is the one evaluate.py's results.json holds for the same checkpoint; then the next
    command."""
    out = tmp_path / "fused"
    capsys.readouterr()
    run_fuse(world, out, "--steps", "8", "--lr", "1e-2", "--router-init", "zero", "--top-k", "3",
             "--gamma", "0,50,0.001")
    printed = summary_of(capsys.readouterr().out)
    assert printed["saved"] == [f"fuse.py: saved the fused model (3 experts, top-3) to {out}"]
    helpful, harmless, honest = (printed["experts"][n] for n in ("helpful", "harmless", "honest"))
    assert harmless[2].startswith("held at its aligned weights by L_R")
    assert helpful[2].startswith("not held: γ = 0")
    assert honest[2].startswith("not held: the data pulls harder than γ")
    assert float(harmless[1]) < 0.2 * min(float(helpful[1]), float(honest[1]))
    assert "held-out examples" in printed["routing"][0] and printed["routing"][1].count("%") == 4
    command = printed["next"][0].removeprefix("next: ").split()
    assert command[:3] == ["python", "evaluate.py", str(out)]
    assert command[command.index("--baselines") + 1] == ",".join([world["base"]] + world["experts"])
    evaluated = tmp_path / "eval"
    evaluate.main([str(out), "--drift-from", ",".join(world["experts"]), "--data", world["data"],
                   "--out", str(evaluated), "--limit", "3", "--max-new-tokens", "2"])
    column = json.load(open(evaluated / "results.json"))["models"][0]["drift"]
    assert [helpful[1], harmless[1], honest[1]] == [f"{x:.3g}" for x in column]


def test_train_expert_ends_with_where_the_model_went_and_what_next(world, tmp_path, capsys):
    out = tmp_path / "helpful"
    capsys.readouterr()
    train_expert.main(["--init", world["base"], "--data", "helpful", "--data-dir", world["data"],
                       "--out", str(out), "--steps", "1"] + FAST)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3] == f"train_expert.py: saved the model trained on helpful to {out}"
    assert "Meta's LLaMA format" in lines[-2] and lines[-2].endswith(f"{out}.train/log.jsonl")
    experts = ",".join(str(tmp_path / n) for n in ("helpful", "harmless", "honest"))
    assert lines[-1].startswith(f"next: python fuse.py --base {world['base']} --experts {experts} ")


# ---- bad input stops before any compute ----------------------------------------------------------


def test_bad_fuse_arguments(world, tmp_path, capsys):
    def fails(*extra):
        with pytest.raises(SystemExit):
            run_fuse(world, tmp_path / "bad", *extra)
        return capsys.readouterr().err

    assert "2 values for 3 experts" in fails("--gamma", "0.1,0.3")
    assert "values must be finite numbers >= 0" in fails("--gamma", "0.1,-0.3,0.1")
    assert "values must be finite numbers >= 0" in fails("--gamma", "nan,0,0")
    assert "--lambda-gate nan: expected a finite number >= 0" in fails("--lambda-gate", "nan")
    assert "--top-k 4: expected 1 <= k <= 3" in fails("--top-k", "4")
    assert "--top-k 0" in fails("--top-k", "0")
    # default gamma 0.1 each: refused
    assert "frozen experts never drift" in fails("--trainable", "router")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        fuse.main(["--base", world["base"],
                   "--experts", f"{world['experts'][0]},nope,{world['experts'][2]}",
                   "--data-dir", world["data"], "--out", str(tmp_path / "x")])
    assert stop.value.code == 2 and "missing checkpoint(s): nope" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "bad") and not os.path.exists(tmp_path / "x")


def test_experts_from_another_base_are_refused(world, tmp_path):
    """Same architecture, but trained from another base (all weights differ; another
    tokenizer): not an H3Fusion expert. Refused before anything is written;
    --allow-foreign-experts fuses it anyway."""
    import shutil

    other_base = str(tmp_path / "other_base")
    train_expert.main(["--init", "scratch", "--data-dir", world["data"], "--out", other_base,
                       "--steps", "2", "--seed", "7"] + TINY + FAST)
    foreign = [world["experts"][0], other_base, world["experts"][2]]
    args = ["--base", world["base"], "--experts", ",".join(foreign), "--data-dir", world["data"],
            "--steps", "1"] + FAST
    with pytest.raises(ValueError, match="non-FFN weights differ from the base's"):
        fuse.main(args + ["--out", str(tmp_path / "f")])
    assert not os.path.exists(tmp_path / "f") and not os.path.exists(tmp_path / "f.train")
    shutil.copy(os.path.join(world["base"], "tokenizer.model"), str(tmp_path / "tok"))
    with open(os.path.join(other_base, "tokenizer.model"), "ab") as f:
        f.write(b"\0")  # another tokenizer file
    with pytest.raises(ValueError, match="tokenizer.model differs from the base's"):
        fuse.main(args + ["--out", str(tmp_path / "f")])
    shutil.copy(str(tmp_path / "tok"), os.path.join(other_base, "tokenizer.model"))
    fuse.main(args + ["--out", str(tmp_path / "f"), "--allow-foreign-experts"])
    assert C.load_checkpoint(str(tmp_path / "f"))[1].n_experts == 3


def test_bad_start_writes_nothing_and_foreign_out_is_never_touched(world, tmp_path):
    bad = tmp_path / "no_task.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    args = ["--init", world["base"], "--data-dir", world["data"], "--steps", "1"] + FAST
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="no 'task' field"):
        train_expert.main(args + ["--data", str(bad), "--out", str(out)])
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".train")
    # the rerun is not refused:
    train_expert.main(args + ["--data", "honest", "--out", str(out)])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match="not a checkpoint written by this project"):
            train_expert.main(args + ["--data", "honest", "--out", str(mine)] + extra)
    assert sorted(os.listdir(mine)) == ["notes.txt"] and not os.path.exists(str(mine) + ".train")


def test_aligned_model_with_another_config_is_refused(world, tmp_path):
    other = str(tmp_path / "other")
    train_expert.main(["--init", "scratch", "--data-dir", world["data"], "--out", other,
                       "--steps", "1", "--dim", "48", "--n-layers", "2", "--n-heads", "2",
                       "--multiple-of", "16"] + FAST)
    with pytest.raises(ValueError, match=r"other/params.json: dim=48, but the base .* has dim=32"):
        run_fuse(world, tmp_path / "f",
                 "--experts", f"{world['experts'][0]},{other},{world['experts'][2]}")


def test_fuse_takes_a_base_whose_params_json_says_vocab_minus_one(world, tmp_path):
    """Meta ships params.json with "vocab_size": -1, train_expert.py writes the
    resolved size: fuse.py compares the resolved configs, so Meta's own base fuses with
    the experts trained from it."""
    base = tmp_path / "base"
    shutil.copytree(world["base"], base)
    params = json.loads((base / "params.json").read_text())
    (base / "params.json").write_text(json.dumps(params | {"vocab_size": -1}))
    fused = run_fuse(world | {"base": str(base)}, tmp_path / "f", "--steps", "1")
    assert fused.params.n_experts == 3 and fused.params.vocab_size == params["vocab_size"] > 0


def test_train_expert_inits_from_a_hf_directory(world, tmp_path):
    """--init takes a Hugging Face directory (here the base, exported): stage 1 on it trains only
    the FFN, and every frozen weight comes out equal to the Meta-format base's, so the import gave
    back exactly its weights."""
    hf_base, out = str(tmp_path / "base-hf"), str(tmp_path / "helpful")
    export_hf.main([world["base"], hf_base])
    train_expert.main(["--init", hf_base, "--data", "helpful", "--data-dir", world["data"],
                       "--out", out, "--steps", "1", "--lr", "3e-3"] + FAST)
    base, aligned = state(world["base"]), state(out)
    assert all(torch.equal(aligned[k], v) != (".feed_forward." in k) for k, v in base.items())


def test_bad_datasets_and_existing_runs(world, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    args = ["--init", world["base"], "--data-dir", world["data"]] + FAST + ["--steps", "1"]
    with pytest.raises(ValueError, match="empty.jsonl"):
        train_expert.main(args + ["--data", str(empty), "--out", str(tmp_path / "a")])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"instruction": "hi", "task": 0}) + "\n")
    with pytest.raises(ValueError, match=r"broken.jsonl.*output"):
        train_expert.main(args + ["--data", str(broken), "--out", str(tmp_path / "b")])
    with pytest.raises(FileExistsError,
                       match="holds an earlier run; pass --resume .* or --overwrite"):
        train_expert.main(args + ["--data", "helpful", "--out", world["experts"][0]])
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_expert.main(args + ["--data", "helpful", "--out", str(tmp_path / "fresh"),
                                  "--resume"])


def test_a_local_file_trains(world, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {w}.", "input": "", "output": w,
                                        "task": 0}) + "\n"
                            for w in ("yes", "no", "maybe", "river")))
    train_expert.main(["--init", world["base"], "--data", str(path),
                       "--out", str(tmp_path / "mine"), "--steps", "2"] + FAST)
    assert C.load_checkpoint(str(tmp_path / "mine"))[1].dim == 32


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_state(world, tmp_path):
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match=r"step [1-9]\d*: non-finite"):
        train_expert.main(["--init", world["base"], "--data", "helpful",
                           "--data-dir", world["data"], "--out", out, "--steps", "20",
                           "--lr", "1e30", "--warmup", "0", "--grad-clip", "1e30",
                           "--save-every", "1"] + FAST)
    saved = torch.load(os.path.join(out + ".train", "state", "rank0.pt"), weights_only=True)
    assert saved["step"] >= 1 and not os.path.exists(os.path.join(out + ".train", "state.tmp"))


# ---- schedule, FLOPs -----------------------------------------------------------------------------


def test_lr_schedule_and_flops():
    lrs = [T.lr_at(s, 1.0, warmup=4, total=20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 0.1
    args = M.ModelArgs(dim=32, n_layers=2, n_heads=2, vocab_size=100, multiple_of=16)
    model = M.Transformer(args)
    n = sum(p.numel() for name, p in model.named_parameters()
            if p.dim() == 2 and "tok_embeddings" not in name)
    assert T.flops_per_token(model, 64) == 6 * n + 12 * 2 * 32 * 64
    for name, p in model.named_parameters():
        p.requires_grad = ".feed_forward." in name
    ffn = sum(p.numel() for name, p in model.named_parameters() if ".feed_forward." in name)
    assert T.flops_per_token(model, 64) == 4 * n + 2 * ffn + 12 * 2 * 32 * 64


def test_stream_is_the_same_for_any_world_size():
    examples = [torch.tensor([i]) for i in range(10)]
    stream = ExampleStream(examples, torch.stack, seed=3)
    one = [stream.batch(i, 4, Dist(0, 1)) for i in range(6)]
    two = [torch.cat([stream.batch(i, 4, Dist(r, 2)) for r in range(2)]) for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    seen = torch.cat(one[:5]).flatten().tolist()  # 20 draws = two epochs, each a permutation
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_packed_corpus_is_repacked_every_epoch_from_all_of_its_documents():
    # 20 documents of 3-6 distinct tokens
    documents = [[100 * d + t for t in range(3 + d % 4)] for d in range(20)]
    n_tokens, seq_len = sum(map(len, documents)), 11  # 90 tokens: 8 chunks an epoch
    stream = PackedCorpusStream(documents, seq_len, seed=3)
    n_chunks = (n_tokens - 1) // seq_len
    assert len(stream.examples) == n_chunks == 8
    one = [stream.batch(i, 4, Dist(0, 1)) for i in range(3 * n_chunks // 4)]  # three epochs
    two = [{k: torch.cat([stream.batch(i, 4, Dist(r, 2))[k] for r in range(2)]) for k in one[0]}
           for i in range(len(one))]
    # any world size, the same batches
    assert all(torch.equal(a[k], b[k]) for a, b in zip(one, two) for k in a)
    rows = torch.cat([b["tokens"] for b in one])  # [3 * n_chunks, seq_len]
    # targets = next tokens
    assert torch.equal(torch.cat([b["targets"] for b in one])[:, :-1], rows[:, 1:])
    epochs = [rows[e * n_chunks:(e + 1) * n_chunks] for e in range(3)]
    # each epoch: n_chunks * seq_len tokens of the corpus, none twice, its documents intact
    for chunks in epochs:
        tokens = chunks.flatten().tolist()
        assert (len(set(tokens)) == len(tokens)
                and set(tokens) <= {t for doc in documents for t in doc})
        # inside a chunk, a document's tokens follow each other in order
        for chunk in chunks.tolist():
            for a, b in zip(chunk, chunk[1:]):
                assert b == a + 1 or b % 100 == 0
    starts = [sorted(c[0] for c in chunks.tolist()) for chunks in epochs]
    assert starts[0] != starts[1] != starts[2]  # the documents are packed differently every epoch
    again = PackedCorpusStream(documents, seq_len, seed=3)
    assert all(torch.equal(again.batch(i, 4, Dist(0, 1))["tokens"], one[i]["tokens"])
               for i in (0, 3, 5))
    with pytest.raises(ValueError, match="empty corpus"):
        PackedCorpusStream([], seq_len, seed=0)


def test_the_held_out_corpus_is_its_last_documents_and_at_least_one_chunk():
    documents = [[d] * 4 for d in range(100)]  # 100 documents of 4 tokens
    train_docs, val = split_corpus(documents, seq_len=3)
    assert (train_docs == documents[:98]
            and [c.tolist() for c in val] == [[98] * 4, [98] + [99] * 3])  # 2 %
    # 2 documents are 8 tokens: one more is held out
    train_docs, val = split_corpus(documents, seq_len=9)
    assert (train_docs == documents[:97]
            and [c.tolist() for c in val] == [[97] * 4 + [98] * 4 + [99] * 2])
    with pytest.raises(ValueError, match="1 document"):
        split_corpus(documents[:1], seq_len=3)


# ---- multi-process and kill/resume (slow) --------------------------------------------------------


def torchrun(script, args, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", script] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_fsdp_two_ranks_follow_the_single_process_curve(world, tmp_path, capsys):
    common = ["--data-dir", world["data"], "--steps", "4"] + FAST
    train_expert.main(["--init", world["base"], "--data", "honest",
                       "--out", str(tmp_path / "e1")] + common)
    stage = torchrun("train_expert.py", ["--init", world["base"], "--data", "honest",
                                         "--out", str(tmp_path / "e2")] + common)
    fuse_args = ["--base", world["base"], "--experts", ",".join(world["experts"]),
                 "--gamma", "0.1,0.3,0.1"] + common
    capsys.readouterr()
    fuse.main(fuse_args + ["--out", str(tmp_path / "f1")])
    one = summary_of(capsys.readouterr().out)
    two = summary_of(torchrun("fuse.py", fuse_args + ["--out", str(tmp_path / "f2")]).stdout)
    assert_same_summary(one, two, str(tmp_path / "f2"), world["experts"])
    assert stage.stdout.count("train_expert.py: saved") == 1  # rank 0 alone
    for one, two in (("e1", "e2"), ("f1", "f2")):
        a, b = log_lines(tmp_path / one), log_lines(tmp_path / two)
        for key in ("lm", "gate", "reg", "val_loss"):  # val_loss is logged on the last step only
            steps_a = [r["step"] for r in a if key in r]
            # the same steps log the same terms
            assert steps_a == [r["step"] for r in b if key in r], key
            if steps_a:
                values_a, values_b = ([r[key] for r in a if key in r],
                                      [r[key] for r in b if key in r])
                assert values_a == pytest.approx(values_b, rel=1e-3, abs=1e-4), key
        sa, sb = state(str(tmp_path / one)), state(str(tmp_path / two))  # both load in one process
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4)


def assert_same_summary(one: dict, two: dict, out_two: str, experts: list):
    """fuse.py's summary in one process and from rank 0 alone of 2 ranks: the same verdicts and
    routing; drifts equal up to the runs' float differences, and rank 0's equal to evaluate.py's
    drift column (baselines.expert_drift) on the checkpoint the 2 ranks saved."""
    assert len(two["saved"]) == len(two["next"]) == 1  # printed once: by rank 0 alone
    assert [v[2] for v in one["experts"].values()] == [v[2] for v in two["experts"].values()]
    assert one["routing"] == two["routing"]  # every held-out example, counted once
    drift_one, drift_two = ([float(v[1]) for v in s["experts"].values()] for s in (one, two))
    assert drift_one == pytest.approx(drift_two, rel=1e-2)
    column = baselines.expert_drift(C.load_checkpoint(out_two)[0], [state(p) for p in experts])
    assert [v[1] for v in two["experts"].values()] == [f"{x:.3g}" for x in column]


def compile_runs(world) -> dict:
    """{kind: (script, its module, arguments)} for a 3-step dense and
    fused run of the test world."""
    common = ["--data-dir", world["data"], "--steps", "3"] + FAST
    return {"dense": ("train_expert.py", train_expert,
                      ["--init", world["base"], "--data", "honest"] + common),
            "fused": ("fuse.py", fuse,
                      ["--base", world["base"], "--experts", ",".join(world["experts"]),
                       "--gamma", "0.1,0.3,0.1"] + common)}


def assert_same_training(eager, compiled, kind):
    """The compiled run follows the eager one: every logged loss term, and the
    final weights (same names)."""
    a, b = log_lines(eager), log_lines(compiled)
    for key in ("lm", "gate", "reg"):
        if key in a[0]:
            assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-3, abs=1e-4), \
                (kind, key)
    sa, sb = state(str(eager)), state(str(compiled))
    assert sorted(sa) == sorted(sb)
    # as a whole: AdamW turns a float-rounding sign flip of a tiny gradient into a full step
    for k in sa:
        assert (sa[k] - sb[k]).norm() <= 1e-3 * sa[k].norm() + 1e-6, (kind, k)


@pytest.mark.slow
def test_compile_trains_the_same_model(world, tmp_path):
    """--compile (every block torch.compile'd in place) follows the eager run's losses and weights,
    dense and fused, and the checkpoint keeps its names (it loads like any other)."""
    for kind, (_, module, args) in compile_runs(world).items():
        module.main(args + ["--out", str(tmp_path / f"{kind}_eager")])
        module.main(args + ["--out", str(tmp_path / f"{kind}_compiled"), "--compile"])
        assert_same_training(tmp_path / f"{kind}_eager", tmp_path / f"{kind}_compiled", kind)


@pytest.mark.slow
def test_compile_under_torchrun_trains_the_same_model(world, tmp_path):
    """--compile with FSDP2 (2 gloo ranks; every block compiled after fully_shard): the same losses
    and weights as one eager process, dense and fused."""
    for kind, (script, module, args) in compile_runs(world).items():
        module.main(args + ["--out", str(tmp_path / f"{kind}_eager")])
        torchrun(script, args + ["--out", str(tmp_path / f"{kind}_compiled"), "--compile"])
        assert_same_training(tmp_path / f"{kind}_eager", tmp_path / f"{kind}_compiled", kind)


def test_resume_finds_the_newest_complete_state_after_a_kill_at_any_step_of_a_save(world, tmp_path,
                                                                                   capsys):
    """A save is: write state.tmp, mark it COMPLETE, state -> state.old, state.tmp -> state,
    delete state.old. Lay out what a kill between any two of those leaves (from two real saved
    states, at steps 2 and 4) and check that --resume continues from the newest complete one and
    that the next save works."""
    import shutil

    args = ["--init", world["base"], "--data", "honest", "--data-dir", world["data"]] + FAST
    run, done = str(tmp_path / "run"), str(tmp_path / "done")
    train_expert.main(args + ["--out", run, "--steps", "2"])
    train_expert.main(args + ["--out", done, "--steps", "4"])
    s2, s4 = str(tmp_path / "s2"), str(tmp_path / "s4")
    shutil.copytree(run + ".train/state", s2)
    shutil.copytree(done + ".train/state", s4)
    partial = str(tmp_path / "partial")  # a save killed while DCP was writing: no COMPLETE marker
    shutil.copytree(s4, partial)
    os.remove(os.path.join(partial, runstate.COMPLETE))
    layouts = {  # what is on disk -> the step resume must continue from
        "swap done, old not yet deleted": ({"state": s4, "state.old": s2}, 4),
        "killed between the two renames": ({"state.old": s2, "state.tmp": s4}, 4),
        "killed while writing state.tmp": ({"state": s2, "state.tmp": partial}, 2),
        "first save killed while writing": ({"state.tmp": partial}, None),
    }
    for what, (dirs, step) in layouts.items():
        shutil.rmtree(run + ".train")
        os.makedirs(run + ".train")
        shutil.copy(os.path.join(done + ".train", "run.json"), run + ".train")
        shutil.copy(os.path.join(done + ".train", "log.jsonl"), run + ".train")
        json.dump(dict(json.load(open(run + ".train/run.json")), out=run),
                  open(run + ".train/run.json", "w"))
        for name, src in dirs.items():
            shutil.copytree(src, os.path.join(run + ".train", name))
        if step is None:
            with pytest.raises(FileNotFoundError, match="nothing to resume"):
                train_expert.main(args + ["--out", run, "--steps", "5", "--resume"])
            continue
        with open(run + ".train/log.jsonl", "a") as f:
            f.write('{"step": 5, "lm": 0.1')  # a log line a kill cut short
        capsys.readouterr()
        train_expert.main(args + ["--out", run, "--steps", "5", "--resume"])
        assert f"resumed from step {step}" in capsys.readouterr().out, what
        assert [r["step"] for r in log_lines(run)] == list(range(1, 6)), what
        assert sorted(os.listdir(run + ".train")) == ["log.jsonl", "run.json", "state"], what
        assert torch.load(run + ".train/state/rank0.pt", weights_only=True)["step"] == 5, what


def test_resume_runs_no_code_from_the_run_directory(world, tmp_path):
    """DCP's .metadata is a pickle, and its optimizer hyper-parameters are torch.save'd
    with weights_only=False: a crafted run directory could run code on --resume. Both go
    through restricted loaders."""
    import io
    import pickle
    from types import SimpleNamespace

    marker = str(tmp_path / "pwned")

    class Payload:
        def __reduce__(self):
            return (open, (marker, "w"))

    args = ["--init", world["base"], "--data", "honest", "--data-dir", world["data"],
            "--steps", "2"] + FAST
    out = str(tmp_path / "run")
    train_expert.main(args + ["--out", out])
    with open(out + ".train/state/.metadata", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(ValueError, match=r"\.metadata: refusing io\.open"):
        train_expert.main(args + ["--out", out, "--resume", "--steps", "3"])
    assert not os.path.exists(marker)
    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    buffer.seek(0)
    _, planner = fileio.safe_dcp_reader_and_planner(out + ".train/state")
    with pytest.raises(ValueError, match="not loaded"):
        planner.load_bytes(
            SimpleNamespace(dest_index=SimpleNamespace(fqn="optim.param_groups.0.lr")), buffer)
    assert not os.path.exists(marker)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(world, tmp_path):
    args = ["train_expert.py", "--init", world["base"], "--data", "helpful",
            "--data-dir", world["data"], "--steps", "60", "--save-every", "5"] + FAST
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable] + args + ["--out", str(tmp_path / "straight")], cwd=ROOT,
                   check=True, capture_output=True, env=env)
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable] + args + ["--out", out], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = out + ".train/log.jsonl"
    while proc.poll() is None:  # kill -9 as soon as a few steps past the first saved state
        if os.path.exists(log) and sum(1 for _ in open(log)) >= 13:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not os.path.exists(os.path.join(out, "params.json"))  # it never got to write the model
    resumed = subprocess.run([sys.executable] + args + ["--out", out, "--resume"], cwd=ROOT,
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    step = re.search(r"resumed from step (\d+)", resumed.stdout + resumed.stderr)
    assert step and int(step.group(1)) in (10, 15, 20), resumed.stdout[-2000:]
    a, b = state(str(tmp_path / "straight")), state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the log, too, continues where it left off
    assert [r["step"] for r in log_lines(out)] == list(range(1, 61))
