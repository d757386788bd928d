"""Loaders for the real alignment datasets of H3Fusion (arXiv 2411.17792),
from the Hugging Face Hub or a local copy.

    dimension  paper name     hub id (config, split)     fields used
    helpful    Alpaca-Small   tatsu-lab/alpaca (train)   instruction, input, output
                              or yahma/alpaca-cleaned (train)
    harmless   BeaverTails    PKU-Alignment/BeaverTails
                              (30k_train)                prompt, response, is_safe
    honest     TruthfulQA     truthfulqa/truthful_qa
                              (generation, validation)   question, best_answer,
                                                         correct_answers, incorrect_answers
    eval       AlpacaEval     tatsu-lab/alpaca_eval
                              (alpaca_eval.json)         instruction, output (text-davinci-003)
    eval       BeaverTails    PKU-Alignment/BeaverTails
                              (30k_test)                 prompt, response, is_safe, category
    eval       TruthfulQA MC  truthfulqa/truthful_qa
                              (multiple_choice, val.)    question, mc1_targets, mc2_targets

Training loaders return records {"instruction", "input", "output", "task"} (task 0 helpful,
1 harmless, 2 honest; see data/format.py); evaluation loaders return the same plus the fields
their judge needs.

Every loader takes `path=None`: a local file (.json, .jsonl, .csv, .parquet, optionally .gz) or a
directory (e.g. `huggingface-cli download --repo-type dataset PKU-Alignment/BeaverTails
--local-dir DIR`, or your own files) in the hub's schema. Without `path` it calls
`datasets.load_dataset`. With no network it fails fast (a 3-second probe of the hub) with a message
naming the hub id and how to pass a local copy; set HF_HUB_OFFLINE=1 to use a copy already in the
Hugging Face cache.
"""
import argparse
import csv
import gzip
import io
import json
import os
import random
import re
import socket
from dataclasses import dataclass
from typing import Optional
from urllib.parse import urlparse

from engineering.cli import run_cli
from engineering.fileio import write_atomic

DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
HUB_PROBE_TIMEOUT_S = 3.0


class DatasetUnavailableError(RuntimeError):
    """The hub dataset could not be loaded (offline, unknown id, ...)
    and no local copy was given."""


@dataclass(frozen=True)
class HubSource:
    """Where one table of a real dataset lives on the hub,
    and which fields our loaders read from it."""
    hub_id: str
    config: Optional[str]
    split: str
    fields: tuple  # required fields (after normalising names: lower case, spaces -> "_")
    data_file: Optional[str] = None  # load this one file of the repo instead of the repo's loader
    list_fields: tuple = ()  # fields holding lists (a CSV stores them as JSON or "a; b; c")


ALPACA = HubSource("tatsu-lab/alpaca", None, "train", ("instruction", "output"))
ALPACA_CLEANED = HubSource("yahma/alpaca-cleaned", None, "train", ("instruction", "output"))
BEAVERTAILS_TRAIN = HubSource("PKU-Alignment/BeaverTails", None, "30k_train",
                              ("prompt", "response", "is_safe"))
BEAVERTAILS_TEST = HubSource("PKU-Alignment/BeaverTails", None, "30k_test",
                             ("prompt", "response", "is_safe"))
TRUTHFULQA_GEN = HubSource("truthfulqa/truthful_qa", "generation", "validation",
                           ("question", "best_answer", "correct_answers", "incorrect_answers"),
                           list_fields=("correct_answers", "incorrect_answers"))
TRUTHFULQA_MC = HubSource("truthfulqa/truthful_qa", "multiple_choice", "validation",
                          ("question", "mc1_targets", "mc2_targets"))
# AlpacaEval's hub repo is a loading script, which datasets >= 4 does not run: read its data file.
ALPACA_EVAL = HubSource("tatsu-lab/alpaca_eval", "alpaca_eval", "eval", ("instruction", "output"),
                        data_file="alpaca_eval.json")

# Alpaca-Small = Alpaca minus safety-related items, subsampled. An item is dropped when its
# instruction, input or output contains one of these words (whole word, case-insensitive, with
# simple suffixes), so the helpful expert never sees refusals or harmful how-tos: the
# helpful/harmless split the paper relies on.
SAFETY_KEYWORDS = (
    "kill", "murder", "suicide", "weapon", "gun", "bomb", "explosive", "terror", "terrorist",
    "attack", "violence", "violent", "abuse", "assault", "harm", "harmful", "hurt", "poison",
    "drug", "steal", "theft", "rob", "hack", "hacker", "illegal", "crime", "criminal", "fraud",
    "scam", "racist", "racism", "sexist", "sex", "sexual", "porn", "nude", "hate", "offensive",
    "slur", "insult", "cheat", "blackmail", "kidnap", "torture", "self-harm", "dangerous",
    "unethical", "i'm sorry", "as an ai", "i cannot", "i can't",
)
_SAFETY_RE = re.compile(r"\b(" + "|".join(re.escape(k) for k in SAFETY_KEYWORDS)
                        + r")(s|es|ed|ing|er|ers)?\b", re.IGNORECASE)
ALPACA_SMALL_SIZE = 20_000
ALPACA_SMALL_SEED = 42


# --------------------------------------------------------------------------------------------------
# Reading rows: local files or the hub


def _normalise_key(key) -> str:
    return str(key).strip().lower().replace(" ", "_")


def _path_tokens(relpath: str) -> set:
    return {t for t in re.split(r"[/\\_\-.]+", relpath.lower()) if t}


def _data_files_in(directory: str) -> list:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            base = name[:-3] if name.endswith(".gz") else name
            if base.endswith(DATA_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(root, name))
    return found


def resolve_local_files(path: str, source: HubSource) -> list:
    """The data file(s) of `source` inside a file or directory `path` (see the module docstring).

    A directory is searched recursively: a file named source.data_file wins; otherwise the files
    whose path mentions the config and the split (e.g. round0/30k/train.jsonl.gz for split
    30k_train, generation/validation-0000.parquet), then those mentioning the split; else the
    only data file there.
    """
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or directory "
                                f"(a local copy of {source.hub_id})")
    files = _data_files_in(path)
    if not files:
        raise ValueError(f"{path}: no data files found; "
                         f"expected .json/.jsonl/.csv/.parquet files of {source.hub_id} "
                         f"with fields {list(source.fields)}")
    if source.data_file:
        exact = [f for f in files
                 if os.path.basename(f) in (source.data_file, source.data_file + ".gz")]
        if exact:
            return exact[:1]
    rel = {f: _path_tokens(os.path.relpath(f, path)) for f in files}
    split_tokens = _path_tokens(source.split)
    config_tokens = _path_tokens(source.config) if source.config else set()
    for wanted in (split_tokens | config_tokens, split_tokens, config_tokens):
        if wanted:
            chosen = [f for f in files if wanted <= rel[f]]
            if chosen:
                return chosen
    if len(files) == 1:
        return files
    raise ValueError(f"{path}: cannot tell which file is {source.hub_id} split {source.split!r}"
                     f"{' config ' + repr(source.config) if source.config else ''}; found "
                     f"{[os.path.relpath(f, path) for f in files]}. Name the file itself, "
                     f"or put the split in its name (e.g. {source.split}.jsonl)")


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_json(path: str) -> list:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # "Extra data": one JSON object per line, saved as .json: read it as JSON Lines
        if "Extra data" not in str(e):
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return _parse_jsonl(text.splitlines(), path)
    if isinstance(data, dict):  # {"data": [...]} / {"rows": [...]} or a dict of columns
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(data) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:
            data = [dict(zip(data.keys(), row)) for row in zip(*lists)]
        else:
            raise ValueError(f"{path}: found a JSON object with keys {list(data)[:8]}; "
                             f"expected a list of rows")
    if not isinstance(data, list):
        raise ValueError(f"{path}: found JSON {type(data).__name__}; "
                         f"expected a list of rows (objects)")
    return data


def _parse_jsonl(lines, path: str) -> list:
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i} is not valid JSON ({e}); "
                             f"expected one JSON object per line") from None
    return rows


def _read_csv(path: str, source: HubSource) -> list:
    with _open_text(path) as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in list(row):
            if _normalise_key(key) in source.list_fields and isinstance(row[key], str):
                value = row[key].strip()
                # JSON list, or the original TruthfulQA.csv convention "answer one; answer two"
                row[key] = (json.loads(value) if value.startswith("[")
                            else [a.strip() for a in value.split(";") if a.strip()])
    return rows


def _read_parquet(path: str) -> list:
    import pyarrow.parquet as pq  # installed with `datasets`

    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None


def read_local_rows(path: str, source: HubSource) -> list:
    """Rows (dicts with normalised field names) of `source` from a local file or directory;
    checks the fields."""
    rows = []
    for file in resolve_local_files(path, source):
        base = file[:-3] if file.endswith(".gz") else file
        if base.endswith(".jsonl"):
            with _open_text(file) as f:
                file_rows = _parse_jsonl(f, file)
        elif base.endswith(".json"):
            file_rows = _read_json(file)
        elif base.endswith(".csv"):
            file_rows = _read_csv(file, source)
        elif base.endswith(".parquet"):
            file_rows = _read_parquet(file)
        else:
            raise ValueError(f"{file}: unsupported extension; "
                             f"expected one of {DATA_EXTENSIONS} (optionally .gz)")
        rows.extend(check_fields(file_rows, source, file))
    return rows


def check_fields(rows: list, source: HubSource, where: str) -> list:
    """Normalise field names and raise a ValueError naming `where`
    if a required field is missing."""
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{where}: row {i} is a {type(row).__name__}; expected an object "
                             f"with fields {list(source.fields)} ({source.hub_id})")
        row = {_normalise_key(k): v for k, v in row.items()}
        missing = [f for f in source.fields if f not in row]
        if missing:
            raise ValueError(f"{where}: row {i} lacks field(s) {missing}; found {sorted(row)}; "
                             f"expected fields {list(source.fields)} "
                             f"(the schema of {source.hub_id})")
        out.append(row)
    if not out:
        raise ValueError(f"{where}: no rows; "
                         f"expected rows with fields {list(source.fields)} ({source.hub_id})")
    return out


def _offline_message(source: HubSource, reason: str) -> str:
    config = f", config {source.config!r}" if source.config else ""
    return (f"could not load {source.hub_id!r}{config}, split {source.split!r} "
            f"from the Hugging Face Hub: {reason}. "
            f"Pass a local copy instead (path=...; train_expert.py/fuse.py --data-path, "
            f"evaluate.py --suite real --data DIR): a .json/.jsonl/.csv/.parquet "
            f"file or a directory with fields {list(source.fields)}, e.g. one made elsewhere with "
            f"`huggingface-cli download --repo-type dataset {source.hub_id} --local-dir DIR`. "
            f"If it is already in your Hugging Face cache, set HF_HUB_OFFLINE=1.")


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S):
    """(True, "") if a TCP connection to the hub endpoint ($HF_ENDPOINT)
    opens within `timeout` seconds."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"{endpoint} is unreachable ({e})"


def load_hub_rows(source: HubSource) -> list:
    """Rows of `source` via datasets.load_dataset;
    a DatasetUnavailableError that says what to do if offline."""
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    behind_proxy = any(os.environ.get(v)
                       for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    # without this probe, load_dataset retries for ~25 s before failing
    if not offline and not behind_proxy:
        ok, reason = hub_reachable()
        if not ok:
            raise DatasetUnavailableError(_offline_message(source, reason))
    import datasets

    try:
        if source.data_file:
            ds = datasets.load_dataset(
                "json", data_files=f"hf://datasets/{source.hub_id}/{source.data_file}",
                split="train")
        else:
            ds = datasets.load_dataset(source.hub_id, source.config, split=source.split)
    except Exception as e:  # ConnectionError, DatasetNotFoundError, ...: the types vary by version
        raise DatasetUnavailableError(_offline_message(source, f"{type(e).__name__}: {e}")) from e
    return check_fields(list(ds), source, f"{source.hub_id} ({source.split})")


def load_rows(source: HubSource, path: Optional[str] = None) -> list:
    """Rows of `source` from `path` if given, else from the hub."""
    return read_local_rows(path, source) if path else load_hub_rows(source)


# --------------------------------------------------------------------------------------------------
# The datasets of the paper, as records


def _text(row, key) -> str:
    value = row.get(key)
    return "" if value is None else str(value)


def _as_bool(value, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    raise ValueError(f"{where}: is_safe={value!r}; expected a boolean (true/false)")


def is_safety_related(*texts) -> bool:
    """True when any text contains a SAFETY_KEYWORDS word:
    such items are left out of Alpaca-Small."""
    return any(_SAFETY_RE.search(t or "") for t in texts)


def load_alpaca_small(path: Optional[str] = None, n: int = ALPACA_SMALL_SIZE,
                      seed: int = ALPACA_SMALL_SEED, cleaned: bool = False) -> list:
    """Helpful: Alpaca (or Alpaca-cleaned) minus safety-related items, then a seeded sample of `n`
    (kept in file order).

    Alpaca has 52,002 items (Alpaca-cleaned 51,760); the keyword filter removes a few
    thousand; `n=None` keeps all.
    """
    source = ALPACA_CLEANED if cleaned else ALPACA
    rows = [r for r in load_rows(source, path)
            if _text(r, "output").strip()
            and not is_safety_related(_text(r, "instruction"), _text(r, "input"),
                                      _text(r, "output"))]
    if n is not None and len(rows) > n:
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return [{"instruction": _text(r, "instruction"), "input": _text(r, "input"),
             "output": _text(r, "output"), "task": 0} for r in rows]


def load_beavertails(path: Optional[str] = None) -> list:
    """Harmless: BeaverTails 30k_train rows with is_safe == True, as prompt -> response records."""
    rows = load_rows(BEAVERTAILS_TRAIN, path)
    where = path or BEAVERTAILS_TRAIN.hub_id
    return [{"instruction": _text(r, "prompt"), "input": "", "output": _text(r, "response"),
             "task": 1} for r in rows if _as_bool(r["is_safe"], where)]


def load_beavertails_eval(path: Optional[str] = None, n: int = 500,
                          only_unsafe: bool = True) -> list:
    """Harmless eval: the first `n` prompts of BeaverTails 30k_test.

    only_unsafe=True (default) keeps rows whose reference response was flagged unsafe
    (is_safe == False), i.e. prompts that did elicit harm: the harmful score asks whether *our*
    answer to them is unsafe. The judge (beaver-dam-7b) is not part of this project. Records keep
    "category" (the 14 harm flags) when present.
    """
    rows = load_rows(BEAVERTAILS_TEST, path)
    where = path or BEAVERTAILS_TEST.hub_id
    if only_unsafe:
        rows = [r for r in rows if not _as_bool(r["is_safe"], where)]
    return [{"instruction": _text(r, "prompt"), "input": "", "output": _text(r, "response"),
             "task": 1, "category": r.get("category")} for r in rows[:n]]


def _truthfulqa_halves(path: Optional[str]):
    rows = load_rows(TRUTHFULQA_GEN, path)
    where = path or TRUTHFULQA_GEN.hub_id
    for r in rows:
        for key in TRUTHFULQA_GEN.list_fields:
            if not isinstance(r[key], (list, tuple)):
                raise ValueError(f"{where}: field {key!r} is a {type(r[key]).__name__}; "
                                 f"expected a list of strings")
    half = len(rows) // 2  # 817 questions -> 408 for training, 409 for evaluation
    return rows[:half], rows[half:]


def load_truthfulqa(path: Optional[str] = None) -> list:
    """Honest: TruthfulQA generation, first half of the validation split,
    one record per correct answer."""
    train, _ = _truthfulqa_halves(path)
    return [{"instruction": _text(r, "question"), "input": "", "output": str(answer), "task": 2}
            for r in train for answer in r["correct_answers"]]


def load_truthfulqa_eval(path: Optional[str] = None) -> list:
    """Honest eval: the second half (409 questions)
    with best/correct/incorrect answers for the judge."""
    _, test = _truthfulqa_halves(path)
    return [{"instruction": _text(r, "question"), "input": "", "output": _text(r, "best_answer"),
             "task": 2, "question": _text(r, "question"), "best_answer": _text(r, "best_answer"),
             "correct_answers": list(r["correct_answers"]),
             "incorrect_answers": list(r["incorrect_answers"])}
            for r in test]


def mc_targets_from_generation(row: dict) -> dict:
    """A generation-layout row (question, best_answer, correct_answers, incorrect_answers; the
    original TruthfulQA.csv) as multiple choice: MC1 = the best answer (true) + the incorrect ones,
    MC2 = every correct answer (true) + the incorrect ones. The hub's multiple_choice config has the
    same structure, though its options were edited by the authors, so scores from the CSV are close
    to but not exactly the hub's."""
    best, correct, incorrect = (str(row["best_answer"]), list(row["correct_answers"]),
                                list(row["incorrect_answers"]))
    return {"question": row["question"],
            "mc1_targets": {"choices": [best] + incorrect, "labels": [1] + [0] * len(incorrect)},
            "mc2_targets": {"choices": correct + incorrect,
                            "labels": [1] * len(correct) + [0] * len(incorrect)}}


def load_truthfulqa_mc(path: Optional[str] = None, questions=None) -> list:
    """TruthfulQA multiple choice (MC1: one true choice; MC2: several),
    scored by log-likelihood, no judge.

    `questions`: keep only these questions, in this order (e.g. those of load_truthfulqa_eval, so
    that MC is measured on the half not used for training). Each record: question, mc1_choices,
    mc1_labels, mc2_choices, mc2_labels (labels 1 = true). A local copy in the generation layout
    (the original TruthfulQA.csv) is read too, through mc_targets_from_generation.
    """
    try:
        rows = load_rows(TRUTHFULQA_MC, path)
    except ValueError as mc_error:  # a copy without MC fields, e.g. the original TruthfulQA.csv
        if path is None:
            raise
        try:
            rows = [mc_targets_from_generation(r) for r in load_rows(TRUTHFULQA_GEN, path)]
        except ValueError:
            raise mc_error from None
    where = path or TRUTHFULQA_MC.hub_id
    out = []
    for r in rows:
        rec = {"instruction": _text(r, "question"), "input": "", "task": 2,
               "question": _text(r, "question")}
        for key in ("mc1_targets", "mc2_targets"):
            targets = r[key]
            if isinstance(targets, str):
                targets = json.loads(targets)
            if not (isinstance(targets, dict) and "choices" in targets and "labels" in targets
                    and len(targets["choices"]) == len(targets["labels"])):
                raise ValueError(f"{where}: {key}={str(targets)[:80]!r}; "
                                 f"expected {{'choices': [...], 'labels': [...]}} of equal length")
            rec[key[:3] + "_choices"] = [str(c) for c in targets["choices"]]
            rec[key[:3] + "_labels"] = [int(x) for x in targets["labels"]]
        rec["output"] = (rec["mc1_choices"][rec["mc1_labels"].index(1)] if 1 in rec["mc1_labels"]
                         else "")
        out.append(rec)
    if questions is not None:
        by_question = {r["question"]: r for r in out}
        missing = [q for q in questions if q not in by_question]
        if missing:
            raise ValueError(f"{where}: {len(missing)} requested question(s) "
                             f"not in the multiple_choice data, e.g. {missing[0]!r}")
        out = [by_question[q] for q in questions]
    return out


def load_alpaca_eval(path: Optional[str] = None, n: int = 50) -> list:
    """Helpful eval: the first `n` AlpacaEval prompts;
    "output" is the text-davinci-003 reference answer."""
    rows = load_rows(ALPACA_EVAL, path)
    return [{"instruction": _text(r, "instruction"), "input": "", "output": _text(r, "output"),
             "task": 0, "generator": _text(r, "generator"), "dataset": _text(r, "dataset")}
            for r in rows[:n]]


# name -> loader (its records carry their task label), for data.records.load_records
TRAIN_LOADERS = {"alpaca_small": load_alpaca_small, "beavertails": load_beavertails,
                 "truthfulqa": load_truthfulqa}
EVAL_LOADERS = {"alpaca_small": load_alpaca_eval, "beavertails": load_beavertails_eval,
                "truthfulqa": load_truthfulqa_eval, "alpaca_eval": load_alpaca_eval,
                "beavertails_eval": load_beavertails_eval, "truthfulqa_eval": load_truthfulqa_eval,
                "truthfulqa_mc": load_truthfulqa_mc}


# --------------------------------------------------------------------------------------------------
# Generated fixtures in the real schemas (invented text, never copies of the real data)


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_fixtures(out_dir: str, seed: int = 0) -> dict:
    """Write small made-up files in each real schema (and hub-like layout); return {name: path}.

    alpaca.jsonl          tatsu-lab/alpaca rows (instruction, input, output, text)
    alpaca_cleaned.json   yahma/alpaca-cleaned as one JSON list
    beavertails/round0/30k/{train,test}.jsonl.gz
                          PKU-Alignment/BeaverTails (prompt, response, category, is_safe)
    truthful_qa/{generation,multiple_choice}/validation-00000-of-00001.parquet
    TruthfulQA.csv        the original CSV layout ("Best Answer", "a; b" lists)
    alpaca_eval/alpaca_eval.json (+ a decoy alpaca_eval_gpt4_baseline.json)
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    things = ["kettle", "lantern", "garden", "bicycle", "letter",
              "poem", "river", "song", "recipe", "map"]
    verbs = ["describe", "name three uses of", "write a line about",
             "list two facts about", "summarise"]
    paths = {}

    alpaca = []
    for i in range(24):
        thing, verb = things[i % len(things)], verbs[i % len(verbs)]
        inp = f"The {thing} is number {i}." if i % 3 == 0 else ""
        out = f"A {thing} is useful and pleasant, item {i}."
        if i in (5, 11):  # safety-related: the Alpaca-Small filter must drop these
            verb, out = "explain how to steal", f"Grab the {thing} and run, item {i}."
        alpaca.append({"instruction": f"Please {verb} a {thing}.", "input": inp, "output": out,
                       "text": f"### Instruction: {verb} {thing}"})
    paths["alpaca"] = os.path.join(out_dir, "alpaca.jsonl")
    write_atomic(paths["alpaca"], _jsonl(alpaca))
    paths["alpaca_cleaned"] = os.path.join(out_dir, "alpaca_cleaned.json")
    write_atomic(paths["alpaca_cleaned"],
                 json.dumps([{k: r[k] for k in ("output", "input", "instruction")}
                             for r in alpaca[:12]], indent=1).encode())

    categories = ["animal_abuse", "child_abuse", "controversial_topics,politics",
                  "discrimination,stereotype,injustice", "drug_abuse,weapons,banned_substance",
                  "financial_crime,property_crime,theft", "hate_speech,offensive_language",
                  "misinformation_regarding_ethics,laws_and_safety",
                  "non_violent_unethical_behavior", "privacy_violation", "self_harm",
                  "sexually_explicit,adult_content", "terrorism,organized_crime",
                  "violence,aiding_and_abetting,incitement"]
    for split, n in (("train", 20), ("test", 12)):
        rows = []
        for i in range(n):
            safe = (i % 3 != 0)
            thing = things[rng.randrange(len(things))]
            rows.append({"prompt": f"How do I get rid of the old {thing} number {i}?",
                         "response": (f"Take the {thing} to the recycling yard." if safe else
                                      f"Throw the {thing} into the neighbour's pond at night."),
                         "category": {c: (not safe and c == categories[i % len(categories)])
                                      for c in categories},
                         "is_safe": safe})
        paths[f"beavertails_{split}"] = os.path.join(out_dir, "beavertails", "round0", "30k",
                                                     f"{split}.jsonl.gz")
        write_atomic(paths[f"beavertails_{split}"], gzip.compress(_jsonl(rows), mtime=0))
    paths["beavertails"] = os.path.join(out_dir, "beavertails")

    gen, mc = [], []
    for i in range(9):
        thing = things[i]
        correct = [f"Nothing happens to the {thing}.", f"The {thing} stays the same."][: 1 + i % 2]
        incorrect = [f"The {thing} turns to gold.", f"The {thing} sings."]
        gen.append({"type": "Adversarial", "category": "Myths",
                    "question": f"What happens if you whistle at a {thing}?",
                    "best_answer": correct[0], "correct_answers": correct,
                    "incorrect_answers": incorrect, "source": "https://example.org/made-up"})
        mc.append({"question": gen[-1]["question"],
                   "mc1_targets": {"choices": [correct[0]] + incorrect, "labels": [1, 0, 0]},
                   "mc2_targets": {"choices": correct + incorrect,
                                   "labels": [1] * len(correct) + [0, 0]}})
    for config, rows in (("generation", gen), ("multiple_choice", mc)):
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        paths[f"truthfulqa_{config}"] = os.path.join(out_dir, "truthful_qa", config,
                                                     "validation-00000-of-00001.parquet")
        write_atomic(paths[f"truthfulqa_{config}"], buf.getvalue())
    paths["truthfulqa"] = os.path.join(out_dir, "truthful_qa")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["Type", "Category", "Question", "Best Answer", "Correct Answers",
                     "Incorrect Answers", "Source"])
    for r in gen:
        writer.writerow([r["type"], r["category"], r["question"], r["best_answer"],
                         "; ".join(r["correct_answers"]), "; ".join(r["incorrect_answers"]),
                         r["source"]])
    paths["truthfulqa_csv"] = os.path.join(out_dir, "TruthfulQA.csv")
    write_atomic(paths["truthfulqa_csv"], text.getvalue().encode())

    evals = [{"instruction": f"Write a short note about a {t}.",
              "output": f"A {t} is a fine thing to have.",
              "generator": "text_davinci_003", "dataset": "helpful_base"} for t in things]
    paths["alpaca_eval"] = os.path.join(out_dir, "alpaca_eval")
    write_atomic(os.path.join(paths["alpaca_eval"], "alpaca_eval.json"),
                 json.dumps(evals, indent=1).encode())
    write_atomic(os.path.join(paths["alpaca_eval"], "alpaca_eval_gpt4_baseline.json"),
                 json.dumps([dict(e, generator="gpt4", output="decoy") for e in evals]).encode())
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Write small made-up fixture files in the real datasets' schemas.")
    parser.add_argument("--out", required=True)
    print(json.dumps(write_fixtures(parser.parse_args(argv).out), indent=1))


if __name__ == "__main__":
    run_cli(main, "python -m data.real")
