"""Every training or evaluation set by name, as a list of records:
the one entry point of the training stages.

    load_records(name, toy_dir, split="train", path=None, task=None)
        -> [{"instruction", "input", "output", "task"}, ...]
           (eval records keep their scorer's fields)

name picks the source: the synthetic world in toy_dir (data/toy.py), a real dataset from the hub or
a local copy (data/real.py), or a record file of your own (load_record_file). The mixtures
("pooled", "real-pooled") give each dimension equal weight (balance_by_task).
"""
import os

from data import REAL_NAMES, TASK_NAMES, TASK_OF_REAL
from data.format import check_record
from data.real import EVAL_LOADERS, TRAIN_LOADERS, HubSource, read_local_rows
from data.toy import load_split


def _real_name(name: str):
    return REAL_NAMES.get(name.lower().replace("-", "_"))


def load_records(name: str, toy_dir: str = None, split: str = "train", path: str = None,
                 task: int = None) -> list:
    """Records {"instruction", "input", "output", "task"} (+ scorer fields for eval records).

    name:
      helpful | harmless | honest   the synthetic world in toy_dir (split: train | val | eval)
      pooled                        the three together (the fusion stage's mixed data), labels
                                    0/1/2; the train split gives each dimension equal weight
                                    (balance_by_task; an extra: the paper pools its datasets as
                                    they are)
      pooled-natural                the three together as they are (the paper's mixture:
                                    helpful-heavy)
      alpaca-small | beavertails | truthfulqa | real-pooled
                                    the paper's datasets (data/real.py; split: train | eval), from
                                    the hub or from `path` (a local copy of that one dataset;
                                    for real-pooled
                                    "alpaca-small=PATH,beavertails=PATH,truthfulqa=PATH")
      alpaca-eval | truthfulqa-mc   evaluation-only real sets
      a path to a .json/.jsonl/.csv/.parquet file or a directory of such files, with fields
      instruction, output (input optional) and task (or pass task=0|1|2 to label every record)
    """
    if name in TASK_NAMES or name in ("pooled", "pooled-natural"):
        if not toy_dir:
            raise ValueError(f"load_records({name!r}): toy_dir is required (e.g. runs/toy/data)")
        if name in TASK_NAMES:
            return load_split(toy_dir, name, split)
        pooled = [r for n in TASK_NAMES for r in load_split(toy_dir, n, split)]
        return balance_by_task(pooled) if split == "train" and name == "pooled" else pooled
    real = _real_name(name)
    if real is not None:
        return _load_real(real, split, path)
    if os.path.exists(name):
        return load_record_file(name, task)
    raise ValueError(f"load_records: {name!r} is not a synthetic set "
                     f"({', '.join(TASK_NAMES)}, pooled), "
                     f"not a real dataset ({', '.join(sorted(set(REAL_NAMES)))}) "
                     f"and not an existing file or directory")


def parse_named_paths(text: str, names, what: str) -> dict:
    """'a-b=P,c=Q' -> {'a_b': 'P', 'c': 'Q'}: one local path per dataset. Names are compared
    lower-case with '-' as '_' and must be among `names`; `what` names the argument in the error."""
    out = {}
    for item in text.split(","):
        name, sep, path = item.partition("=")
        key = name.strip().lower().replace("-", "_")
        if not sep or key not in names or not path.strip():
            raise ValueError(f"{what} {text!r}: expected NAME=PATH pairs, comma-separated, "
                             f"with NAME in {', '.join(n.replace('_', '-') for n in names)} "
                             f"(got {item!r})")
        out[key] = path.strip()
    return out


def pooled_paths(path: str = None) -> dict:
    """'alpaca-small=A,beavertails=B,truthfulqa=C' -> {'alpaca_small': 'A', ...}
    (a dataset left out: the hub)."""
    return parse_named_paths(path, tuple(TASK_OF_REAL), "real-pooled path") if path else {}


def _load_real(real: str, split: str, path: str = None) -> list:
    if split == "train":
        if real == "real_pooled":
            paths = pooled_paths(path)
            return balance_by_task([r for n in TASK_OF_REAL
                                    for r in TRAIN_LOADERS[n](paths.get(n))])
        if real not in TRAIN_LOADERS:
            raise ValueError(f"{real}: evaluation-only dataset; use split='eval'")
        return TRAIN_LOADERS[real](path)
    if split == "eval":
        if real == "real_pooled":
            paths = pooled_paths(path)
            return [r for n in TASK_OF_REAL for r in EVAL_LOADERS[n](paths.get(n))]
        return EVAL_LOADERS[real](path)
    raise ValueError(f"{real}: split={split!r}; "
                     f"the real datasets have 'train' and 'eval' (no 'val' split)")


def balance_by_task(records: list) -> list:
    """The mixture with equal weight per dimension (an extra: the paper fine-tunes on the mixture of
    the three datasets and says nothing of balancing): every dimension's records, in order, repeated
    cyclically up to the count of the largest one. Without it the largest set (helpful) dominates,
    and the router learns to send every token it cannot yet place -- the Alpaca template that opens
    every prompt -- to its expert."""
    by_task = {}
    for r in records:
        by_task.setdefault(r["task"], []).append(r)
    size = max((len(rs) for rs in by_task.values()), default=0)
    return [rs[i % len(rs)] for _, rs in sorted(by_task.items()) for i in range(size)]


def load_record_file(path: str, task: int = None) -> list:
    """Records from a local file/directory in our record schema
    (instruction, input?, output, task)."""
    schema = HubSource("a local record file", None, "train", ("instruction", "output"))
    rows = read_local_rows(path, schema)
    records = []
    for i, row in enumerate(rows):
        label = row.get("task", task) if task is None else task
        if label is None:
            raise ValueError(f"{path}: row {i} has no 'task' field; "
                             f"expected task 0 (helpful), 1 (harmless) or 2 (honest), "
                             f"or pass task=... to label every record")
        rec = dict(row, input="" if row.get("input") is None else str(row["input"]),
                   task=int(label))
        check_record(rec, f"{path}: row {i}")
        records.append(rec)
    return records
