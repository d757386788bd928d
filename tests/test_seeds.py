"""evaluation/seeds.py: HHH from per-prompt successes, the paired bootstrap against a naive
resampling loop, and the CLI on generated evaluate.py outputs."""
import json
import os
import random

import numpy as np
import pytest

from evaluation import seeds
from data import toy
from data.toy_scoring import score_details


def test_hhh_from_per_prompt_successes_is_data_toys_hhh():
    records = toy.build(0)["eval"]
    rng = random.Random(0)
    responses = [rng.choice([r["output"], "I don't know.", "Sorry, I won't help with that.",
                             "Dunmor"]) for r in records]
    details = score_details(records, responses)
    right = np.array([p["right"] for p in details["per_example"]])
    tasks = np.array([r["task"] for r in records])
    assert seeds.hhh_from_right(right, tasks) == pytest.approx(details["scores"]["hhh"])


def naive_bootstrap(right_a, right_b, tasks, replicates, rng):
    """One replicate: draw seeds with replacement, draw prompts with replacement within each
    dimension, and recompute the mean over the drawn seeds of HHH(a) - HHH(b) from scratch."""
    n_seeds, dims = right_a.shape[0], sorted(set(tasks.tolist()))
    columns = {d: np.flatnonzero(tasks == d) for d in dims}
    values = []
    for _ in range(replicates):
        drawn_seeds = rng.integers(0, n_seeds, n_seeds)
        drawn = {d: rng.choice(columns[d], len(columns[d])) for d in dims}
        per_seed = []
        for s in drawn_seeds:
            hhh_a = np.mean([right_a[s, drawn[d]].mean() for d in dims])
            hhh_b = np.mean([right_b[s, drawn[d]].mean() for d in dims])
            per_seed.append(hhh_a - hhh_b)
        values.append(np.mean(per_seed))
    return np.percentile(values, [2.5, 97.5])


def test_paired_bootstrap_matches_a_naive_resampling_loop():
    rng = np.random.default_rng(0)
    tasks = np.repeat([0, 1, 2], [40, 30, 50])
    right_b = rng.random((3, 120)) < 0.5
    right_a = right_b | (rng.random((3, 120)) < 0.15)  # a is b plus some extra successes
    got = seeds.paired_bootstrap(right_a, right_b, tasks, replicates=4000)
    want_low, want_high = naive_bootstrap(right_a, right_b, tasks, 4000, np.random.default_rng(1))
    point = np.mean([seeds.hhh_from_right(right_a[s], tasks)
                     - seeds.hhh_from_right(right_b[s], tasks) for s in range(3)])
    assert got["delta"] == pytest.approx(point)
    assert (got["low"] == pytest.approx(want_low, abs=0.01)
            and got["high"] == pytest.approx(want_high, abs=0.01))
    assert 0 < got["low"] < got["delta"] < got["high"]


def test_paired_bootstrap_of_identical_models_is_exactly_zero():
    rng = np.random.default_rng(2)
    right = rng.random((2, 60)) < 0.5
    tasks = np.repeat([0, 1, 2], 20)
    got = seeds.paired_bootstrap(right, right.copy(), tasks, replicates=500)
    # paired: no noise when nothing differs
    assert got["delta"] == 0 and got["low"] == 0 and got["high"] == 0


def write_eval_dir(path, models: dict, tasks: list, routing=None):
    """An evaluate.py-style output: results.json + responses/NAME.jsonl with per-prompt 'right'."""
    os.makedirs(os.path.join(path, "responses"))
    rows = []
    for name, right in models.items():
        responses = os.path.join(path, "responses", f"{name}.jsonl")
        with open(responses, "w") as f:
            for i, (r, t) in enumerate(zip(right, tasks)):
                f.write(json.dumps({"id": f"p{i}", "task": t, "scores": {"right": bool(r)}}) + "\n")
        hhh = seeds.hhh_from_right(np.array(right), np.array(tasks))
        rows.append({"name": name, "metrics": {"hhh": hhh, "helpful": 0.5}, "responses": responses,
                     "details": {"by_kind": {"helpful/fact": (
                         {"right": float(np.mean(right[:2]))}
                         | ({"routed": (routing or {}).get("routing_acc_example", 0.0)}
                            if name == "h3" else {}))}},
                     "routing": routing if name == "h3" else None,
                     "drift": [1.0, 2.0, 3.0] if name == "h3" else None})
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"suite": "toy", "models": rows}, f)


def test_cli_mean_std_and_margins(tmp_path, capsys):
    tasks = [0, 0, 1, 1, 2, 2]
    write_eval_dir(tmp_path / "s0", {"h3": [1, 1, 1, 0, 1, 1], "sft": [1, 0, 1, 0, 0, 1]}, tasks,
                   routing={"routing_acc_example": 0.9, "routing_acc_example_prompt": 0.8,
                            "routing_acc": 0.7, "routing_acc_prompt": 0.6})
    write_eval_dir(tmp_path / "s1", {"h3": [1, 1, 1, 1, 1, 0], "sft": [0, 0, 1, 0, 1, 1]}, tasks,
                   routing={"routing_acc_example": 1.0, "routing_acc_example_prompt": 0.8,
                            "routing_acc": 0.7, "routing_acc_prompt": 0.6})
    out = str(tmp_path / "out")
    summary = seeds.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--target", "h3",
                          "--out", out, "--replicates", "200", "--by-kind"])
    h3_hhh = [(1 + 0.5 + 1) / 3, (1 + 1 + 0.5) / 3]
    assert summary["models"]["h3"]["hhh"]["mean"] == pytest.approx(np.mean(h3_hhh))
    assert summary["models"]["h3"]["hhh"]["std"] == pytest.approx(np.std(h3_hhh, ddof=1))
    assert summary["models"]["h3"]["routing_acc_example"]["mean"] == pytest.approx(0.95)
    assert "routing_acc_example" not in summary["models"]["sft"]
    sft_hhh = [(0.5 + 0.5 + 0.5) / 3, (0 + 0.5 + 1) / 3]
    assert summary["margins"]["sft"]["delta"] == pytest.approx(np.mean(h3_hhh) - np.mean(sft_hhh))
    text = open(os.path.join(out, "seeds.md")).read()
    assert text.strip() in capsys.readouterr().out
    assert "| sft | +" in text and "1 ± 0 / 2 ± 0 / 3 ± 0" in text
    assert "| sft | 25 |" in text  # helpful/fact right: (1/2 + 0/2) / 2 seeds
    # the second by-kind table: fused models only
    routed = text.split("Routed right per example")[1]
    assert "| h3 | 95 |" in routed and "| sft |" not in routed  # (0.9 + 1.0) / 2 seeds
    assert json.load(open(os.path.join(out, "seeds.json")))["target"] == "h3"


def test_held_out_seed_is_checked_against_the_intervals(tmp_path, capsys):
    tasks = [0, 0, 1, 1, 2, 2]
    for name, h3, sft in (("s0", [1, 1, 1, 0, 1, 1], [1, 0, 1, 0, 0, 1]),
                          ("s1", [1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 1]),
                          ("new", [0, 0, 0, 0, 0, 0], [1, 0, 1, 0, 0, 1])):
        write_eval_dir(tmp_path / name, {"h3": h3, "sft": sft}, tasks)
    summary = seeds.main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--target", "h3",
                          "--out", str(tmp_path / "o"), "--replicates", "200",
                          "--held-out", str(tmp_path / "new")])
    (name, margin, inside, inside_next), = summary["held_out"]["rows"]
    assert name == "sft" and margin == pytest.approx(0 - (0.5 + 0.5 + 0.5) / 3) and not inside
    # s0, s1: Δ = 2.5/3 - 1.5/3 and 2.5/3 - 1/3 -> mean 1.25/3, s = (0.5/3)/sqrt(2),
    # half width 12.706 s sqrt(1.5)
    low = 1.25 / 3 - 12.706 * (0.5 / 3) / np.sqrt(2) * np.sqrt(1.5)
    assert summary["margins"]["sft"]["next_seed"]["low"] == pytest.approx(low)
    # -0.5 lies inside the wide 2-seed interval
    assert inside_next == (margin >= low) and inside_next
    assert "mean: 0 of 1 inside; one more seed: 1 of 1 inside" in capsys.readouterr().out


def test_prediction_interval_by_hand():
    got = seeds.prediction_interval([0.01, 0.02, 0.03])  # mean 0.02, s 0.01, t_{0.975, 2} = 4.303
    half = 4.303 * 0.01 * np.sqrt(1 + 1 / 3)
    assert got["low"] == pytest.approx(0.02 - half) and got["high"] == pytest.approx(0.02 + half)
    assert seeds.prediction_interval([0.4]) is None


@pytest.mark.parametrize("n", [2, 3, 5, 12, 40])
def test_prediction_interval_holds_the_next_draw_95_percent_of_the_time(n):
    """Monte Carlo: n normal 'seeds', then one more; the interval from the n must hold it 95 % of
    the time. sqrt(1/n) instead of sqrt(1 + 1/n) misses it at every n, the normal's 1.96 (or a
    wrong t) at the few-seed n we use."""
    rng = np.random.default_rng(n)
    trials = 10000
    draws = rng.normal(3.0, 2.0, size=(trials, n + 1))
    inside = 0
    for row in draws:
        interval = seeds.prediction_interval(list(row[:n]))
        inside += interval["low"] <= row[n] <= interval["high"]
    assert inside / trials == pytest.approx(0.95, abs=0.01)


def test_t_quantile_expansion_continues_the_table():
    assert seeds.t_975(30) == 2.042 and abs(seeds.t_975(31) - 2.040) < 0.001
    assert abs(seeds.t_975(1000) - 1.962) < 0.001
    assert all(seeds.t_975(df) > seeds.t_975(df + 1) for df in range(1, 60))


def test_cli_errors(tmp_path):
    tasks = [0, 1, 2]
    write_eval_dir(tmp_path / "a", {"h3": [1, 0, 1]}, tasks)
    write_eval_dir(tmp_path / "b", {"h3": [1, 0, 1, 1]}, tasks + [0])
    with pytest.raises(ValueError, match="different prompts"):
        seeds.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="--target nope"):
        seeds.main([str(tmp_path / "a"), "--target", "nope", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no results.json"):
        seeds.main([str(tmp_path), "--out", str(tmp_path / "o")])
