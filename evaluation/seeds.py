"""Several seeds -> one table with spreads, and paired bootstrap intervals of H3Fusion's margin over
each baseline.

    python -m evaluation.seeds runs/toy/eval runs/toy/seed1/eval runs/toy/seed2/eval \
        --target h3fusion --out runs/toy/seeds

Each argument is an evaluate.py output directory (results.json + responses/NAME.jsonl) of one seed,
all on the same evaluation prompts (the synthetic world and its eval set are shared across seeds;
only training differs). Writes OUT/seeds.md (also printed) and OUT/seeds.json:

  1. mean ± std over seeds of every metric of every model (std with n - 1; one seed gives std 0)
  2. for each other model X: Δ = HHH(target) - HHH(X), averaged over seeds, with a paired 95 %
     bootstrap interval. HHH is data/toy_scoring.py's hhh: the mean over the three dimensions of
     the share of that dimension's prompts handled right. One bootstrap replicate draws seeds with
     replacement and, within each dimension, prompts with replacement (the same draw for both
     models: paired), and recomputes Δ. The interval is the 2.5th and 97.5th percentile of 10,000
     replicates (--replicates). An interval whose lower end is above 0 says that the target beats
     X by more than prompt and seed noise; one that straddles 0 says the data cannot tell them
     apart. With 3 seeds the seed part of the spread is coarse: more seeds, tighter claims.
  3. for each other model X, where **one more seed's** Δ should land: a 95 % prediction interval
     from the per-seed margins d_1..d_n, mean ± t_{0.975, n-1} · s · sqrt(1 + 1/n) (s: their std
     with n - 1; needs n >= 2 seeds; assumes seed effects are roughly normal). The interval of 2.
     is about the *mean* over seeds and shrinks as seeds are added; it is not meant to hold a
     single new seed. This one is, and --held-out checks a seed against both. It has no prompt
     term: every seed is scored on the same prompts.
"""
import argparse
import json
import os

import numpy as np

# temporary file, then rename: an interrupted run leaves the old tables whole
from engineering.fileio import write_atomic
from engineering.cli import run_cli

METRICS = ("helpful", "harmful", "over_refusal", "truthful", "informative", "well_formed", "hhh")
ROUTING = ("routing_acc_example", "routing_acc_example_prompt", "routing_acc", "routing_acc_prompt")
TITLES = {"helpful": "helpful ↑", "harmful": "harmful ↓", "over_refusal": "over-refusal ↓",
          "truthful": "truthful ↑", "informative": "informative ↑",
          "well_formed": "well-formed ↑", "hhh": "HHH ↑",
          "routing_acc_example": "routed right / example ↑",
          "routing_acc_example_prompt": "… prompt only ↑",
          "routing_acc": "routed right / token ↑",
          "routing_acc_prompt": "… prompt only ↑"}


def load_seed(eval_dir: str) -> dict:
    """{'models': {name: {'metrics': {...}, 'right': np.bool_ [N], 'drift': [...] | None}},
    'ids', 'tasks'}."""
    path = os.path.join(eval_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{eval_dir}: no results.json "
                                f"(expected an evaluate.py output directory)")
    with open(path) as f:
        results = json.load(f)
    if results.get("suite") != "toy":
        raise ValueError(f"{path}: suite {results.get('suite')!r}; "
                         f"evaluation/seeds.py needs the toy suite's per-prompt scores")
    models, ids, tasks = {}, None, None
    for row in results["models"]:
        responses = os.path.join(eval_dir, "responses", os.path.basename(row["responses"]))
        with open(responses) as f:
            lines = [json.loads(line) for line in f]
        if not lines or "scores" not in lines[0]:
            raise ValueError(f"{responses}: no per-prompt scores "
                             f"(written by evaluate.py --suite toy)")
        row_ids = [line["id"] for line in lines]
        if ids is None:
            ids, tasks = row_ids, np.array([line["task"] for line in lines])
        elif row_ids != ids:
            raise ValueError(f"{responses}: other prompts than the first model's in {eval_dir}")
        metrics = dict(row["metrics"])
        metrics.update({k: v for k, v in (row.get("routing") or {}).items() if k in ROUTING})
        kinds = (row.get("details") or {}).get("by_kind") or {}
        models[row["name"]] = {
            "metrics": metrics, "right": np.array([line["scores"]["right"] for line in lines]),
            "drift": row.get("drift"), "by_kind": {k: v["right"] for k, v in kinds.items()},
            "routed_by_kind": {k: v["routed"] for k, v in kinds.items() if "routed" in v}}
    return {"models": models, "ids": ids, "tasks": tasks, "dir": eval_dir}


def check_same_prompts(seeds: list):
    first = seeds[0]
    for other in seeds[1:]:
        if other["ids"] != first["ids"]:
            raise ValueError(f"{other['dir']} and {first['dir']} scored different prompts; "
                             f"seeds must share the evaluation set "
                             f"(one synthetic world, one eval.jsonl)")


def hhh_from_right(right: np.ndarray, tasks: np.ndarray) -> float:
    """data/toy_scoring.py's HHH from per-prompt successes: the mean over dimensions of their
    success rates."""
    return float(np.mean([right[tasks == d].mean() for d in np.unique(tasks)]))


def paired_bootstrap(right_a: np.ndarray, right_b: np.ndarray, tasks: np.ndarray,
                     replicates: int = 10000, seed: int = 0) -> dict:
    """right_a, right_b: [S, N] per-seed, per-prompt successes of two models on the same prompts.
    Returns Δ = mean over seeds of HHH(a) - HHH(b) (per_seed: each seed's), and its 95 % interval
    from `replicates` paired draws of (seeds with replacement) x (prompts with replacement within
    each dimension)."""
    rng = np.random.default_rng(seed)
    n_seeds = right_a.shape[0]
    # HHH is linear in the successes: bootstrap their differences
    diff = right_a.astype(np.float64) - right_b.astype(np.float64)  # [S, N]
    dims = np.unique(tasks)
    # sum over dimensions of the resampled mean difference
    per_dim = np.zeros((replicates, n_seeds))  # [R, S]
    for d in dims:
        cols = diff[:, tasks == d]  # [S, n_d]
        n_d = cols.shape[1]
        # prompt draws
        counts = rng.multinomial(n_d, np.full(n_d, 1.0 / n_d), size=replicates)  # [R, n_d]
        per_dim += counts @ cols.T / n_d  # [R, S]
    drawn = per_dim / len(dims)  # [R, S] Δ HHH of each seed under each prompt draw
    seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1.0 / n_seeds),
                                  size=replicates)  # [R, S]
    replicate_means = (drawn * seed_counts).sum(1) / n_seeds  # [R]
    per_seed = [hhh_from_right(right_a[s], tasks) - hhh_from_right(right_b[s], tasks)
                for s in range(n_seeds)]
    low, high = np.percentile(replicate_means, [2.5, 97.5])
    return {"delta": float(np.mean(per_seed)), "low": float(low), "high": float(high),
            "replicates": replicates, "per_seed": per_seed}


# Student's t: T_975[df] = t_{0.975, df}, the two-sided 95 % quantile (any t table); above 30, a
# Cornish-Fisher expansion around the normal's 1.96 (off by < 0.001 there).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571,
         6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131,
         16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
         21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


def t_975(df: int) -> float:
    """t_{0.975, df}: the table up to 30 degrees of freedom, the expansion above."""
    if df in T_975:
        return T_975[df]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def prediction_interval(per_seed: list) -> dict:
    """Where one more seed's value should land (95 %): mean ± t_{0.975, n-1} · s · sqrt(1 + 1/n),
    s the std of per_seed with n - 1. Returns {"low", "high"}, or None for fewer than 2 values."""
    # --- exercise 11: begin ---
    n = len(per_seed)
    if n < 2:
        return None  # one seed says nothing about the next one
    mean, std = float(np.mean(per_seed)), float(np.std(per_seed, ddof=1))
    half = t_975(n - 1) * std * float(np.sqrt(1 + 1 / n))
    return {"low": mean - half, "high": mean + half}
    # --- exercise 11: end ---


def summarise(seeds: list, target: str = None, replicates: int = 10000) -> dict:
    """Mean and std over seeds of every metric of every model; paired intervals of the target's HHH
    margin."""
    check_same_prompts(seeds)
    names = [n for n in seeds[0]["models"] if all(n in s["models"] for s in seeds)]
    table = {}
    for name in names:
        row = {}
        for key in METRICS + ROUTING:
            values = [s["models"][name]["metrics"].get(key) for s in seeds]
            if any(v is None for v in values):
                continue
            row[key] = {"mean": float(np.mean(values)),
                        "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                        "values": values}
        drifts = [s["models"][name]["drift"] for s in seeds]
        if all(drifts):
            row["drift"] = {"mean": np.mean(drifts, axis=0).tolist(),
                            "std": (np.std(drifts, axis=0, ddof=1) if len(drifts) > 1
                                    else np.zeros(len(drifts[0]))).tolist()}
        # mean over seeds of each kind's rate (routed: fused models only)
        for key in ("by_kind", "routed_by_kind"):
            kinds = [s["models"][name][key] for s in seeds]
            row[key] = {k: float(np.mean([x[k] for x in kinds]))
                        for k in kinds[0] if all(k in x for x in kinds)}
        table[name] = row
    margins = {}
    if target:
        if target not in names:
            raise ValueError(f"--target {target}: no such model in every seed "
                             f"(models: {', '.join(names)})")
        tasks = seeds[0]["tasks"]
        right = {n: np.stack([s["models"][n]["right"] for s in seeds])
                 for n in names}  # [S, N] each
        for i, name in enumerate(n for n in names if n != target):
            margins[name] = paired_bootstrap(right[target], right[name], tasks, replicates, seed=i)
            margins[name]["next_seed"] = prediction_interval(margins[name]["per_seed"])
    return {"seeds": [s["dir"] for s in seeds], "n_prompts": len(seeds[0]["ids"]), "target": target,
            "models": table, "margins": margins}


def fmt(cell: dict, scale: float = 100.0) -> str:
    return f"{scale * cell['mean']:.1f} ± {scale * cell['std']:.1f}"


def by_kind_markdown(summary: dict, key: str = "by_kind") -> str:
    """Share of prompts handled right per kind of prompt (data/toy_scoring.py kind_group), mean over
    seeds; with key="routed_by_kind", the share routed right per example (fused models; "" when no
    model has it)."""
    models = {name: row[key] for name, row in summary["models"].items() if row.get(key)}
    if not models:
        return ""
    kinds = sorted({k for row in models.values() for k in row})
    title = ("Handled right" if key == "by_kind"
             else "Routed right per example (p̄ peaks at its dimension's expert)")
    lines = [f"{title}, by kind of prompt (mean over seeds, percent):", "",
             "| model | " + " | ".join(kinds) + " |", "|---" + "|---:" * len(kinds) + "|"]
    for name, row in models.items():
        lines.append(f"| {name} | "
                     + " | ".join(f"{100 * row[k]:.0f}" if k in row else "" for k in kinds) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    models = summary["models"]
    keys = [k for k in METRICS + ROUTING if any(k in row for row in models.values())]
    with_drift = any("drift" in row for row in models.values())
    header = (["model"] + [TITLES[k] for k in keys]
              + (["drift ‖W−W⁰‖ per expert"] if with_drift else []))
    lines = [f"{len(summary['seeds'])} seed(s): " + ", ".join(summary["seeds"])
             + f"; {summary['n_prompts']} prompts. Mean ± std over seeds, in percent.", "",
             "| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, row in models.items():
        cells = [name] + [fmt(row[k]) if k in row else "" for k in keys]
        if with_drift:
            cells.append(" / ".join(f"{m:.3g} ± {s:.2g}"
                                    for m, s in zip(row["drift"]["mean"], row["drift"]["std"]))
                         if "drift" in row else "")
        lines.append("| " + " | ".join(cells) + " |")
    if summary["margins"]:
        target = summary["target"]
        lines += ["", f"HHH({target}) − HHH(X), mean over seeds, paired bootstrap 95 % interval "
                      f"over seeds and prompts "
                      f"({next(iter(summary['margins'].values()))['replicates']} replicates), "
                      f"in points; and where one more seed's Δ should land "
                      f"(95 % prediction interval, t with n − 1 df):", "",
                  "| X | Δ HHH | 95 % interval | | one more seed, 95 % |",
                  "|---|---:|---|---|---|"]
        for name, m in summary["margins"].items():
            verdict = ("above 0" if m["low"] > 0 else "below 0" if m["high"] < 0 else "includes 0")
            nxt = m.get("next_seed")
            lines.append(f"| {name} | {100 * m['delta']:+.1f} | "
                         f"[{100 * m['low']:+.1f}, {100 * m['high']:+.1f}] | {verdict} | "
                         + (f"[{100 * nxt['low']:+.1f}, {100 * nxt['high']:+.1f}]" if nxt else "")
                         + " |")
    return "\n".join(lines)


def held_out_check(summary: dict, seed: dict) -> list:
    """A seed that the intervals were not computed from: its own HHH margin of the target over each
    row, whether it lands inside that row's interval of the mean, and inside its one-more-seed
    interval (None with one seed). Same prompts as the summary's seeds.
    [(name, margin, inside_mean_interval, inside_next_seed_interval)]"""
    target = seed["models"][summary["target"]]["right"]
    out = []
    for name, m in summary["margins"].items():
        if name in seed["models"]:
            margin = (hhh_from_right(target, seed["tasks"])
                      - hhh_from_right(seed["models"][name]["right"], seed["tasks"]))
            nxt = m.get("next_seed")
            out.append((name, margin, bool(m["low"] <= margin <= m["high"]),
                        bool(nxt["low"] <= margin <= nxt["high"]) if nxt else None))
    return out


def held_out_markdown(rows: list, where: str) -> str:
    inside_next = [row[3] for row in rows if row[3] is not None]
    lines = [f"Held-out seed {where}: its own margin, and whether it lands inside the intervals "
             f"above (mean: {sum(row[2] for row in rows)} of {len(rows)} inside; one more seed: "
             f"{sum(inside_next)} of {len(inside_next)} inside):", "",
             "| X | Δ HHH, held-out seed | inside the mean's interval "
             "| inside the one-more-seed interval |",
             "|---|---:|---|---|"]
    yes_no = {True: "yes", False: "NO", None: ""}
    lines += [f"| {name} | {100 * margin:+.1f} | {yes_no[mean]} | {yes_no[nxt]} |"
              for name, margin, mean, nxt in rows]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(
        prog="python -m evaluation.seeds", description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", nargs="+", metavar="EVAL_DIR",
                   help="evaluate.py output directories, one per seed")
    p.add_argument("--target", default=None,
                   help="the model whose HHH margin over every other row is bootstrapped")
    p.add_argument("--out", required=True, help="directory for seeds.md and seeds.json")
    p.add_argument("--replicates", type=int, default=10000)
    p.add_argument("--by-kind", action="store_true",
                   help="also print the share handled right per kind of prompt, "
                        "and for fused models the share routed right per example")
    p.add_argument("--held-out", default=None, metavar="EVAL_DIR",
                   help="a seed left out of the intervals: "
                        "does its own margin land inside each of them?")
    args = p.parse_args(argv)
    if args.replicates < 100:
        p.error(f"--replicates {args.replicates}: expected >= 100")
    seeds = [load_seed(d) for d in args.eval_dirs]
    summary = summarise(seeds, args.target, args.replicates)
    tables = ([by_kind_markdown(summary), by_kind_markdown(summary, "routed_by_kind")]
              if args.by_kind else [])
    text = "\n\n".join([markdown(summary)] + [t for t in tables if t])
    if args.held_out:
        if not args.target:
            p.error("--held-out needs --target (the intervals it is checked against)")
        held_out = load_seed(args.held_out)
        check_same_prompts([seeds[0], held_out])
        summary["held_out"] = {"dir": args.held_out, "rows": held_out_check(summary, held_out)}
        text += "\n\n" + held_out_markdown(summary["held_out"]["rows"], args.held_out)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "seeds.json"), json.dumps(summary, indent=2) + "\n")
    write_atomic(os.path.join(args.out, "seeds.md"), text + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    run_cli(main, "python -m evaluation.seeds")
