"""The summary files of a synthetic world (data/toy.py write_world): manifest.json (sizes, token
counts, eval kinds; written last, it marks the directory complete) and the world's README.md.
"""
import json
import os

from data import TASK_NAMES
from data.format import format_prompt
from data.tokenizer import Tokenizer


def world_manifest(tmp, data, sizes, seed, vocab_size) -> dict:
    """What a world in directory tmp holds (data: data.toy.build's, sizes: records per file),
    JSON-ready and deterministic (no timings)."""
    tok = Tokenizer(os.path.join(tmp, "tokenizer.model"))
    corpus_tokens = sum(len(tok.encode(d, bos=True, eos=True)) for d in data["corpus"])

    def mean_tokens(records):
        lengths = [len(tok.encode(format_prompt(r["instruction"], r["input"]), True, False))
                   + len(tok.encode(r["output"], False, True)) for r in records]
        return round(sum(lengths) / len(lengths), 1), max(lengths)

    people = data["world"]["people"]
    split = {k: [p for p in people if p["split"] == k] for k in ("train", "eval")}
    kinds = {}
    for r in data["eval"]:
        key = f"{TASK_NAMES[r['task']]}/{r['kind']}"
        kinds[key] = kinds.get(key, 0) + 1
    return {
        "seed": seed, "vocab_size": vocab_size,
        "people": len(people),
        "train_people": len(split["train"]), "eval_people": len(split["eval"]),
        "misconceptions": {k: sum(1 for p in v if p["myth"]) for k, v in split.items()},
        "unknown_names": {"train": len(data["world"]["unknown_train"]),
                          "eval": len(data["world"]["unknown_eval"])},
        "corpus_documents": len(data["corpus"]), "corpus_tokens": corpus_tokens,
        "files": sizes, "eval_kinds": kinds,
        "tokens_per_example_mean_max": {name: mean_tokens(data[name][0]) for name in TASK_NAMES} | {
            "eval": mean_tokens(data["eval"])},
    }


def world_readme(m: dict) -> str:
    """The world's README.md, from its manifest."""
    lines = [f"# Synthetic HHH world (seed {m['seed']})", "",
             "Written by `python -m data.toy`; "
             "see data/README.md in the repository for the full description.", "",
             f"- {m['people']} people ({m['train_people']} train, {m['eval_people']} eval), "
             f"misconceptions {m['misconceptions']}, unknown names {m['unknown_names']}",
             f"- corpus.txt: {m['corpus_documents']} documents, {m['corpus_tokens']} tokens "
             f"(tokenizer.model, vocab {m['vocab_size']})", "", "| file | records |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in m["files"].items()]
    lines += (["", "| eval kind | n |", "|---|---|"]
              + [f"| {k} | {v} |" for k, v in sorted(m["eval_kinds"].items())])
    lines += ["",
              "Tokens per example (mean, max): " + json.dumps(m["tokens_per_example_mean_max"]),
              ""]
    return "\n".join(lines)
