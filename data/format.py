"""The Alpaca prompt format, loss masking and batching: what every fine-tuning stage trains on.

H3Fusion (arXiv 2411.17792) fine-tunes on instruction/response pairs written in the Alpaca template
and computes the language-modelling loss L_CE on the response tokens only.
This file turns one record

    {"instruction": str, "input": str, "output": str,
     "task": 0 | 1 | 2}   # 0 helpful, 1 harmless, 2 honest

into token ids and shifted labels, and a list of those into padded tensors:

    full    = [bos] + prompt + response + [eos]
    tokens  = full[:-1]                      what the model reads           (length T)
    targets = full[1:], prompt part -> -100  targets[t] is the label of logits[t]; -100 = no loss

    collate -> tokens [B, T] (PAD_ID on the right), targets [B, T] (-100 on prompt and padding),
               mask [B, T] (True on real tokens, for the gating loss L_G's average over tokens),
               task [B] (the dimension label y_b of L_G)

Padding: Meta's tokenizer has no pad id, so we pad with PAD_ID = 0, LLaMA's <unk>. It is never a
target (padding targets are -100) and, because padding is on the right and attention is causal, no
real token ever attends to it.

Truncation (max_len = the most tokens the model reads, i.e. len(tokens) <= max_len): the response is
what the loss is about, so it is kept whole whenever possible. An over-long *prompt* is cut first,
in its middle: we keep its head (BOS and the start of the template/instruction) and its tail (the
end of the instruction or input and the "### Response:" cue the model answers after). The prompt is
never cut below `min_prompt_tokens(max_len)` = a quarter of the budget; only if the response still
does not fit is the response cut from the right (it then loses its EOS).

Run `python -m data.show runs/toy/data` to see a few training examples with the loss mask visible.
"""
import torch

from data import TASK_NAMES  # task label 0, 1, 2 = helpful, harmless, honest

PAD_ID = 0  # LLaMA's <unk>: never a target, used only to fill the right end of short rows
IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy skips

# The Stanford Alpaca template, as used by the paper's released code for all three dimensions.
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt: the `### Input:` section appears only when `input` is non-empty."""
    if input and input.strip():
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def check_record(record, where="record"):
    """Raise a ValueError naming `where` unless `record` has the four fields of a
    training record."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a dict with instruction/input/output/task, "
                         f"found {type(record).__name__}")
    missing = [k for k in ("instruction", "output") if not isinstance(record.get(k), str)]
    if missing:
        raise ValueError(f"{where}: field(s) {missing} missing or not a string; expected "
                         f"instruction: str, input: str, output: str, task: 0|1|2")
    task = record.get("task", 0)
    if task not in range(len(TASK_NAMES)):
        raise ValueError(f"{where}: task={task!r}; "
                         f"expected 0 (helpful), 1 (harmless) or 2 (honest)")


def min_prompt_tokens(max_len: int) -> int:
    """The prompt is never truncated below this many tokens (a quarter of the sequence budget)."""
    return max(1, (max_len + 1) // 4)


def truncate(prompt_ids: list, response_ids: list, max_len: int):
    """Shorten (prompt_ids, response_ids) so that len(prompt) + len(response) <= max_len + 1.

    (The +1: `tokens` drops the last id of the full sequence, so a full sequence of max_len + 1 ids
    gives exactly max_len model inputs.)
    Prompt first, from its middle; response only if it must, from its end.
    """
    budget = max_len + 1
    if len(prompt_ids) + len(response_ids) <= budget:
        return prompt_ids, response_ids
    prompt_budget = max(budget - len(response_ids),
                        min(len(prompt_ids), min_prompt_tokens(max_len)))
    if len(prompt_ids) > prompt_budget:
        head = prompt_budget // 2  # BOS + template start + start of the instruction
        tail = prompt_budget - head  # end of instruction/input + "### Response:\n"
        prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - tail:]
    response_ids = response_ids[: budget - len(prompt_ids)]
    return prompt_ids, response_ids


def encode_example(tokenizer, record: dict, max_len: int) -> dict:
    """One record -> {"tokens", "targets", "task"}: lists of equal length <= max_len,
    loss on the response only.

    `tokenizer` is duck-typed: encode(text, bos, eos) -> list[int]
    (data.tokenizer.Tokenizer does this).
    """
    check_record(record)
    if max_len < 2:
        raise ValueError(f"max_len={max_len}: "
                         f"need at least 2 tokens (one prompt token and one target)")
    prompt_ids = tokenizer.encode(format_prompt(record["instruction"], record.get("input", "")),
                                  bos=True, eos=False)
    response_ids = tokenizer.encode(record["output"], bos=False, eos=True)
    prompt_ids, response_ids = truncate(prompt_ids, response_ids, max_len)
    full = prompt_ids + response_ids
    tokens = full[:-1]
    # targets[t] = full[t + 1]; the labels at 0 .. len(prompt)-2 are prompt tokens -> no loss.
    targets = [IGNORE_INDEX] * (len(prompt_ids) - 1) + response_ids
    return {"tokens": tokens, "targets": targets, "task": int(record.get("task", 0))}


def collate(encoded: list) -> dict:
    """Pad a list of encode_example outputs on the right into tensors (see the module docstring)."""
    if not encoded:
        raise ValueError("collate: empty batch")
    T = max(len(e["tokens"]) for e in encoded)
    B = len(encoded)
    tokens = torch.full((B, T), PAD_ID, dtype=torch.long)  # [B, T]
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    mask = torch.zeros((B, T), dtype=torch.bool)  # [B, T]
    for b, e in enumerate(encoded):
        n = len(e["tokens"])
        if len(e["targets"]) != n:
            raise ValueError(f"collate: example {b} has {n} tokens "
                             f"but {len(e['targets'])} targets")
        tokens[b, :n] = torch.tensor(e["tokens"], dtype=torch.long)
        targets[b, :n] = torch.tensor(e["targets"], dtype=torch.long)
        mask[b, :n] = True
    task = torch.tensor([int(e["task"]) for e in encoded], dtype=torch.long)  # [B]
    return {"tokens": tokens, "targets": targets, "mask": mask, "task": task}
