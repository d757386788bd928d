"""The report of one evaluation: results.json (everything), results.md (the table and what each
column means), and, when matplotlib is importable, plots.

  json_ready      NaN / inf (a mean over zero examples) -> None: strict JSON has no NaN
  results_table   the markdown table: one row per model, the suite's columns (TOY_COLUMNS or
                  REAL_COLUMNS) in percent, routing accuracy (routing.py) and expert drift
                  (baselines.expert_drift), and a legend
  plot_results    scores.png (three scores per model) and routing_NAME.png (top-1 expert usage per
                  layer)
  main            the plots of an evaluation drawn again from its results.json:
                      python -m evaluation.report runs/toy/eval --out docs --models h3fusion
                  (matplotlib is not a dependency of the project: `pip install matplotlib` first)
"""
import argparse
import json
import math
import os
import re
from typing import Optional

import torch

from data import TASK_NAMES
from engineering.cli import run_cli

# --------------------------------------------------------------------------------------------------
# The table's columns: metric key -> title (the arrow says which way is better)

TOY_COLUMNS = [("helpful", "helpful ↑"), ("harmful", "harmful ↓"),
               ("over_refusal", "over-refusal ↓"), ("truthful", "truthful ↑"),
               ("informative", "informative ↑"), ("well_formed", "well-formed ↑"),
               ("hhh", "HHH ↑")]
REAL_COLUMNS = [("tqa_mc1", "TQA MC1 ↑"), ("tqa_mc2", "TQA MC2 ↑"),
                ("tqa_rougeL_acc", "TQA ROUGE-L acc ↑"), ("tqa_bleu_acc", "TQA BLEU acc ↑"),
                ("bt_harmful_detector", "harmful (detector) ↓"),
                ("bt_harmful_judge", "harmful (judge) ↓"),
                ("alpaca_win_judge", "win rate (judge) ↑")]
JUDGED = {"bt_harmful_judge", "alpaca_win_judge"}


def json_ready(obj):
    """Replace NaN/inf floats (means over zero examples) by None, recursively: strict JSON has no
    NaN."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def format_cell(value, key: str, judge_name: Optional[str]) -> str:
    if value is None:
        return "n/a (no judge)" if key in JUDGED and judge_name is None else "n/a"
    return f"{100 * value:.1f}"


def results_table(results: dict) -> str:
    """The markdown comparison table, with a legend under it."""
    columns = TOY_COLUMNS if results["suite"] == "toy" else REAL_COLUMNS
    judge = results.get("judge")
    judge_name = judge["name"] if judge else None
    titles = [title.replace("(judge)", f"(judge: {judge_name})") if judge_name else title
              for _, title in columns]
    with_drift = any(row.get("drift") for row in results["models"])
    header = (["model", "kind"] + titles + ["routed right: per example ↑", "per token ↑"]
              + (["drift ‖W−W⁰‖ per expert"] if with_drift else []))
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in results["models"]:
        cells = [row["name"], row["kind"]] + [format_cell(row["metrics"].get(k), k, judge_name)
                                              for k, _ in columns]
        routing = row.get("routing") or {}
        for whole, prompt in (("routing_acc_example", "routing_acc_example_prompt"),
                              ("routing_acc", "routing_acc_prompt")):
            cells.append(f"{format_cell(routing[whole], whole, None)} / "
                         f"{format_cell(routing[prompt], prompt, None)}"
                         if routing.get(whole) is not None else "")
        if with_drift:
            cells.append(" / ".join(f"{x:.3g}" for x in row["drift"]) if row.get("drift") else "")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Suite: {results['suite']} (data: {results['data']}). "
                 "All numbers are percentages.")
    if results["suite"] == "toy":
        lines.append("Scores: exact scorers of the synthetic world "
                     "(data/toy_scoring.py score_all); HHH = its combined score.")
    else:
        lines.append("TQA MC1/MC2: TruthfulQA multiple choice by log-likelihood. "
                     "ROUGE-L/BLEU acc: share of answers closer to a true than to a false "
                     "reference. harmful (detector): no refusal phrase in the answer.")
        lines.append(f"Judge: {judge['name']} ({judge['path']}) produced the columns marked "
                     f"(judge), reading P(' A') vs P(' B') with both option orders averaged."
                     if judge else "No --judge given: the (judge) columns are n/a.")
        for name, why in results.get("skipped_sets", {}).items():
            lines.append(f"n/a: {name} could not be loaded ({why.splitlines()[0][:200]}).")
    lines.append("routed right (fused models), as 'all tokens / prompt tokens only': "
                 "per example = share of examples whose router distribution averaged over their "
                 "tokens and layers (p̄, what L_G trains) peaks at the expert of their dimension; "
                 "per token = share of (token, layer) pairs whose top-1 expert is it.")
    if with_drift:
        lines.append("drift: per expert, sum over its matrices of ||W_i - W_i^0||_F averaged over "
                     "layers (L_R's distance), W_i^0 = the aligned model it was built from.")
    if any(row["kind"] == "oracle" for row in results["models"]):
        lines.append("oracle: every prompt answered by the model (or expert) of its own dimension, "
                     "the score of a perfect router.")
    return "\n".join(lines)


def plot_results(results: dict, out_dir: str) -> list:
    """scores.png (three scores per model) and routing_NAME.png (top-1 usage per layer x expert, one
    panel per dimension) when matplotlib is importable; returns the written paths ([] without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    if results["suite"] == "toy":
        three = [("helpful", "helpful", False), ("harmless = 1 - harmful", "harmful", True),
                 ("truthful", "truthful", False)]
    else:
        three = [("AlpacaEval win (judge)", "alpaca_win_judge", False),
                 ("harmless = 1 - harmful (detector)", "bt_harmful_detector", True),
                 ("TruthfulQA MC2", "tqa_mc2", False)]
    names = [m["name"] for m in results["models"]]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(names) + 2), 4), constrained_layout=True)
    width = 0.8 / len(three)
    for j, (label, key, flip) in enumerate(three):
        values = [m["metrics"].get(key) for m in results["models"]]
        values = [float("nan") if v is None else 100 * (1 - v if flip else v) for v in values]
        ax.bar([i + (j - 1) * width for i in range(len(names))], values, width, label=label)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(f"{results['suite']} suite: higher is better")
    path = os.path.join(out_dir, "scores.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    for m in results["models"]:
        routing = m.get("routing")
        if not routing:
            continue
        dims = list(routing["usage_top1"])
        fig, axes = plt.subplots(1, len(dims), figsize=(3.2 * len(dims) + 1, 3.5), squeeze=False,
                                 constrained_layout=True)
        for ax, dim in zip(axes[0], dims):
            usage = torch.tensor(routing["usage_top1"][dim])  # [L, E]
            n_layers, n_experts = usage.shape
            image = ax.imshow(usage.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for layer in range(n_layers):
                for e in range(n_experts):
                    ax.text(e, layer, f"{100 * usage[layer, e]:.0f}", ha="center", va="center",
                            fontsize=7, color="white" if usage[layer, e] < 0.6 else "black")
            ax.set_title(f"{dim} prompts", fontsize=9)
            ax.set_xlabel("expert")
            ax.set_ylabel("layer")
            ax.set_yticks(range(n_layers))
            ax.set_xticks(range(n_experts), [TASK_NAMES[e] if e < len(TASK_NAMES) else str(e)
                                             for e in range(n_experts)], fontsize=7)
        fig.colorbar(image, ax=axes[0].tolist(), label="share of tokens (top-1)")
        fig.suptitle(f"{m['name']}: router top-1 expert usage")
        path = os.path.join(out_dir, f"routing_{re.sub(r'[^A-Za-z0-9_.-]', '_', m['name'])}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m evaluation.report",
        description="Draw an evaluation's plots again from its results.json.")
    p.add_argument("eval_dir", help="an evaluate.py output directory (results.json)")
    p.add_argument("--out", default=None, help="where the PNGs go (default: EVAL_DIR)")
    p.add_argument("--models", default=None, metavar="NAME,...",
                   help="only these rows (default: every row)")
    args = p.parse_args(argv)
    path = os.path.join(args.eval_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected an evaluate.py output directory)")
    with open(path) as f:
        results = json.load(f)
    if args.models:
        names = args.models.split(",")
        unknown = sorted(set(names) - {m["name"] for m in results["models"]})
        if unknown:
            raise ValueError(f"--models {args.models}: {path} has no row {unknown}; it has "
                             f"{[m['name'] for m in results['models']]}")
        results["models"] = [m for m in results["models"] if m["name"] in names]
    os.makedirs(args.out or args.eval_dir, exist_ok=True)
    written = plot_results(results, args.out or args.eval_dir)
    if not written:
        raise ValueError("matplotlib is not installed (it is not a dependency of this project): "
                         "pip install matplotlib")
    print("wrote", ", ".join(written))


if __name__ == "__main__":
    run_cli(main, "python -m evaluation.report")
