"""The synthetic world's design goals, measured on evaluate.py outputs of several seeds.

    python -m evaluation.world_goals runs/toy/eval runs/toy/seed1/eval runs/toy/seed2/eval
    python -m evaluation.world_goals --rows runs/toy/sweep/eval runs/toy/seed1/sweep/eval \
        runs/toy/seed2/sweep/eval

Prints mean [min, max] over the seeds of: the best aligned model's rate per kind of prompt, each
expert's well-formed share on its own dimension and its lead there over the other experts, the
helpful expert's harmful rate, the harmless expert's over-refusal, oracle / best single, h3fusion /
best single and the share of the gap to the oracle it closes, routing (these last three only where
every directory has an h3fusion row). --rows: per row, the dimension and kind rates (e.g. a gamma
sweep).
"""
import argparse
import json

import numpy as np

from engineering.cli import run_cli

EXPERTS, DIMS = ("helpful", "harmless", "honest"), ("helpful_dim", "harmless_dim", "honest_dim")


def load(dirs):
    return [{m["name"]: m for m in json.load(open(f"{d}/results.json"))["models"]} for d in dirs]


def spread(runs, f) -> str:
    v = [100 * f(r) for r in runs]
    return f"{np.mean(v):.1f} [{min(v):.1f}, {max(v):.1f}]"


def well_formed_on(model, dim: int) -> float:
    kinds = {k: v for k, v in model["details"]["by_kind"].items()
             if k.startswith(EXPERTS[dim] + "/")}
    return (sum(v["well_formed"] * v["n"] for v in kinds.values())
            / sum(v["n"] for v in kinds.values()))


def goals(runs):
    print("best aligned model's rate per kind:")
    for k in sorted(runs[0]["helpful"]["details"]["by_kind"]):
        print(f"  {k:26s}",
              spread(runs, lambda r: max(r[e]["details"]["by_kind"][k]["right"] for e in EXPERTS)))
    for i, e in enumerate(EXPERTS):
        lead = lambda r: r[e]["details"]["dimensions"][DIMS[i]] - max(  # noqa: E731
            r[o]["details"]["dimensions"][DIMS[i]] for o in EXPERTS if o != e)
        print(f"{e}: well formed on its dimension "
              f"{spread(runs, lambda r: well_formed_on(r[e], i))}, lead there {spread(runs, lead)}")
    best = lambda r: max(r[e]["metrics"]["hhh"] for e in EXPERTS)  # noqa: E731
    print("helpful expert harmful rate",
          spread(runs, lambda r: r["helpful"]["metrics"]["harmful"]))
    print("harmless expert over-refusal",
          spread(runs, lambda r: r["harmless"]["metrics"]["over_refusal"]))
    print("oracle / best single", spread(runs, lambda r: r["oracle"]["metrics"]["hhh"] / best(r)))
    # stage 1 only (evaluate.py --baselines): no fusion to measure
    if not all("h3fusion" in r for r in runs):
        return
    print("h3fusion / best single",
          spread(runs, lambda r: r["h3fusion"]["metrics"]["hhh"] / best(r)))
    print("gap to the oracle closed",
          spread(runs, lambda r: (r["h3fusion"]["metrics"]["hhh"] - best(r))
                 / (r["oracle"]["metrics"]["hhh"] - best(r))))
    print("h3fusion routing per example",
          spread(runs, lambda r: r["h3fusion"]["routing"]["routing_acc_example"]))


def rows(runs):
    for name in runs[0]:
        m = lambda f: spread(runs, lambda r: f(r[name]["details"]))  # noqa: E731
        print(name, {d: m(lambda x: x["dimensions"][d]) for d in DIMS},
              {k: m(lambda x: x["by_kind"][k]["right"])
               for k in ("harmless/benign", "harmless/harmful/novel")})


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m evaluation.world_goals", description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dirs", nargs="+")
    p.add_argument("--rows", action="store_true",
                   help="per-row dimension and kind rates instead of the goals")
    args = p.parse_args(argv)
    (rows if args.rows else goals)(load(args.eval_dirs))


if __name__ == "__main__":
    run_cli(main, "python -m evaluation.world_goals")
