"""From evaluation records to answers and likelihoods: what both suites (toy_suite.py,
real_suite.py) share.

  spread, record_prompt   which records (--limit of them, spread evenly over the set) and each
                          one's Alpaca prompt (data/format.py format_prompt)
  generate_responses      greedy answers, at most max_new_tokens, stopping at </s>: prompts sorted
                          by length and batched, KV-cache decoding by model.generate_tokens; a
                          prompt too long for the context is cut from the left, keeping BOS
                          (fit_to_context)
  for_decoding            what to decode with: the model, or with compiled decoding (evaluate.py's
                          default on CUDA) the same row, its one-token steps compiled
                          (engineering/compiled_decode.py)
  sequence_logprobs       sum_t log p(continuation token t | prefix, earlier continuation tokens),
                          one teacher-forced forward per batch (TruthfulQA MC and the LLM judge
                          read it)
  SuiteRun                what one model produced on one suite (evaluate_toy and evaluate_real
                          return it)
"""
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from data.format import PAD_ID, format_prompt
from engineering.compiled_decode import compiled_or_eager
from evaluation.baselines import ByDimension, OutputEnsemble
from model import generate_tokens

# --------------------------------------------------------------------------------------------------
# Which records, and their prompts


def spread(records: list, limit: Optional[int]) -> list:
    """`limit` records spread evenly over the list (eval files are ordered by dimension and kind, so
    the first N would all be of one kind); all of them when limit is None."""
    if limit is None or limit >= len(records):
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def record_prompt(record: dict) -> str:
    """The Alpaca prompt of an evaluation record (instruction [+ input]); hub fields work too."""
    instruction = record.get("instruction") or record.get("question") or record.get("prompt")
    if not isinstance(instruction, str):
        raise ValueError(f"evaluation record has no instruction/question/prompt string: "
                         f"{str(record)[:200]}")
    return format_prompt(instruction, record.get("input", "") or "")


# --------------------------------------------------------------------------------------------------
# Generation and log-likelihood, batched


def progress(total: int, desc: str):
    """A tqdm bar on stderr when tqdm is installed (it comes with `datasets`), else a silent one."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="ex", leave=False, dynamic_ncols=True)
    except ImportError:
        class Silent:
            def update(self, n=1):
                pass

            def close(self):
                pass
        return Silent()


def fit_to_context(ids: list, budget: int) -> list:
    """Cut a too-long prompt from the left, keeping its first token (BOS): the end of the prompt
    (the question and the '### Response:' cue) is what the next tokens depend on most."""
    if len(ids) <= budget:
        return ids
    return ids[:1] + ids[len(ids) - (budget - 1):]


def generate_responses(model, tokenizer, prompts: list, max_new_tokens: int, batch_size: int = 64,
                       desc: str = "generate"):
    """Greedy answers to `prompts` (strings), in input order: (prompt ids as fed, new token ids,
    decoded texts).

    Prompts are sorted by token length and cut into batches, so a batch wastes few decoding steps on
    prompts still being read; model.generate_tokens does the KV-cache decoding of one batch.
    """
    budget = model.params.max_seq_len - max_new_tokens
    if budget < 2:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in "
                         f"max_seq_len={model.params.max_seq_len}")
    encoded = [fit_to_context(tokenizer.encode(p, bos=True, eos=False), budget) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    new_tokens = [None] * len(encoded)
    bar = progress(len(encoded), desc)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        out = generate_tokens(model, [encoded[i] for i in batch], max_new_tokens, temperature=0.0,
                              eos_id=tokenizer.eos_id)
        for i, ids in zip(batch, out):
            new_tokens[i] = ids
        bar.update(len(batch))
    bar.close()
    return encoded, new_tokens, [tokenizer.decode(ids) for ids in new_tokens]


def for_decoding(model, compile_decode: bool):
    """What generate_responses decodes `model`'s row with: the model itself, or with compile_decode
    a stand-in whose one-token steps run compiled (compiled_or_eager: a Transformer becomes a
    CompiledDecoder, anything it does not know stays eager). An output ensemble becomes the
    ensemble of its members' stand-ins; an oracle row (ByDimension) hands out stand-ins, one per
    distinct model (a fused model forced to expert i is one model for every i). Everything but
    decoding (likelihoods, parameters) reads the stand-in as it read the model."""
    if not compile_decode:
        return model
    if isinstance(model, OutputEnsemble):
        return OutputEnsemble([compiled_or_eager(m) for m in model.members])
    if isinstance(model, ByDimension):
        stand_ins = {id(m): compiled_or_eager(m) for m in model.models}  # id(model) -> its stand-in
        return ByDimension(lambda task: stand_ins[id(model.model_for(task))], model.n,
                           list(stand_ins.values()))
    return compiled_or_eager(model)


def compile_seconds(model) -> float:
    """Seconds the compiled decoding of `model` (what for_decoding returned) spent compiling its
    steps; 0 if it decodes eagerly."""
    parts = model.members if isinstance(model, OutputEnsemble) else (
        model.models if isinstance(model, ByDimension) else [model])
    return sum(getattr(m, "compile_seconds", 0.0) for m in parts)


@torch.inference_mode()
def sequence_logprobs(model, pairs: list, batch_size: int = 32) -> list:
    """Sum of log p(continuation tokens | prefix) for each (prefix_ids, continuation_ids) pair.

    One teacher-forced forward per batch: tokens = (prefix + continuation)[:-1] padded right with
    PAD_ID; logits[t] predicts token t + 1, so the continuation's tokens are read at positions
    len(prefix) - 1 ... Padding is on the right and attention is causal, so it never changes a real
    position's logits.
    """
    max_len = model.params.max_seq_len
    full = []
    for prefix, cont in pairs:
        if not prefix or not cont:
            raise ValueError("sequence_logprobs: prefix and continuation must both be non-empty")
        full.append((fit_to_context(prefix, max(2, max_len + 1 - len(cont))), cont))
    order = sorted(range(len(full)), key=lambda i: len(full[i][0]) + len(full[i][1]))
    scores = [0.0] * len(full)
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        seqs = [full[i][0] + full[i][1] for i in batch]
        T = max(len(s) for s in seqs) - 1
        tokens = torch.full((len(batch), T), PAD_ID, dtype=torch.long)  # [B, T]
        targets = torch.full((len(batch), T), -1, dtype=torch.long)  # [B, T], -1 = not scored
        for b, i in enumerate(batch):
            prefix, cont = full[i]
            seq = seqs[b]
            tokens[b, :len(seq) - 1] = torch.tensor(seq[:-1])
            targets[b, len(prefix) - 1:len(seq) - 1] = torch.tensor(cont)
        log_probs = F.log_softmax(model(tokens.to(device), 0).float(), dim=-1)  # [B, T, V]
        picked = (log_probs.gather(-1, targets.clamp(min=0).to(device)[..., None])  # [B, T, 1]
                  .squeeze(-1))  # [B, T]
        summed = (picked * (targets >= 0).to(device)).sum(dim=1)  # [B]
        for b, i in enumerate(batch):
            scores[i] = summed[b].item()
    return scores


# --------------------------------------------------------------------------------------------------
# What a suite returns


@dataclass
class SuiteRun:
    """What one model produced on one suite."""

    metrics: dict  # metric key -> value (None = not measured)
    records: list  # the evaluation records that were generated for, in order
    responses: list  # the model's answer text per record
    sequences: list  # token ids of prompt + answer per record (the routing analysis reads them)
    details: Optional[dict] = None  # finer breakdowns (toy: per dimension and per kind)
    per_example: Optional[list] = None  # per-record scores, written next to each response
    prompt_lengths: Optional[list] = None  # prompt tokens in each sequence (routing on prompts)

