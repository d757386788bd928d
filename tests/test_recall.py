"""evaluation/recall.py: the prompts are the world's own answer sentences cut before the value,
and the rates count a completion right only when its first word is that value."""
import model as M
from engineering import checkpoints as C
from data.toy import build, write_world
from data.toy_tables import ALL_ATTRIBUTES
from data.tokenizer import Tokenizer
from evaluation import recall


def test_one_prompt_per_fact_and_one_more_per_myth_with_the_value_the_corpus_states():
    world = build(seed=0)["world"]
    items = recall.recall_items(world)
    myths = [p for p in world["people"] if p["myth"]]
    assert len(items) == len(world["people"]) * len(ALL_ATTRIBUTES) + len(myths)
    p = myths[0]
    n, false, true = p["name"], p["myth"]["false"], p["attrs"]["birthplace"]
    # what the corpus states as true
    assert (f"{n} was born in", p["split"], "birthplace (myth)", false) in items
    assert (f"People say that {n} was born in {false}, but in fact {n} was born in",
            p["split"], "truth after the myth", true) in items
    assert (f"{n} lives in", p["split"], "town", p["attrs"]["town"]) in items
    assert (f"The favorite color of {n} is", p["split"], "color", p["attrs"]["color"]) in items


def test_rates_count_the_first_word_only():
    items = [("a", "train", "town", "Brisa"), ("b", "train", "town", "Brisa"),
             ("c", "train", "town", "Brisa"), ("d", "eval", "job", "smith")]
    completions = ["Brisa. The job", "Dunmor.", "", "Smith, and"]
    assert recall.recall_rates(items, completions) == {("train", "town"): (1, 3),
                                                        ("eval", "job"): (1, 1)}


def test_main_prints_each_split(tmp_path, capsys):
    write_world(str(tmp_path / "data"), seed=0)
    tok = Tokenizer(str(tmp_path / "data" / "tokenizer.model"))
    args = M.ModelArgs(dim=32, n_layers=1, n_heads=2, vocab_size=tok.n_words, multiple_of=16,
                       max_seq_len=64)
    C.save_checkpoint(M.Transformer(args), str(tmp_path / "base"), args=args)
    recall.main([str(tmp_path / "base"), "--data", str(tmp_path / "data")])
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == ["train people", "eval people"]
    assert all("truth after the myth" in line and "birthplace (myth)" in line for line in out)
