"""engineering/hf_tokenizer.py: the tokenizer files of `python -m engineering.export_hf CKPT OUT`.

Without transformers, tokenizer.json is read here by hand, as its format says (added tokens cut out
of the raw text first, the normalizer's steps, the pre-tokenizer's split, BPE: merges by rank, byte
fallback; the post-processor's template), and that reading must give sentencepiece's own ids. With
transformers installed, AutoTokenizer and generate() must give ours on exported tiny models."""
import json
import os
import random
import re
import shutil

import pytest
import sentencepiece as spm
import torch

import model as M
from engineering import checkpoints as C
from engineering import export_hf
from data.format import format_prompt
from data.tokenizer import Tokenizer, train_tokenizer
from data.toy import write_world
from engineering.hf_tokenizer import check_pieces_stay_whole, read_sentencepiece, write_hf_tokenizer
from engineering.tiny import make_tiny_checkpoint

FILES = ["generation_config.json", "special_tokens_map.json", "tokenizer.json",
         "tokenizer_config.json"]
TRICKY = ["", " ", "  ", "a", " a", "a ", "a  b", "  two leading", "trailing  ", "\n",
          "one\ntwo\n\n", "\ttab", "12345 67.8", "2024-01-02", "café naïve über Ørsted",
          "東京 and 日本語", "emoji 😀🎉 ok", "x▁y", "mixed: 7 cafés, 東京 😀\n  next line",
          "¿Qué? ¡Sí!"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The synthetic world (data/toy.py): its tokenizer has each person's name as a user-defined
    piece."""
    out = str(tmp_path_factory.mktemp("world") / "data")
    write_world(out, seed=0)
    people = json.load(open(os.path.join(out, "world.json")))
    records = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]
    return {"dir": out, "tokenizer": os.path.join(out, "tokenizer.model"),
            "names": [p["name"] for p in people["people"]], "unknown": people["unknown_eval"],
            "prompts": [format_prompt(r["instruction"], r["input"]) for r in records]}


@pytest.fixture(scope="module")
def meta_style(tmp_path_factory):
    """A tiny checkpoint whose tokenizer is trained like Meta's (BPE, byte fallback, digits
    split)."""
    root = tmp_path_factory.mktemp("meta")
    dense = make_tiny_checkpoint(str(root / "dense"), dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                 seed=1)
    return {"dense": dense, "tokenizer": os.path.join(dense, "tokenizer.model")}


# ---- an independent reading of tokenizer.json ---------------------------------------------------


class ReferenceTokenizer:
    """tokenizer.json's BPE tokenizer, naively, from the format's description."""

    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            self.spec = json.load(f)
        model = self.spec["model"]
        assert model["type"] == "BPE" and model["byte_fallback"]
        self.vocab = model["vocab"]
        self.rank = {tuple(m.split(" ") if isinstance(m, str) else m): r
                     for r, m in enumerate(model["merges"])}
        assert not any(t["normalized"] for t in self.spec["added_tokens"])  # (not read here)
        self.added = {t["content"]: t["id"] for t in self.spec["added_tokens"]}

    def normalize(self, text):
        steps = self.spec["normalizer"]
        for step in steps["normalizers"] if steps["type"] == "Sequence" else [steps]:
            if step["type"] == "Prepend":
                text = step["prepend"] + text if text else text
            elif step["type"] == "Replace":
                text = text.replace(step["pattern"]["String"], step["content"])
            else:
                raise NotImplementedError(step["type"])
        return text

    def pre_tokenize(self, text):
        split = self.spec["pre_tokenizer"]
        if split is None:
            return [text]
        assert split["type"] == "Split" and split["behavior"] == "Isolated" and not split["invert"]
        cuts = [0] + [i for m in re.finditer(split["pattern"]["Regex"], text) for i in m.span()]
        return [text[a:b] for a, b in zip(cuts, cuts[1:] + [len(text)]) if b > a]

    def bpe(self, chunk):
        if self.spec["model"]["ignore_merges"] and chunk in self.vocab:
            return [self.vocab[chunk]]
        symbols = []
        for ch in chunk:  # a character that is no piece: its UTF-8 bytes, <0xNN> pieces
            symbols += [ch] if ch in self.vocab else [f"<0x{b:02X}>" for b in ch.encode("utf-8")]
        while True:
            pairs = [(self.rank[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:]))
                     if pair in self.rank]
            if not pairs:
                return [self.vocab[s] for s in symbols]
            _, i = min(pairs)  # the lowest rank; of equal ones, the leftmost
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]

    def encode(self, text):
        ids = []
        pattern = "|".join(map(re.escape, sorted(self.added, key=len, reverse=True)))
        for part in re.split(f"({pattern})", text):
            if part in self.added:
                ids.append(self.added[part])
            elif part:
                chunks = self.pre_tokenize(self.normalize(part))
                ids += [i for chunk in chunks for i in self.bpe(chunk)]
        template = self.spec["post_processor"]
        out = []
        for item in template["single"]:
            if "SpecialToken" in item:
                out += template["special_tokens"][item["SpecialToken"]["id"]]["ids"]
            else:
                out += ids
        return out


def texts_for(tokenizer_path, names=(), seed=0, n_random=150):
    """Tricky strings, the names in sentences, every piece's text, random strings of pieces."""
    pieces = [p for p, _, kind in read_sentencepiece(tokenizer_path)["pieces"] if kind in (1, 4)]
    texts = list(TRICKY) + [p.replace("\u2581", " ") for p in pieces]
    for name in names:
        texts += [name, f"{name}'s pet", f"Where does {name} live?", f"({name})", f"x{name}",
                  f"{name}  {name}", f"ask {name}.\n{name}"]
    rng = random.Random(seed)
    texts += ["".join(rng.choice(pieces).replace("\u2581", " ") for _ in range(rng.randint(2, 12)))
              for _ in range(n_random)]
    return texts


def written(tokenizer_path, out_dir, max_len=None):
    paths = write_hf_tokenizer(str(out_dir), tokenizer_path, max_len)
    assert sorted(os.path.basename(p) for p in paths) == FILES
    return {os.path.basename(p): json.load(open(p, encoding="utf-8")) for p in paths}


# ---- without transformers --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["world", "meta-style"])
def test_tokenizer_json_read_by_hand_gives_sentencepieces_ids(kind, world, meta_style, tmp_path):
    path = world["tokenizer"] if kind == "world" else meta_style["tokenizer"]
    written(path, tmp_path)
    reference, ours = ReferenceTokenizer(tmp_path / "tokenizer.json"), Tokenizer(path)
    names = world["names"] + world["unknown"] if kind == "world" else ()
    texts = texts_for(path, names) + (world["prompts"][::10] if kind == "world" else [])
    wrong = [t for t in texts if reference.encode(t) != ours.encode(t, bos=True, eos=False)]
    print(f"{kind}: {len(texts) - len(wrong)}/{len(texts)} texts give sentencepiece's ids")
    assert not wrong, [(t, reference.encode(t), ours.encode(t, True, False)) for t in wrong[:3]]
    if kind == "world":  # each name is one piece, through tokenizer.json too
        name = world["names"][0]
        assert ours.sp.piece_to_id("\u2581" + name) in reference.encode(f"Where does {name} live?")


def test_the_names_need_the_split_and_merges_need_their_ranks(world, tmp_path):
    """The reading above can fail: without the user-defined split a name falls apart into pieces,
    and merges in another order give other ids."""
    written(world["tokenizer"], tmp_path)
    reference, ours = ReferenceTokenizer(tmp_path / "tokenizer.json"), Tokenizer(world["tokenizer"])
    text = f"Where does {world['names'][0]} live?"
    reference.spec["pre_tokenizer"] = None
    reference.spec["model"]["ignore_merges"] = False
    assert len(reference.encode(text)) > len(ours.encode(text, bos=True, eos=False))
    reference = ReferenceTokenizer(tmp_path / "tokenizer.json")
    reference.rank = {pair: -r for pair, r in reference.rank.items()}  # reversed ranks
    assert any(reference.encode(t) != ours.encode(t, True, False) for t in world["prompts"][:20])


def test_the_json_fields_name_the_special_tokens_and_add_bos_only(meta_style, tmp_path):
    files = written(meta_style["tokenizer"], tmp_path, max_len=256)
    sp = spm.SentencePieceProcessor(model_file=meta_style["tokenizer"])
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)
    config = files["tokenizer_config.json"]
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 256
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    assert files["special_tokens_map.json"] == specials and specials.items() <= config.items()
    assert files["generation_config.json"] == {"bos_token_id": 1, "eos_token_id": 2}
    tokenizer = files["tokenizer.json"]
    assert tokenizer["model"]["vocab"]["<s>"] == 1 and len(tokenizer["model"]["vocab"]) == 320
    assert [(t["content"], t["id"], t["special"]) for t in tokenizer["added_tokens"]] == \
        [("<unk>", 0, True), ("<s>", 1, True), ("</s>", 2, True)]
    assert tokenizer["pre_tokenizer"] is None  # no user-defined pieces: BPE over the whole text


def test_export_hf_writes_the_tokenizer_files_beside_the_weights(meta_style, tmp_path):
    out = str(tmp_path / "hf")
    export_hf.main([meta_style["dense"], out])
    assert sorted(os.listdir(out)) == sorted(FILES + ["config.json", "model.safetensors",
                                                      "tokenizer.model"])
    config = json.load(open(os.path.join(out, "config.json")))
    tokenizer_config = json.load(open(os.path.join(out, "tokenizer_config.json")))
    assert tokenizer_config["model_max_length"] == config["max_position_embeddings"] == 256


def test_tokenizers_it_cannot_reproduce_are_refused_with_the_file_named(world, tmp_path):
    not_a_model = tmp_path / "tokenizer.model"
    not_a_model.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        write_hf_tokenizer(str(tmp_path), str(not_a_model))
    unigram = tmp_path / "unigram.model"
    with open(unigram, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(world["prompts"]), model_writer=f,
                                       vocab_size=300, model_type="unigram", minloglevel=2)
    with pytest.raises(ValueError, match=r"unigram.model: model_type=1; expected BPE"):
        write_hf_tokenizer(str(tmp_path), str(unigram))
    assert not (tmp_path / "tokenizer.json").exists()


def test_an_export_without_a_tokenizer_it_can_write_is_refused_before_any_weight(
        world, meta_style, tmp_path):
    """export_hf checks the tokenizer before it writes a weight: a checkpoint whose tokenizer.model
    is missing, or is one the files cannot describe (unigram), leaves no output directory."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(meta_style["dense"], ckpt)
    os.remove(ckpt / "tokenizer.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model: not found; an exported model"):
        export_hf.main([str(ckpt), str(tmp_path / "hf")])
    with open(ckpt / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(world["prompts"]), model_writer=f,
                                       vocab_size=320, model_type="unigram", minloglevel=2)
    with pytest.raises(ValueError, match=r"tokenizer.model: model_type=1; expected BPE"):
        export_hf.main([str(ckpt), str(tmp_path / "hf")])
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no output, no temporary directory left


def test_a_piece_sentencepiece_never_builds_whole_is_refused_beside_user_defined_ones(world):
    """With user-defined pieces, tokenizer.json takes a chunk that is a whole piece as that piece; a
    piece that sentencepiece's own merges do not build (here: a piece renamed behind its back) would
    break that, and is refused."""
    model = read_sentencepiece(world["tokenizer"])
    check_pieces_stay_whole(model, "tokenizer.model")  # the world's: every piece builds whole
    renamed = next(i for i, (p, _, kind) in enumerate(model["pieces"]) if kind == 1 and len(p) > 3)
    model["pieces"][renamed] = ("\u2581qzxv", 0.0, 1)
    with pytest.raises(ValueError, match=r"tokenizer.model: 1 pieces sentencepiece's BPE never"):
        check_pieces_stay_whole(model, "tokenizer.model")


# ---- with transformers (not a dependency of the project) -------------------------------------


def world_checkpoint(out, tokenizer, n_experts=0, seed=0):
    """A random tiny model over the world's vocabulary (dense, or fused with 3 experts), in Meta's
    layout with the world's tokenizer.model."""
    vocab = spm.SentencePieceProcessor(model_file=tokenizer).vocab_size()
    args = M.ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab,
                       multiple_of=16, max_seq_len=512, n_experts=n_experts, top_k=2)
    torch.manual_seed(seed)
    C.save_checkpoint(M.Transformer(args), out, tokenizer_path=tokenizer)
    return out


@pytest.mark.parametrize("kind", ["dense", "fused"])
def test_autotokenizer_gives_our_ids_on_the_worlds_eval_prompts(kind, world, tmp_path):
    transformers = pytest.importorskip("transformers")
    experts = 3 if kind == "fused" else 0
    ckpt = world_checkpoint(str(tmp_path / kind), world["tokenizer"], n_experts=experts)
    out = str(tmp_path / "hf")
    export_hf.main([ckpt, out])
    theirs, ours = transformers.AutoTokenizer.from_pretrained(out), Tokenizer(world["tokenizer"])
    wrong = [p for p in world["prompts"] if theirs(p)["input_ids"] != ours.encode(p, True, False)]
    print(f"transformers {transformers.__version__}, {kind}: "
          f"{len(world['prompts']) - len(wrong)}/{len(world['prompts'])} prompts give our ids")
    assert not wrong, wrong[:2]
    ids = ours.encode(world["prompts"][0], bos=True, eos=False)
    assert theirs.decode(ids, skip_special_tokens=True) == world["prompts"][0]


def test_autotokenizer_gives_our_ids_for_a_meta_style_tokenizer(meta_style, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = str(tmp_path / "hf")
    export_hf.main([meta_style["dense"], out])
    theirs = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer(meta_style["tokenizer"])
    texts = texts_for(meta_style["tokenizer"])
    wrong = [t for t in texts if theirs.encode(t) != ours.encode(t, bos=True, eos=False)]
    assert not wrong, [(t, theirs.encode(t), ours.encode(t, True, False)) for t in wrong[:3]]
    for text in TRICKY:  # and back to text as sentencepiece decodes ("▁" is a space)
        ids = theirs.encode(text)
        assert theirs.decode(ids, skip_special_tokens=True) == ours.decode(ids)


@pytest.mark.parametrize("kind", ["dense", "fused"])
def test_transformers_greedy_generate_gives_our_tokens(kind, world, tmp_path):
    transformers = pytest.importorskip("transformers")
    experts = 3 if kind == "fused" else 0
    ckpt = world_checkpoint(str(tmp_path / kind), world["tokenizer"], n_experts=experts, seed=5)
    out = str(tmp_path / "hf")
    export_hf.main([ckpt, out])
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours, _ = C.load_checkpoint(ckpt)
    prompts = world["prompts"][::150]
    ids = [Tokenizer(world["tokenizer"]).encode(p, bos=True, eos=False) for p in prompts]
    expected = M.generate_tokens(ours.eval(), ids, max_new_tokens=12, eos_id=2)
    for prompt, prompt_ids, new in zip(prompts, ids, expected):
        inputs = tokenizer(prompt, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == prompt_ids
        with torch.no_grad():
            output = theirs.generate(**inputs, max_new_tokens=12, do_sample=False)
        generated = output[0, len(prompt_ids):].tolist()
        assert (generated[: generated.index(2)] if 2 in generated else generated) == new
