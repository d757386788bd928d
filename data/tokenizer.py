"""Meta's tokenizer.model: read one (Tokenizer), or train one with LLaMA's settings (BPE, byte
fallback, split digits) for the synthetic world (train_tokenizer).

LLaMA-2's tokenizer.model: 32000 BPE pieces, <unk>=0, <s>=1 (BOS), </s>=2 (EOS), no pad id, digits
split into single pieces, unknown characters fall back to their UTF-8 bytes (<0x00>..<0xFF>). We
train the same kind of model on our own text so that the synthetic world and the tests use the
exact file format that Tokenizer reads for Meta's checkpoints.
"""
import io
import os

import sentencepiece as spm

from engineering.fileio import write_atomic


class Tokenizer:
    """Meta's tokenizer.model (sentencepiece BPE).
    <unk>=0, <s>=1, </s>=2, and no pad id (pad_id == -1)."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: tokenizer model not found")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path}: not a sentencepiece model ({e})") from None
        self.n_words, self.bos_id, self.eos_id, self.pad_id = (
            self.sp.vocab_size(), self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id())

    def encode(self, text: str, bos: bool, eos: bool) -> list:
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


LLAMA_SPM_SETTINGS = dict(
    model_type="bpe",
    byte_fallback=True,
    split_digits=True,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,  # Meta's tokenizer has no pad id
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    character_coverage=1.0,
    max_sentence_length=1 << 14,
    num_threads=2,
    minloglevel=2,  # quiet
)


def train_tokenizer(texts, out_path, vocab_size=512, whole_words=()):
    """Train a LLaMA-style BPE tokenizer on an iterable of strings and write it to `out_path`.

    vocab_size must leave room for the 256 byte pieces and the 3 specials (>= 300 is safe).
    whole_words: words that get one piece each ("▁Word", as a frequent word has in a real
    tokenizer), e.g. the synthetic world's names: a 1 M-parameter model copies a one-token name
    from the prompt far more reliably.
    The file is written to a temporary name and renamed, so a crash never leaves half a model.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size}: "
                         f"need >= 300 (256 byte pieces + 3 specials + merges)")
    model = io.BytesIO()
    lines = [line for text in texts for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError("train_tokenizer: no text to train on")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
        user_defined_symbols=["\u2581" + w for w in whole_words], **LLAMA_SPM_SETTINGS
    )
    write_atomic(out_path, model.getvalue())
    return out_path
