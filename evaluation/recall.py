"""Does a model know the synthetic world's facts? Greedy completion of each fact's answer sentence,
cut before the value ("Grouru lives in" -> "Brisa"), for every person and attribute, as a share per
split and attribute.

    python -m evaluation.recall runs/toy/base [--data runs/toy/data]

No question and no instruction format: this reads what pretraining stored, before any alignment. A
fact the base cannot complete is one no FFN-only fine-tune (stage 1) can retrieve when asked. A
misconception is completed with the false town, as the corpus states it; "truth after the myth" is
the truth completed after the correction's own opening
("People say that X was born in A, but in fact X was born in" -> B).
"""
import argparse
import json
import os

import torch

from data.tokenizer import Tokenizer
from data.toy import correction_answer
from data.toy_tables import ALL_ATTRIBUTES
from evaluation.generation import generate_responses
from engineering.checkpoints import load_checkpoint
from engineering.cli import run_cli


def recall_items(world: dict) -> list:
    """(prompt, split, attribute, expected value) for every person and attribute of the world, and
    one more per misconception: the truth after the myth is named."""
    items = []
    for p in world["people"]:
        for attr, spec in ALL_ATTRIBUTES.items():
            myth = p["myth"] is not None and p["myth"]["attr"] == attr
            value = p["myth"]["false"] if myth else p["attrs"][attr]
            prompt = spec.answer.split("{v}")[0].format(n=p["name"]).rstrip()  # "Grouru lives in"
            items.append((prompt, p["split"], attr + " (myth)" * myth, value))
            # the honest answer cut before the truth:
            # "People say that ..., but in fact Grouru was born in"
            if myth:
                correction, truth = correction_answer(p), p["attrs"][attr]
                opening = correction[:correction.rindex(truth)].rstrip()
                items.append((opening, p["split"], "truth after the myth", truth))
    return items


def recall_rates(items: list, completions: list) -> dict:
    """{(split, attribute): (right, n)}: right when the completion's first word is the expected
    value."""
    rates = {}
    for (_, split, attr, value), text in zip(items, completions, strict=True):
        words = text.split()
        right, n = rates.get((split, attr), (0, 0))
        rates[(split, attr)] = (right + int(bool(words)
                                            and words[0].strip(".,").lower() == value.lower()),
                                n + 1)
    return rates


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m evaluation.recall", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a dense checkpoint directory (the base, or any aligned model)")
    p.add_argument("--data", default="runs/toy/data",
                   help="the world's directory (world.json, tokenizer.model)")
    args = p.parse_args(argv)
    with open(os.path.join(args.data, "world.json"), encoding="utf-8") as f:
        world = json.load(f)
    model, _ = load_checkpoint(args.ckpt)
    tokenizer = Tokenizer(os.path.join(args.data, "tokenizer.model"))
    items = recall_items(world)
    with torch.no_grad():
        completions = generate_responses(model.eval(), tokenizer,
                                         [prompt for prompt, *_ in items], 3)[2]
    rates = recall_rates(items, completions)
    for split in ("train", "eval"):
        mine = sorted((attr, counts) for (where, attr), counts in rates.items() if where == split)
        cells = [f"{attr} {100 * right / n:.0f}" for attr, (right, n) in mine]
        # not the truths after a myth
        plain = [counts for attr, counts in mine if attr in ALL_ATTRIBUTES]
        total = 100 * sum(right for right, _ in plain) / sum(n for _, n in plain)
        print(f"{split} people: facts completed right {total:.0f} % ({', '.join(cells)})")


if __name__ == "__main__":
    run_cli(main, "python -m evaluation.recall")
