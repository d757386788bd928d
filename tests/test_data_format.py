"""data/format.py: Alpaca template, shifted targets, loss mask on the response only, truncation,
batching; data/show.py: the loss mask made visible."""
import pytest
import torch

from data.format import (IGNORE_INDEX, PAD_ID, collate, encode_example, format_prompt,
                         min_prompt_tokens)
from data.show import render_example, show_examples
from data.tokenizer import train_tokenizer
from data.tokenizer import Tokenizer

TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.",
    "### Instruction: ### Input: ### Response:",
    "Talvo lives in Dunmor. Talvo works as a baker. The capital is far away, 123 miles.",
    "How many words are in the list? cat, lamp, river. There are 3 words.",
] * 20


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return Tokenizer(train_tokenizer(TEXTS, str(path), vocab_size=320))


def test_template_with_and_without_input():
    no_input = format_prompt("Name a colour.")
    assert no_input.startswith("Below is an instruction that describes a task. Write")
    assert "### Input:" not in no_input
    assert no_input.endswith("### Instruction:\nName a colour.\n\n### Response:\n")
    with_input = format_prompt("Count the words.", "cat, lamp")
    assert "paired with an input" in with_input
    assert with_input.endswith("### Instruction:\nCount the words.\n\n"
                               "### Input:\ncat, lamp\n\n### Response:\n")
    assert format_prompt("Name a colour.", "   ") == no_input  # blank input = no input section


def test_targets_are_shifted_and_masked_on_prompt(tok):
    rec = {"instruction": "Where does Talvo live?", "input": "", "output": "Talvo lives in Dunmor.",
           "task": 2}
    enc = encode_example(tok, rec, max_len=256)
    prompt_ids = tok.encode(format_prompt(rec["instruction"]), bos=True, eos=False)
    response_ids = tok.encode(rec["output"], bos=False, eos=True)
    full = prompt_ids + response_ids  # independent reference
    assert enc["tokens"] == full[:-1]
    assert enc["task"] == 2
    assert len(enc["targets"]) == len(enc["tokens"])
    # naive loop: the label of position t is full[t+1], or -100 on the prompt
    for t, y in enumerate(enc["targets"]):
        expected = IGNORE_INDEX if t + 1 < len(prompt_ids) else full[t + 1]
        assert y == expected
    trained = [y for y in enc["targets"] if y != IGNORE_INDEX]
    assert trained[-1] == tok.eos_id
    assert tok.decode(trained[:-1]) == rec["output"]  # the mask covers exactly the response (+ EOS)
    # the prompt is intact
    assert tok.decode(enc["tokens"][:len(prompt_ids)]) == format_prompt(rec["instruction"])


def test_mask_decodes_to_response_with_input(tok):
    rec = {"instruction": "How many words are in the list?", "input": "cat, lamp, river",
           "output": "3", "task": 0}
    enc = encode_example(tok, rec, max_len=256)
    masked = [x for x, y in zip(enc["tokens"][1:] + [enc["targets"][-1]], enc["targets"])
              if y == IGNORE_INDEX]
    assert ("### Input:" in tok.decode(masked)
            and tok.decode(masked).rstrip().endswith("### Response:"))
    assert tok.decode([y for y in enc["targets"] if y != IGNORE_INDEX]) == "3"


def test_truncation_cuts_the_prompt_middle_and_keeps_the_response(tok):
    rec = {"instruction": "Talvo lives in Dunmor. " * 40 + "Where does Talvo live?", "input": "",
           "output": "Talvo lives in Dunmor.", "task": 0}
    max_len = 48
    enc = encode_example(tok, rec, max_len=max_len)
    assert len(enc["tokens"]) == max_len  # exactly filled
    trained = [y for y in enc["targets"] if y != IGNORE_INDEX]
    # the whole response is trained, with its EOS
    assert tok.decode(trained) == rec["output"] and trained[-1] == tok.eos_id
    assert enc["tokens"][0] == tok.bos_id
    prompt_text = tok.decode(enc["tokens"][: len(enc["tokens"]) - len(trained) + 1])
    assert prompt_text.startswith("Below is an")  # head kept
    assert prompt_text.rstrip().endswith("### Response:")  # tail (the answer cue) kept


def test_truncation_cuts_an_overlong_response_from_the_right(tok):
    rec = {"instruction": "Say it.", "input": "", "output": "Talvo works as a baker. " * 30,
           "task": 1}
    max_len = 40
    enc = encode_example(tok, rec, max_len=max_len)
    n_prompt = sum(y == IGNORE_INDEX for y in enc["targets"]) + 1
    assert len(enc["tokens"]) == max_len
    assert n_prompt == min_prompt_tokens(max_len)  # prompt cut to its floor, not below
    trained = [y for y in enc["targets"] if y != IGNORE_INDEX]
    assert tok.eos_id not in trained  # the cut response lost its EOS
    full_response = tok.encode(rec["output"], bos=False, eos=False)
    assert trained == full_response[: len(trained)]  # a prefix of the response


def test_collate_pads_right_and_masks(tok):
    recs = [{"instruction": "Where does Talvo live?", "input": "", "output": "Dunmor.", "task": 0},
            {"instruction": "How many words?", "input": "cat, lamp, river",
             "output": "There are 3 words.", "task": 2}]
    encs = [encode_example(tok, r, 256) for r in recs]
    batch = collate(encs)
    T = max(len(e["tokens"]) for e in encs)
    assert batch["tokens"].shape == batch["targets"].shape == batch["mask"].shape == (2, T)
    assert batch["tokens"].dtype == torch.long and batch["mask"].dtype == torch.bool
    assert batch["task"].tolist() == [0, 2]
    for b, e in enumerate(encs):
        n = len(e["tokens"])
        assert batch["tokens"][b, :n].tolist() == e["tokens"]
        assert batch["targets"][b, :n].tolist() == e["targets"]
        assert batch["mask"][b].tolist() == [True] * n + [False] * (T - n)
        assert ((batch["tokens"][b, n:] == PAD_ID).all()
                and (batch["targets"][b, n:] == IGNORE_INDEX).all())
    assert not (batch["targets"] == PAD_ID).any()  # the pad id is never a label


def test_show_examples_marks_the_prompt(tok, capsys):
    rec = {"instruction": "Where does Talvo live?", "input": "", "output": "Talvo lives in Dunmor.",
           "task": 0}
    out = show_examples(tok, [rec, rec], n=1, max_len=256, table=True)
    assert out in capsys.readouterr().out
    text = render_example(tok, rec, max_len=256).split("\n", 1)[1]
    assert text.startswith("[[<s>Below is an instruction")
    prompt_part, response_part = text.split("]]", 1)
    assert prompt_part.rstrip().endswith("### Response:")
    assert response_part.split("\n")[0].strip() == "Talvo lives in Dunmor.</s>"
    assert "-100 (no loss)" in out and "</s>" in out
    assert out.count("--- task") == 1


@pytest.mark.parametrize("bad, needle", [
    ({"input": "", "output": "x", "task": 0}, "instruction"),
    ({"instruction": "x", "input": "", "task": 0}, "output"),
    ({"instruction": "x", "input": "", "output": "y", "task": 5}, "task=5"),
    (["not", "a", "dict"], "expected a dict"),
])
def test_bad_records_raise_clear_errors(tok, bad, needle):
    with pytest.raises(ValueError, match=needle):
        encode_example(tok, bad, 64)
