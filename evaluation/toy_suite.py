"""The toy suite (--suite toy, the default): greedy answers to the synthetic world's evaluation
prompts, scored by the world's own exact string checks (no judge model).

The metrics are defined next to the world, in data/toy_scoring.py: score_all gives helpful,
harmful, over_refusal, truthful, informative and hhh (evaluate.py's docstring says what each one
counts), score_details the same per dimension and per kind of prompt, and every example's own
scores. Here:
  load_toy_eval    the world's eval.jsonl (data.toy.load_eval), --limit records spread evenly over
                   it
  evaluate_toy     one model's answers, scored -> SuiteRun; for the oracle rows
                   (baselines.ByDimension) each dimension's prompts are answered by the model (or
                   expert) of that dimension
"""
import math
import os
from typing import Optional

from data.toy import load_eval
from data.toy_scoring import score_all, score_details
from evaluation.baselines import ByDimension
from evaluation.generation import SuiteRun, generate_responses, record_prompt, spread


def load_toy_eval(data_dir: str, limit: Optional[int] = None) -> list:
    """--data DIR of the toy suite -> its evaluation records (`limit` of them, spread
    evenly)."""
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"--data {data_dir}: directory not found "
                                f"(create the synthetic world with "
                                f"python -m data.toy --out {data_dir})")
    records = spread(load_eval(data_dir), limit)
    if not records:
        raise ValueError(f"--data {data_dir}: no evaluation records")
    return records


def finite_or_none(value):
    """NaN (a scorer's mean over zero examples) -> None, which JSON can store and the table shows as
    n/a."""
    value = float(value)
    return None if math.isnan(value) else value


def evaluate_toy(model, tokenizer, records: list, max_new_tokens: int, batch_size: int,
                 name: str = "") -> SuiteRun:
    """Greedy answers to every eval record, scored by data.toy_scoring.score_all (+ score_details'
    breakdowns: per-dimension and per-kind rates, e.g. how often harmless/benign look-alikes were
    declined)."""
    prompts = [record_prompt(r) for r in records]
    # the oracle: each dimension's prompts answered by its own model
    if isinstance(model, ByDimension):
        prompt_ids, answer_ids, responses = ([None] * len(records), [None] * len(records),
                                             [None] * len(records))
        for task in range(model.n):
            idx = [i for i, r in enumerate(records) if r["task"] == task]
            if idx:
                got = generate_responses(model.model_for(task), tokenizer,
                                         [prompts[i] for i in idx], max_new_tokens, batch_size,
                                         desc=f"{name} generate dimension {task}")
                for j, i in enumerate(idx):
                    prompt_ids[i], answer_ids[i], responses[i] = got[0][j], got[1][j], got[2][j]
        if None in responses:
            raise ValueError(f"{name}: the oracle has models for dimensions 0..{model.n - 1} only; "
                             f"some records have other dimensions")
    else:
        prompt_ids, answer_ids, responses = generate_responses(model, tokenizer, prompts,
                                                               max_new_tokens, batch_size,
                                                               desc=f"{name} generate")
    run = SuiteRun({k: finite_or_none(v) for k, v in score_all(records, responses).items()},
                   records, responses, [p + a for p, a in zip(prompt_ids, answer_ids)],
                   prompt_lengths=[len(p) for p in prompt_ids])
    full = score_details(records, responses)
    run.details = {"dimensions": full["dimensions"], "by_kind": full["by_kind"]}
    run.per_example = full["per_example"]
    return run

