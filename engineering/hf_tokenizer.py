"""Hugging Face's tokenizer files, written from a sentencepiece tokenizer.model, so that
transformers' AutoTokenizer gives exactly our ids: Tokenizer.encode(text, bos=True, eos=False)
(data/tokenizer.py).

    tokenizer.json            a "fast" tokenizer (the tokenizers library's format)
    tokenizer_config.json     which class reads it; <s> added in front, </s> not; the special tokens
    special_tokens_map.json   the special tokens (older transformers read them from here)
    generation_config.json    the ids of <s> and </s> for generate()

Only the sentencepiece library reads tokenizer.model here (transformers, tokenizers and protobuf
are not needed): the few fields its Python API does not show are read from the model's protobuf
bytes.
Read top to bottom:
  1. tokenizer.model    read_proto (protobuf's wire format), read_sentencepiece, check_supported
  2. tokenizer.json     bpe_merges, check_pieces_stay_whole, tokenizer_json
  3. The other files    special_tokens_map, tokenizer_config, generation_config
  4. Writing them       hf_tokenizer_files, write_hf_tokenizer

How sentencepiece encodes a text (BPE, LLaMA's "identity" normalization), and what says the same in
tokenizer.json:
  - each space becomes "▁", and one "▁" goes in front (the "dummy prefix")
        normalizer: Prepend "▁", then Replace " " -> "▁"  (once, over the whole text)
  - user-defined pieces (the synthetic world's names, "▁Thuhan") are cut out first, whole,
    leftmost and longest first, and never merge with their neighbours
        pre_tokenizer: Split on the user-defined pieces (Isolated: each one a chunk of its own);
        BPE's ignore_merges: a chunk that is a whole piece is that piece (check_pieces_stay_whole
        makes sure sentencepiece agrees, for every piece)
  - the rest starts as single characters; the adjacent pair that makes the piece of highest score is
    merged, again and again (equal scores: the leftmost pair)
        BPE merges, ranked by the score of the piece they make
  - a character that is no piece becomes its UTF-8 bytes, the pieces <0x00>..<0xFF>
        byte_fallback: true
  - <s> goes in front when the caller asks (bos=True); text is never read as <s>, </s> or <unk>
        post_processor "<s> $A"; add_bos_token true, add_eos_token false
Where the two differ: the tokenizers library reads the text "<s>" (or "</s>", "<unk>") as that
special token, as every Hugging Face Llama tokenizer does; and with user-defined pieces, the literal
text of a byte piece ("<0x41>") alone between two names (or after a name, at the end) is that byte.

tokenizer_class is PreTrainedTokenizerFast, which loads tokenizer.json as it is. transformers 5's
LlamaTokenizer rebuilds the tokenizer from the vocabulary and merges alone (a Metaspace
pre-tokenizer, no normalizer, no user-defined pieces): "Thuhan" falls apart into ▁T h u h an, and a
text that starts with a space loses a "▁".
"""
import json
import os
import re
import struct

from data.tokenizer import Tokenizer
from engineering.fileio import write_atomic

SPACE = "\u2581"  # "▁", sentencepiece's visible space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # a piece's type
BPE = 2  # TrainerSpec.model_type

# ------------------------------------------------------------------------------------------------
# 1. tokenizer.model: a protobuf message (sentencepiece_model.proto). The fields read here:
#      ModelProto      1: pieces (repeated SentencePiece)  2: trainer_spec  3: normalizer_spec
#      SentencePiece   1: piece (string)  2: score (float)  3: type (default NORMAL)
#      TrainerSpec     3: model_type (default 1, unigram)  24: treat_whitespace_as_suffix (false)
#                      35: byte_fallback (false)
#      NormalizerSpec  2: precompiled_charsmap (the normalization rule; empty for "identity")
#                      3: add_dummy_prefix (true)  4: remove_extra_whitespaces (true)
#                      5: escape_whitespaces (true)


def read_varint(data: bytes, at: int) -> tuple:
    """A protobuf varint at data[at]: 7 bits a byte, lowest first; the high bit marks "more bytes".
    Returns (value, the position after it)."""
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def read_proto(data: bytes) -> dict:
    """{field number: [values]} of one protobuf message. Each field is a key (number << 3 |
    wire type), then a value: wire type 0 a varint (an int), 2 a length and that many bytes (a
    string or a nested message), 1 and 5 eight and four raw bytes (fixed64, fixed32: a float)."""
    fields, at = {}, 0
    while at < len(data):
        key, at = read_varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, at = read_varint(data, at)
        elif wire_type == 2:
            size, at = read_varint(data, at)
            value, at = data[at : at + size], at + size
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, at = data[at : at + size], at + size
        else:
            raise ValueError(f"protobuf wire type {wire_type} in field {number}; "
                             f"expected 0, 1, 2 or 5")
        fields.setdefault(number, []).append(value)
    return fields


def field(fields: dict, number: int, default):
    """A singular field's value: the last one written, or the .proto's default when absent."""
    return fields[number][-1] if number in fields else default


def read_sentencepiece(path: str) -> dict:
    """tokenizer.model -> {"pieces": [(piece, score, type)] in id order, the special ids, the
    settings, "sp": the loaded SentencePieceProcessor}. A file sentencepiece cannot load is
    refused."""
    sp = Tokenizer(path).sp  # (a missing file or one sentencepiece cannot load: refused there)
    proto = read_proto(sp.serialized_model_proto())
    pieces = []
    for message in proto.get(1, []):
        piece = read_proto(message)
        score = struct.unpack("<f", field(piece, 2, bytes(4)))[0]
        pieces.append((field(piece, 1, b"").decode("utf-8"), score, field(piece, 3, NORMAL)))
    trainer, normalizer = read_proto(field(proto, 2, b"")), read_proto(field(proto, 3, b""))
    return {"pieces": pieces, "sp": sp, "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "unk_id": sp.unk_id(), "model_type": field(trainer, 3, 1),
            "whitespace_as_suffix": bool(field(trainer, 24, 0)),
            "byte_fallback": bool(field(trainer, 35, 0)), "charsmap": field(normalizer, 2, b""),
            "dummy_prefix": bool(field(normalizer, 3, 1)),
            "remove_extra_whitespaces": bool(field(normalizer, 4, 1)),
            "escape_whitespaces": bool(field(normalizer, 5, 1))}


SUPPORTED = [  # (setting, value, what is expected): LLaMA's tokenizer.model and data.tokenizer's
    ("model_type", BPE, "BPE (model_type 2)"), ("byte_fallback", True, "byte_fallback true"),
    ("charsmap", b"", "no normalization rule (LLaMA's 'identity')"),
    ("remove_extra_whitespaces", False, "remove_extra_whitespaces false"),
    ("escape_whitespaces", True, "escape_whitespaces true"),
    ("whitespace_as_suffix", False, "treat_whitespace_as_suffix false")]


def check_supported(model: dict, path: str):
    """Refuse, naming the setting, a model tokenizer.json would not reproduce exactly."""
    for key, value, expected in SUPPORTED:
        if model[key] != value:
            shown = f"{len(model[key])} bytes" if key == "charsmap" else repr(model[key])
            raise ValueError(f"{path}: {key}={shown}; expected {expected}, as LLaMA's has")
    unused = [piece for piece, _, kind in model["pieces"] if kind == UNUSED]
    if unused:
        raise ValueError(f"{path}: {len(unused)} UNUSED pieces ({unused[:3]}); expected none")
    ids = (model["bos_id"], model["eos_id"], model["unk_id"])
    if min(ids) < 0:
        raise ValueError(f"{path}: bos/eos/unk ids {ids}; expected all three (LLaMA: 1, 2, 0)")


# ------------------------------------------------------------------------------------------------
# 2. tokenizer.json


def bpe_merges(pieces: list) -> list:
    """The merges that redo sentencepiece's BPE: every way of cutting a normal piece into two normal
    pieces, as "left right" (no piece holds a space: escape_whitespaces), ranked by the piece's
    score (highest first; then its id, then the cut). Byte, control and user-defined pieces never
    merge."""
    normal = {piece for piece, _, kind in pieces if kind == NORMAL}
    ranked = []
    for piece_id, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, piece_id, cut, f"{left} {right}"))
    return [merge for *_, merge in sorted(ranked)]


def user_defined_pieces(model: dict) -> list:
    """Longest first: a regex alternation then matches the longest at each place, as sentencepiece
    does."""
    pieces = [piece for piece, _, kind in model["pieces"] if kind == USER_DEFINED]
    return sorted(pieces, key=len, reverse=True)


def check_pieces_stay_whole(model: dict, path: str):
    """With user-defined pieces, tokenizer.json's BPE takes a chunk of text that is a whole piece as
    that piece (ignore_merges). Sentencepiece must do the same: its merges must build every normal
    piece from the piece's characters. Asked of sentencepiece itself, for each piece standing alone
    after a user-defined piece (no merge reaches across one): name + piece must encode as the name,
    then the piece."""
    anchor = user_defined_pieces(model)[0]  # the longest: no user-defined match runs past its end
    sp, anchor_text = model["sp"], anchor.replace(SPACE, " ")
    if model["dummy_prefix"]:
        anchor_text = anchor_text.removeprefix(" ")  # the dummy prefix puts the "▁" back
    before = sp.encode(anchor_text)
    broken = [piece for piece_id, (piece, _, kind) in enumerate(model["pieces"]) if kind == NORMAL
              and sp.encode(anchor_text + piece.replace(SPACE, " ")) != before + [piece_id]]
    if broken:
        raise ValueError(f"{path}: {len(broken)} pieces sentencepiece's BPE never builds whole "
                         f"(e.g. {broken[:3]}), beside user-defined pieces; tokenizer.json cannot "
                         f"give the same ids: expected every piece reachable by its own merges")


def added_token(piece_id: int, piece: str) -> dict:
    """A special token (<unk>, <s>, </s>) the tokenizers library keeps out of BPE."""
    return {"id": piece_id, "content": piece, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True}


def tokenizer_json(model: dict) -> dict:
    """The tokenizers library's Tokenizer as JSON: normalizer, pre-tokenizer, BPE, <s> in front, and
    the decoder (the normalizer undone: "▁" -> " ", bytes -> characters, the dummy prefix off)."""
    pieces, user_defined = model["pieces"], user_defined_pieces(model)
    bos, unk = pieces[model["bos_id"]][0], pieces[model["unk_id"]][0]
    split = {"type": "Split", "pattern": {"Regex": "|".join(map(re.escape, user_defined))},
             "behavior": "Isolated", "invert": False}
    prefix = [{"type": "Prepend", "prepend": SPACE}] if model["dummy_prefix"] else []
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if model["dummy_prefix"]:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos_then = [{"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}]
    then_b = [{"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [added_token(i, piece) for i, (piece, _, kind) in enumerate(pieces)
                         if kind in (UNKNOWN, CONTROL)],
        "normalizer": {"type": "Sequence", "normalizers": prefix + [
            {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]},
        "pre_tokenizer": split if user_defined else None,  # else BPE runs over the whole text
        "post_processor": {
            "type": "TemplateProcessing", "single": bos_then, "pair": bos_then + then_b,
            "special_tokens": {bos: {"id": bos, "ids": [model["bos_id"]], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True,
                  "ignore_merges": bool(user_defined),
                  "vocab": {piece: i for i, (piece, _, _) in enumerate(pieces)},
                  "merges": bpe_merges(pieces)},
    }


# ------------------------------------------------------------------------------------------------
# 3. special_tokens_map.json, tokenizer_config.json, generation_config.json


def special_tokens_map(model: dict) -> dict:
    pieces = model["pieces"]
    return {"bos_token": pieces[model["bos_id"]][0], "eos_token": pieces[model["eos_id"]][0],
            "unk_token": pieces[model["unk_id"]][0]}


def tokenizer_config(model: dict, max_len: int = None) -> dict:
    """The class that loads tokenizer.json as it is, <s> in front and no </s>, no pad token (LLaMA
    has none), decoded text left as it is (no clean-up of the space before punctuation), and, when
    given, the longest input the model was made for (transformers warns past it)."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special_tokens_map(model),
              "pad_token": None, "add_bos_token": True, "add_eos_token": False,
              "clean_up_tokenization_spaces": False}
    if max_len is not None:
        config["model_max_length"] = max_len
    return config


def generation_config(model: dict) -> dict:
    """generate() starts with <s> and stops at </s>; it is greedy (transformers' default, as our
    temperature 0)."""
    return {"bos_token_id": model["bos_id"], "eos_token_id": model["eos_id"]}


# ------------------------------------------------------------------------------------------------
# 4. Writing them


def hf_tokenizer_files(tokenizer_path: str, max_len: int = None) -> dict:
    """{file name: its JSON content} of the four files, the tokenizer checked first (a model they
    cannot describe exactly is refused). max_len: the model's context (config.json's
    max_position_embeddings), as tokenizer_config's model_max_length."""
    model = read_sentencepiece(tokenizer_path)
    check_supported(model, tokenizer_path)
    if user_defined_pieces(model):
        check_pieces_stay_whole(model, tokenizer_path)
    return {"tokenizer.json": tokenizer_json(model),
            "tokenizer_config.json": tokenizer_config(model, max_len),
            "special_tokens_map.json": special_tokens_map(model),
            "generation_config.json": generation_config(model)}


def write_hf_tokenizer(out_dir: str, tokenizer_path: str, max_len: int = None,
                       files: dict = None) -> list:
    """Write the four files (hf_tokenizer_files', or `files` made by it already) into out_dir, each
    atomically; returns their paths."""
    files = files or hf_tokenizer_files(tokenizer_path, max_len)
    paths = []
    for name, content in files.items():
        paths.append(os.path.join(out_dir, name))
        write_atomic(paths[-1], json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return paths
