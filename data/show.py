"""Seeing what the model is trained on: training examples as text, with the loss mask visible.

    python -m data.show runs/toy/data [--n 3] [--table]

prints the first examples of each dataset in the Alpaca format (data/format.py) exactly as
encode_example encodes them: the prompt, which gets no loss (-100), inside [[ ]], the trained
response and </s> outside; --table adds one line per position (input token, target token or -100).
DATA may also be a .json/.jsonl/
.csv/.parquet record file or a directory of them (data/records.py load_records).
"""
import argparse
import os

from engineering.cli import run_cli
from data import TASK_NAMES
from data.format import IGNORE_INDEX, PAD_ID, encode_example
from data.records import load_records
from data.tokenizer import Tokenizer

PROMPT_OPEN, PROMPT_CLOSE = "[[", "]]"  # around the loss-free prompt


def render_example(tokenizer, record: dict, max_len: int = 128, table: bool = False) -> str:
    """Text of one encoded example: the no-loss part inside [[ ]], the trained part outside.

    The full sequence is decoded piece by piece from the *encoded* ids, so what you see is exactly
    what encode_example produced (truncation included). With table=True, also one line per position:
    t, input token, target token (or -100 = no loss).
    """
    enc = encode_example(tokenizer, record, max_len)
    # the last target is always a response token (EOS unless cut)
    full = enc["tokens"] + enc["targets"][-1:]
    n_prompt = sum(1 for t in enc["targets"] if t == IGNORE_INDEX) + 1  # full ids with no loss
    task = int(record.get("task", 0))
    head = (f"--- task {task} ({TASK_NAMES[task]}): {len(enc['tokens'])} tokens, "
            f"{len(full) - n_prompt} with loss ---")
    text = (PROMPT_OPEN + _decode_pieces(tokenizer, full[:n_prompt]) + PROMPT_CLOSE
            + _decode_pieces(tokenizer, full[n_prompt:]))
    lines = [head, text]
    if table:
        lines.append(f"{'t':>4}  {'input token':<18} {'target (label of logits[t])':<18}")
        for t, (x, y) in enumerate(zip(enc["tokens"], enc["targets"])):
            target = "-100 (no loss)" if y == IGNORE_INDEX else _piece(tokenizer, y)
            lines.append(f"{t:>4}  {_piece(tokenizer, x):<18} {target:<18}")
    return "\n".join(lines)


def show_examples(tokenizer, records: list, n: int = 3, max_len: int = 128,
                  table: bool = False) -> str:
    """Print (and return) the first n records as the model sees them;
    [[...]] marks the loss-masked prompt."""
    legend = (f"Text inside {PROMPT_OPEN} {PROMPT_CLOSE} is the prompt: "
              f"the model reads it but gets no loss on it (-100). "
              f"The rest (the response and </s>) is what it is trained to produce.")
    out = "\n\n".join([legend] + [render_example(tokenizer, r, max_len, table)
                                  for r in records[:n]])
    print(out)
    return out


def _piece(tokenizer, token_id: int) -> str:
    """A printable name for one token id: <s>, </s>, <pad>,
    or its decoded text with spaces/newlines shown."""
    if token_id == tokenizer.bos_id:
        return "<s>"
    if token_id == tokenizer.eos_id:
        return "</s>"
    if token_id == PAD_ID:
        return "<pad/unk>"
    # data.tokenizer.Tokenizer keeps the sentencepiece processor here
    sp = getattr(tokenizer, "sp", None)
    text = sp.id_to_piece(token_id) if sp is not None else tokenizer.decode([token_id])
    return repr(text)[1:-1]


def _decode_pieces(tokenizer, ids: list) -> str:
    """Decode ids to text, showing BOS/EOS as <s>/</s> (decode() would silently drop them)."""
    out, run = [], []
    for i in ids:
        if i in (tokenizer.bos_id, tokenizer.eos_id):
            if run:
                out.append(tokenizer.decode(run))
                run = []
            out.append("<s>" if i == tokenizer.bos_id else "</s>")
        else:
            run.append(i)
    if run:
        out.append(tokenizer.decode(run))
    return "".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Print training examples in the Alpaca format with the loss mask visible.")
    parser.add_argument("data", help="a toy data directory (python -m data.toy --out DIR), "
                                     "or a .json/.jsonl/.csv/.parquet file or directory "
                                     "of records")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.model (default: DATA/tokenizer.model)")
    parser.add_argument("--n", type=int, default=3, help="examples per dataset")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--table", action="store_true",
                        help="also print one line per token position")
    args = parser.parse_args(argv)
    tok_path = args.tokenizer or os.path.join(args.data if os.path.isdir(args.data) else
                                              os.path.dirname(args.data), "tokenizer.model")
    tokenizer = Tokenizer(tok_path)
    names = TASK_NAMES if os.path.isfile(os.path.join(args.data, "helpful_train.jsonl")) \
        else [args.data]
    for name in names:
        records = load_records(name, args.data) if name != args.data else load_records(name, None)
        print(f"===== {name}: {len(records)} records =====")
        show_examples(tokenizer, records, args.n, args.max_len, args.table)
        print()


if __name__ == "__main__":
    run_cli(main, "python -m data.show")
