"""data/real.py: each real-dataset loader on generated fixture files in the hub schema, errors,
offline message."""
import gzip
import json
import time

import pytest

from data import real
from data.real import (DatasetUnavailableError, load_alpaca_eval, load_alpaca_small,
                       load_beavertails, load_beavertails_eval, load_truthfulqa,
                       load_truthfulqa_eval, load_truthfulqa_mc, write_fixtures)
from data.records import load_records, pooled_paths


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_fixtures(str(tmp_path_factory.mktemp("real")))


def _rows(path):
    return [json.loads(line) for line in gzip.open(path, "rt")] if path.endswith(".gz") else \
        [json.loads(line) for line in open(path)]


def test_alpaca_small_filters_safety_items_and_subsamples(fx):
    raw = _rows(fx["alpaca"])
    recs = load_alpaca_small(fx["alpaca"])
    kept = [r for r in raw if "steal" not in r["instruction"]]
    assert len(raw) == 24 and len(recs) == 22  # the two "steal" items are dropped
    assert [r["instruction"] for r in recs] == [r["instruction"] for r in kept]
    assert recs[0] == {"instruction": raw[0]["instruction"], "input": raw[0]["input"],
                       "output": raw[0]["output"], "task": 0}
    assert any(r["input"] for r in recs) and any(not r["input"] for r in recs)
    small = load_alpaca_small(fx["alpaca"], n=7, seed=3)
    assert small == load_alpaca_small(fx["alpaca"], n=7, seed=3)  # deterministic
    assert len(small) == 7 and small != load_alpaca_small(fx["alpaca"], n=7, seed=4)
    order = [next(i for i, r in enumerate(recs) if r == s) for s in small]
    assert order == sorted(order)  # kept in file order
    # a JSON list file, items 0-11 minus 5 and 11
    cleaned = load_alpaca_small(fx["alpaca_cleaned"], cleaned=True)
    assert len(cleaned) == 10 and all(r["task"] == 0 for r in cleaned)


def test_safety_filter_words():
    assert real.is_safety_related("How do I kill a process?")
    assert real.is_safety_related("", "Stealing is wrong")
    # no substring matches
    assert not real.is_safety_related("Describe a skillet.", "Name three harmonies")


def test_beavertails_safe_rows_from_hub_layout_directory(fx):
    rows = _rows(fx["beavertails_train"])
    recs = load_beavertails(fx["beavertails"])  # directory: resolves round0/30k/train.jsonl.gz
    assert len(recs) == sum(r["is_safe"] for r in rows) == 13
    safe = [r for r in rows if r["is_safe"]]
    assert [(r["instruction"], r["output"]) for r in recs] == \
        [(r["prompt"], r["response"]) for r in safe]
    assert all(r["task"] == 1 and r["input"] == "" for r in recs)


def test_beavertails_eval_takes_the_test_split(fx):
    test_rows = _rows(fx["beavertails_test"])
    ev = load_beavertails_eval(fx["beavertails"], n=3)
    assert [e["instruction"] for e in ev] == \
        [r["prompt"] for r in test_rows if not r["is_safe"]][:3]
    assert all(isinstance(e["category"], dict) and any(e["category"].values()) for e in ev)
    every = load_beavertails_eval(fx["beavertails"], n=500, only_unsafe=False)
    assert [e["instruction"] for e in every] == [r["prompt"] for r in test_rows]


def test_truthfulqa_halves_parquet_and_csv(fx):
    import pyarrow.parquet as pq

    rows = pq.read_table(fx["truthfulqa_generation"]).to_pylist()
    train = load_truthfulqa(fx["truthfulqa"])  # directory: generation/validation-*.parquet
    first_half = rows[: len(rows) // 2]
    # one record per correct answer
    assert [(r["instruction"], r["output"]) for r in train] == \
        [(r["question"], a) for r in first_half for a in r["correct_answers"]]
    ev = load_truthfulqa_eval(fx["truthfulqa"])
    assert [e["question"] for e in ev] == [r["question"] for r in rows[len(rows) // 2:]]
    assert not {e["question"] for e in ev} & {r["instruction"] for r in train}  # disjoint halves
    assert (ev[0]["incorrect_answers"] == rows[4]["incorrect_answers"]
            and ev[0]["output"] == rows[4]["best_answer"])
    assert load_truthfulqa(fx["truthfulqa_csv"]) == train  # original CSV layout, "a; b" lists
    assert load_truthfulqa_eval(fx["truthfulqa_csv"]) == ev


def test_truthfulqa_mc(fx):
    mc = load_truthfulqa_mc(fx["truthfulqa"])  # directory: multiple_choice/validation-*.parquet
    assert len(mc) == 9
    assert mc[0]["mc1_labels"] == [1, 0, 0] and mc[0]["output"] == mc[0]["mc1_choices"][0]
    assert (len(mc[1]["mc2_choices"]) == len(mc[1]["mc2_labels"]) == 4
            and sum(mc[1]["mc2_labels"]) == 2)
    held_out = [e["question"] for e in load_truthfulqa_eval(fx["truthfulqa"])]
    assert [r["question"] for r in load_truthfulqa_mc(fx["truthfulqa"],
                                                       questions=held_out)] == held_out


def test_truthfulqa_mc_from_the_original_csv(fx):
    """The original TruthfulQA.csv has no MC fields: MC1 = best answer + incorrect ones,
    MC2 = every correct one + incorrect ones -- exactly how the fixture's multiple_choice file
    was written, so the two must agree."""
    from_csv = load_truthfulqa_mc(fx["truthfulqa_csv"])
    from_parquet = load_truthfulqa_mc(fx["truthfulqa_multiple_choice"])
    assert len(from_csv) == 9 and from_csv == from_parquet
    eval_questions = [r["question"] for r in load_truthfulqa_eval(fx["truthfulqa_csv"])]
    assert [r["question"] for r in load_truthfulqa_mc(fx["truthfulqa_csv"],
                                                       questions=eval_questions)] == eval_questions


def test_real_pooled_from_local_copies(fx):
    spec = (f"alpaca-small={fx['alpaca']},beavertails={fx['beavertails']},"
            f"truthfulqa={fx['truthfulqa_csv']}")
    pooled = load_records("real-pooled", path=spec)
    sizes = {t: sum(1 for r in pooled if r["task"] == t) for t in (0, 1, 2)}
    largest = max(len(load_alpaca_small(fx["alpaca"])), len(load_beavertails(fx["beavertails"])),
                  len(load_truthfulqa(fx["truthfulqa_csv"])))
    assert sizes == {0: largest, 1: largest, 2: largest}  # each dimension with equal weight
    assert {r["instruction"] for r in pooled if r["task"] == 1} == \
        {r["instruction"] for r in load_beavertails(fx["beavertails"])}
    assert pooled_paths("truthfulqa=a.csv") == {"truthfulqa": "a.csv"}
    with pytest.raises(ValueError, match="expected NAME=PATH pairs"):
        load_records("real-pooled", path=fx["alpaca"])


def test_alpaca_eval_prefers_its_data_file(fx):
    ev = load_alpaca_eval(fx["alpaca_eval"], n=4)
    assert len(ev) == 4 and ev[0]["generator"] == "text_davinci_003" and ev[0]["output"] != "decoy"
    assert ev[0]["instruction"] == "Write a short note about a kettle."


def test_missing_field_names_the_file_and_fields(tmp_path):
    bad = tmp_path / "beaver.jsonl"
    bad.write_text(json.dumps({"prompt": "hi", "answer": "hello", "is_safe": True}) + "\n")
    with pytest.raises(ValueError, match=r"beaver\.jsonl.*\['response'\]"
                                         r".*\['prompt', 'response', 'is_safe'\]"):
        load_beavertails(str(bad))


def test_malformed_files_raise_clear_errors(tmp_path):
    broken = tmp_path / "alpaca.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    with pytest.raises(ValueError, match=r"alpaca\.jsonl: line 2 is not valid JSON"):
        load_alpaca_small(str(broken))
    not_rows = tmp_path / "alpaca.json"
    not_rows.write_text('"just a string"')
    with pytest.raises(ValueError, match=r"alpaca\.json: found JSON str; expected a list of rows"):
        load_alpaca_small(str(not_rows))
    bad_parquet = tmp_path / "x.parquet"
    bad_parquet.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"x\.parquet: not a readable parquet file"):
        load_truthfulqa(str(bad_parquet))
    bad_bool = tmp_path / "b.csv"
    bad_bool.write_text("prompt,response,is_safe\nhi,hello,maybe\n")
    with pytest.raises(ValueError, match=r"is_safe='maybe'"):
        load_beavertails(str(bad_bool))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match=r"empty: no data files found.*PKU-Alignment/BeaverTails"):
        load_beavertails(str(empty_dir))
    with pytest.raises(FileNotFoundError, match=r"nope.*truthfulqa/truthful_qa"):
        load_truthfulqa(str(tmp_path / "nope"))


def test_ambiguous_directory_lists_its_files(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    with pytest.raises(ValueError, match=r"cannot tell which file.*a\.jsonl.*b\.jsonl"):
        load_alpaca_small(str(tmp_path))


def test_offline_error_names_hub_id_and_local_copy(monkeypatch):
    # A real load attempt against an endpoint nothing listens on (port 9 on this host):
    # no network needed.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    start = time.time()
    with pytest.raises(DatasetUnavailableError) as err:
        load_beavertails()
    assert time.time() - start < 10  # fails fast, no 25 s of retries
    msg = str(err.value)
    assert "PKU-Alignment/BeaverTails" in msg and "30k_train" in msg and "path=" in msg
    assert "huggingface-cli download --repo-type dataset PKU-Alignment/BeaverTails" in msg
    with pytest.raises(DatasetUnavailableError, match="truthfulqa/truthful_qa.*'multiple_choice'"):
        load_truthfulqa_mc()
